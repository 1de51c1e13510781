"""``smp``: segmentation_models_pytorch architectures on smp or timm encoders, any band count.

The model is built with ``encoder_weights=None`` (workers have no network) and
``model.encoder_weights`` is loaded into the encoder here, from a file:

- a state dict (``torch.save``, ``.safetensors``), a segray checkpoint or an smp model's state
  (``encoder.*`` keys), at a local path or any fsspec URL (opened with the job's storage
  options), or a Hugging Face / timm cache folder holding ``model.safetensors`` /
  ``pytorch_model.bin``. timm and torchvision keys are mapped to the encoder's: smp's ResNets use
  torchvision's names (``fc.*`` is dropped); a ``tu-`` encoder wraps timm's features model, whose
  flattened names (``stem_0``) are matched to timm's (``stem.0``).
- The input conv: a 3-band file is adapted to ``in_channels`` as smp does for pretrained RGB
  weights (``patch_first_conv``: band ``i`` reuses RGB filter ``i % 3``, scaled by
  ``3 / in_channels``); a file with ``in_channels`` bands already (TorchGeo's Sentinel-2
  weights, say) loads as it is.
- A bare name (``imagenet``, ``ssl``, ...) goes to smp, which downloads it: needs network.

Logits come back at the input size: inputs are padded (bottom/right, edge-replicated, as the
U-Net does) to a multiple of the encoder's output stride and cropped back.
"""

from __future__ import annotations

import functools
import logging
import os

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from segray.config.models import SmpConfig
from segray.core.models import load_weights, register_model

log = logging.getLogger(__name__)

_HEADS = ("fc.", "head.", "head_", "classifier.", "last_linear.", "pre_logits.")  # classifier layers
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_PER_STAGE_DECODERS = {arch: (256, 128, 64, 32, 16) for arch in ("Unet", "UnetPlusPlus", "MAnet")}  # smp's defaults
_CACHE_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class SmpSegmentation(nn.Module):
    """An smp model that takes any ``H, W`` and returns logits ``[B, K, H, W]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.stride = int(net.encoder.output_stride)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.stride
        if h % m or w % m:  # smp refuses sizes off its stride grid
            x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
        out = self.net(x)
        if out.shape[-2:] != x.shape[-2:]:  # heads that upsample less than the stride (PSPNet at depth < 5)
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out[..., :h, :w]


def check_encoder(name: str) -> None:
    """One-line ValueError naming ``model.encoder`` when neither smp nor timm knows ``name``."""
    from segmentation_models_pytorch.encoders import get_encoder_names

    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            raise ValueError(f"model.encoder: {name!r}: timm has no model {name[3:]!r} (see timm.list_models())")
    elif name not in get_encoder_names():
        raise ValueError(f"model.encoder: unknown smp encoder {name!r}; e.g. resnet18, resnet34, efficientnet-b0, "
                         "mit_b0, or tu-<timm model> (smp.encoders.get_encoder_names())")


def is_weights_name(value: str) -> bool:
    """``imagenet``-style names that smp resolves (and downloads) itself, not files."""
    return "/" not in value and "\\" not in value and not value.endswith(_FILE_SUFFIXES) and not os.path.exists(value)


def _create(cfg: SmpConfig, encoder_weights: str | None = None) -> nn.Module:
    import segmentation_models_pytorch as smp

    check_encoder(cfg.encoder)
    kwargs: dict = {}
    if cfg.arch == "PSPNet":
        kwargs["upsampling"] = 2**cfg.encoder_depth  # logits at the input size
    if cfg.arch in _PER_STAGE_DECODERS:  # one decoder width per encoder stage
        kwargs["decoder_channels"] = _PER_STAGE_DECODERS[cfg.arch][: cfg.encoder_depth]
    return smp.create_model(cfg.arch, encoder_name=cfg.encoder, encoder_weights=encoder_weights,
                            encoder_depth=cfg.encoder_depth, in_channels=cfg.in_channels,
                            classes=cfg.num_classes, **kwargs)


@functools.lru_cache(maxsize=64)
def _stride(arch: str, encoder: str, depth: int) -> int:
    # The stride is the built encoder's own; built on the meta device (no memory, no init) where the
    # encoder allows it (mit calls .item() while building: a CPU build, once per process).
    cfg = SmpConfig(arch=arch, encoder=encoder, encoder_depth=depth)
    try:
        with torch.device("meta"):
            net = _create(cfg)
    except (RuntimeError, NotImplementedError):
        net = _create(cfg)
    return int(net.encoder.output_stride)


def smp_align(cfg: SmpConfig) -> int:
    """The model's output stride (tile offsets align to it), read from the encoder smp builds."""
    return _stride(cfg.arch, cfg.encoder, cfg.encoder_depth)


