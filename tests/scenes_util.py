"""Helpers shared by the scene tests: random-init checkpoints and untiled reference predictions."""

from __future__ import annotations

import numpy as np
import rasterio
import torch

from segray.config import ModelConfig
from segray.core.checkpoint import make_payload, save_payload
from segray.core.models import build_model


def make_checkpoint(path: str, in_channels: int, num_classes: int, mean: list[float], std: list[float],
                    depth: int = 2, base_width: int = 8, seed: int = 0, calibrate_on: np.ndarray | None = None,
                    class_names: list[str] | None = None, bands: list[int] | None = None) -> torch.nn.Module:
    """A random-init U-Net checkpoint. ``calibrate_on`` (a ``[C, H, W]`` raw image) sharpens the
    head and shifts its bias so every class wins somewhere: predictions vary across the scene."""
    torch.manual_seed(seed)
    cfg = ModelConfig(in_channels=in_channels, num_classes=num_classes, depth=depth, base_width=base_width)
    model = build_model(cfg).eval()
    if calibrate_on is not None:
        with torch.no_grad():
            model.head.weight.mul_(30)
            logits = model(normalise(calibrate_on, mean, std)[None])[0]
            model.head.bias.sub_(logits.flatten(1).median(dim=1).values)
    names = class_names or [f"class{i}" for i in range(max(num_classes, 2))]
    payload = make_payload(model, cfg.model_dump(mode="json"), names, {"mean": mean, "std": std}, bands=bands)
    save_payload(payload, path)
    return model


def normalise(image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (torch.from_numpy(np.asarray(image, np.float32)) - m) / s


@torch.no_grad()
def untiled_probabilities(model: torch.nn.Module, image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """The whole scene through the model at once: the reference for stitched predictions."""
    logits = model.eval()(normalise(image, mean, std)[None])[0]
    return (torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)).numpy()


def read_all(path: str) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(), {"crs": ds.crs, "transform": ds.transform, "nodata": ds.nodata, "profile": ds.profile,
                           "overviews": ds.overviews(1), "block_shapes": ds.block_shapes}


def write_unet_checkpoint(url: str, storage, seed: int = 0) -> str:
    """A small random-init U-Net checkpoint for the demo classes at ``url`` (a folder, local or
    s3://): what training would save, without training."""
    import io

    from segray.core.checkpoint import FILENAME
    from segray.demo.scenes import DEMO_CLASSES
    from segray.io.fs import join, write_bytes

    torch.manual_seed(seed)
    cfg = ModelConfig(num_classes=len(DEMO_CLASSES), depth=2, base_width=8)
    buf = io.BytesIO()
    torch.save(make_payload(build_model(cfg), cfg.model_dump(mode="json"), DEMO_CLASSES, None), buf)
    write_bytes(join(url, FILENAME), buf.getvalue(), storage)
    return url
