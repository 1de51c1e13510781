"""Rich tables for the end-of-job summaries."""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def print_table(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, _fmt(value))
    console.print(table)


def infer_rows(s: dict[str, Any], class_names: list[str] | None = None) -> list[tuple[str, Any]]:
    rows = [(k, s[k]) for k in ("num_inputs", "num_ok", "num_error", "num_with_ground_truth", "wall_s",
                                "images_per_s", "megapixels_per_s", "mean_decode_ms", "mean_predict_ms",
                                "model_name", "checkpoint_id") if k in s]
    if s.get("error_reasons"):
        rows.append(("error reasons", s["error_reasons"]))
    rows += [(k, s[k]) for k in ("miou", "pixel_accuracy", "mean_class_accuracy", "fwiou", "mean_dice") if k in s]
    rows += [(k, s[k]) for k in ("num_instances", "mean_instances_per_image", "segm_ap", "segm_ap50", "segm_ap75",
                                 "segm_ar", "bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_ar") if k in s]
    rows += [(f"IoU {c}", s[f"iou/{c}"]) for c in class_names or [] if f"iou/{c}" in s]
    rows += [("predictions", s["predictions"]), ("summary", s["output"].rstrip("/") + "/summary.parquet")]
    return rows
