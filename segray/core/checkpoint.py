"""The checkpoint: everything inference needs, in one ``torch.save`` file, as a typed object.

Only tensors, numbers, strings, lists and dicts go in, so the file loads with
``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is opened). The file
holds a plain dict (the payload, format ``segray/1``); :class:`Checkpoint` is that dict read and
validated once, so the rest of segray reads fields, never ``payload[...]``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import torch

from segray.config import ModelConfig

FORMAT = "segray/1"
FILENAME = "checkpoint.pt"
_REQUIRED = ("model_config", "class_names", "model_state")


@dataclass(frozen=True)
class Checkpoint:
    task: str  # the model family: "semantic" or "instance"
    model_config: dict[str, Any]  # as trained (``ModelConfig.model_dump``); see ``model``
    class_names: list[str]
    model_state: dict[str, torch.Tensor]
    band_stats: dict[str, list[float]] | None = None  # {"mean": [...], "std": [...]} per band
    ignore_index: int | None = None
    bands: list[int] | None = None  # 0-based bands of the inputs the model was trained on
    image_size: list[int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)  # optimizer and loop state, for resuming
    category_ids: list[int] | None = None  # instance models: COCO category id of each label
    id: str = ""  # content hash of the file it was read from ("" when not read from a file)

    @property
    def model_name(self) -> str:
        return str(self.model_config.get("name", "unet"))

    @property
    def num_classes(self) -> int:
        return int(self.model_config["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.model_config.get("in_channels", 3))

    def model(self) -> ModelConfig:
        """The model's config; weights come from this checkpoint, never from the files named
        when it was trained."""
        return ModelConfig.from_checkpoint({**self.model_config, "weights": None, "backbone_weights": None,
                                            "encoder_weights": None})

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-band mean and std as ``[C, 1, 1]`` tensors (0 and 1 without band statistics)."""
        stats, c = self.band_stats or {}, self.in_channels
        return (torch.tensor(stats.get("mean", [0.0] * c)).view(-1, 1, 1),
                torch.tensor(stats.get("std", [1.0] * c)).view(-1, 1, 1))

    # ---- the file

    @classmethod
    def of(cls, model: torch.nn.Module, model_config: dict, class_names: list[str], band_stats: dict | None,
           **fields: Any) -> "Checkpoint":
        """A checkpoint of ``model`` as it is now (DDP's ``module.`` prefixes dropped, on CPU)."""
        state = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
        metrics = {k: float(v) for k, v in (fields.pop("metrics", None) or {}).items()}
        return cls(task=fields.pop("task", "semantic"), model_config=model_config, class_names=list(class_names),
                   model_state=state, band_stats=band_stats, metrics=metrics, **fields)

    @classmethod
    def from_payload(cls, payload: Any, checkpoint_id: str = "") -> "Checkpoint":
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a segray checkpoint (expected format {FORMAT!r})")
        missing = [k for k in _REQUIRED if k not in payload]
        if missing:
            raise ValueError(f"a segray checkpoint without {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__ if f != "id"}
        values = {k: v for k, v in payload.items() if k in known and v is not None}
        ckpt = cls(**{"task": "semantic", **values}, id=checkpoint_id)
        try:
            ckpt.model()
        except ValueError as e:  # pydantic's errors are ValueErrors; one line is enough here
            raise ValueError(f"the checkpoint's model_config does not validate: {str(e).splitlines()[0]}") from None
        return ckpt

    def to_payload(self) -> dict[str, Any]:
        payload = {"format": FORMAT, **asdict(self)}
        payload.pop("id")
        if payload["category_ids"] is None:
            payload.pop("category_ids")
        return payload

    @classmethod
    def load(cls, f: str | BinaryIO | bytes) -> "Checkpoint":
        """From a path, an open file or the file's bytes (the id is the hash of those bytes)."""
        if isinstance(f, str):
            with open(f, "rb") as fh:
                f = fh.read()
        data = f if isinstance(f, bytes) else f.read()
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # a file cut off mid-write has no zip directory at its end
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"not a complete checkpoint file ({len(data)} bytes: {why})") from None
        return cls.from_payload(payload, checkpoint_id(data))

    def save(self, f: str | BinaryIO) -> None:
        torch.save(self.to_payload(), f)


def checkpoint_id(data: bytes) -> str:
    """Content hash: the same weights give the same id wherever they are stored."""
    return hashlib.sha256(data).hexdigest()[:16]


# ---- the payload as a dict, for code that writes one by hand (tests, benchmarks)


def make_payload(model: torch.nn.Module, model_config: dict, class_names: list[str], band_stats: dict | None,
                 **fields: Any) -> dict[str, Any]:
    return Checkpoint.of(model, model_config, class_names, band_stats, **fields).to_payload()


def save_payload(payload: dict, f: str | BinaryIO) -> None:
    torch.save(payload, f)


def load_payload(f: str | BinaryIO | bytes) -> dict[str, Any]:
    return Checkpoint.load(f).to_payload()
