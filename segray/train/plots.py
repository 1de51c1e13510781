"""Pictures people would rather look at than tables: training curves and prediction overlays."""

from __future__ import annotations

import io

import numpy as np

from segray.config import StorageOptions
from segray.io.fs import write_bytes


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_curves(history: list[dict[str, float]], url: str, metric: str = "val_miou",
                storage: StorageOptions | None = None) -> None:
    """Loss (train/val) and the validation metrics per epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        if any(key in h for h in history):
            ax_loss.plot(epochs, [h.get(key, np.nan) for h in history], style, label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    keys = [k for k in ("val_miou", "val_pixel_accuracy", "val_mean_dice", "val_fwiou") if any(k in h for h in history)]
    if metric not in keys and any(metric in h for h in history):
        keys.append(metric)
    for key in keys:
        ax_metric.plot(epochs, [h.get(key, np.nan) for h in history], "-o", label=key)
    ax_metric.set(xlabel="epoch", title=f"validation (best by {metric})", ylim=(0, 1.02))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    write_bytes(url, _figure_bytes(fig), storage)
    plt.close(fig)


def plot_overlays(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], url: str,
                  storage: StorageOptions | None = None) -> None:
    """One row per image: the image, prediction overlay and (if given) ground-truth overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segray.core.masks import overlay

    cols = 3 if any(p[3] is not None for p in panels) else 2
    fig, axes = plt.subplots(len(panels), cols, figsize=(3.2 * cols, 3.2 * len(panels)), squeeze=False)
    for row, (name, rgb, pred, truth) in zip(axes, panels):
        row[0].imshow(rgb)
        row[0].set_title(name, fontsize=8)
        row[1].imshow(overlay(rgb, pred))
        row[1].set_title("prediction", fontsize=8)
        if cols == 3 and truth is not None:
            row[2].imshow(overlay(rgb, truth))
            row[2].set_title("ground truth", fontsize=8)
        for ax in row:
            ax.axis("off")
    write_bytes(url, _figure_bytes(fig), storage)
    plt.close(fig)