# ------------------------------------------------------------------ encoder weights


def _open_state(url: str, storage_options: dict | None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (or the file a Hugging Face / timm cache folder holds)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isdir(path):
        found = sorted(p for name in _CACHE_FILES for p in fs.glob(f"{path.rstrip('/')}/**/{name}"))
        if not found:
            raise ValueError(f"model.encoder_weights: {url}: no {' or '.join(_CACHE_FILES)} in this folder")
        path = found[0]
    with fs.open(path, "rb") as f:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(f.read())
        else:
            state = torch.load(f, map_location="cpu", weights_only=True)
    for key in ("model_state", "state_dict", "model"):  # segray checkpoint, Lightning, references
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.encoder_weights: {url}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole smp model (or a segray smp checkpoint)
        state = {k.split("encoder.", 1)[1]: v for k, v in state.items() if "encoder." in k}
    return state


def _match_key(key: str, source: dict) -> str | None:
    """The source key of encoder ``key``: itself, or timm's name for a features model's flattened one
    (``stages_1.blocks.0.x`` <- ``stages.1.blocks.0.x``)."""
    if key in source:
        return key
    head, _, rest = key.partition(".")
    for i, c in enumerate(head):
        if c == "_":
            candidate = f"{head[:i]}.{head[i + 1:]}" + (f".{rest}" if rest else "")
            if candidate in source:
                return candidate
    return None


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters ``[O, 3, k, k]`` -> ``[O, in_channels, k, k]``, as smp's ``patch_first_conv``."""
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    idx = torch.arange(in_channels) % c
    return weight[:, idx] * (c / in_channels)


def load_encoder_weights(encoder: nn.Module, url: str, in_channels: int, storage_options: dict | None = None) -> None:
    """Load a weights file into ``encoder``: every encoder tensor must come from the file."""
    source = _open_state(url, storage_options)
    own = encoder.state_dict()
    first = next(k for k, v in own.items() if v.ndim == 4 and v.shape[1] == in_channels)  # the input conv
    state, used, missing = {}, set(), []
    for key, target in own.items():
        src = _match_key(key, source) or _match_key(key.removeprefix("model."), source)
        if src is None:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        value = source[src]
        if key == first and value.shape[1] != in_channels:
            if value.shape[1] != 3:
                raise ValueError(f"model.encoder_weights: {url}: input conv has {value.shape[1]} bands; "
                                 f"give a 3-band or a {in_channels}-band file (model.in_channels)")
            value = adapt_first_conv(value, in_channels)
        if value.shape != target.shape:
            raise ValueError(f"model.encoder_weights: {url}: {src} is {tuple(value.shape)}, the encoder's "
                             f"{key} is {tuple(target.shape)}; check model.encoder")
        state[key] = value
        used.add(src)
    if missing:
        raise ValueError(f"model.encoder_weights: {url} does not fit encoder (missing {missing[:3]}); "
                         "check model.encoder")
    extra = [k for k in source if k not in used and not k.startswith(_HEADS)]
    if extra:  # stages past encoder_depth, or a classifier named otherwise
        log.info("model.encoder_weights: %s: %d tensors not used (%s, ...)", url, len(extra), extra[0])
    encoder.load_state_dict(state, strict=False)


@register_model("smp", family="semantic", align=smp_align, config=SmpConfig, handles_weights=True,
                encoder=lambda m: m.encoder)
def build_smp(cfg: SmpConfig, storage_options: dict | None = None) -> SmpSegmentation:
    name = cfg.encoder_weights if cfg.encoder_weights and is_weights_name(cfg.encoder_weights) else None
    model = SmpSegmentation(_create(cfg, encoder_weights=name))
    if cfg.encoder_weights and name is None:
        load_encoder_weights(model.encoder, cfg.encoder_weights, cfg.in_channels, storage_options)
    if cfg.weights:  # a whole segray model: loaded last, over any encoder weights
        load_weights(model, cfg.weights, storage_options)
    return model
