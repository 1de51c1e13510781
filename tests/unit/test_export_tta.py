"""Export for serving (ONNX, torch.export) and test-time augmentation: parity with the eager model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segray.config import ConfigError, InferJobConfig, ModelConfig, SceneInferJobConfig, load_config
from segray.core.checkpoint import Checkpoint
from segray.core.export import export_checkpoint, load_pt2, onnx_metadata, serving_model
from segray.core.models import build_model
from segray.core.tta import TRANSFORMS, check_transforms, tta_logits

SIZES = [(1, 64, 64), (3, 37, 45), (2, 33, 100), (1, 17, 16)]  # batch, H, W: multiples of 8 and odd ones


def _checkpoint(num_classes: int = 4, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="unet", in_channels=3, num_classes=num_classes, depth=3, base_width=8)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    names = [f"c{i}" for i in range(max(num_classes, 2))]
    ckpt = Checkpoint.of(model, cfg.model_dump(mode="json"), names, {"mean": [90.0, 100.0, 110.0],
                                                                      "std": [30.0, 35.0, 40.0]})
    return Checkpoint(**{**ckpt.__dict__, "id": "0123456789abcdef"})


def _eager(ckpt: Checkpoint, x: torch.Tensor) -> torch.Tensor:
    """The eager path of segray infer: normalise, then the model (which pads odd sizes itself)."""
    model = build_model(ckpt.model())
    model.load_state_dict(ckpt.model_state)
    mean, std = ckpt.normalization()
    with torch.no_grad():
        return model.eval()((x - mean) / std)


def _pixels(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.fixture(scope="module")
def ckpt() -> Checkpoint:
    return _checkpoint()


@pytest.fixture(scope="module")
def onnx_bytes(ckpt) -> bytes:
    return export_checkpoint(ckpt, "onnx")


@pytest.mark.parametrize("b,h,w", SIZES)
def test_onnx_matches_eager_at_any_batch_and_size(ckpt, onnx_bytes, b, h, w):
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = _pixels(b, h, w)
    ref = _eager(ckpt, x).numpy()
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref.shape == (b, 4, h, w)
    assert np.abs(out - ref).max() < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_onnx_metadata(ckpt, onnx_bytes):
    meta = onnx_metadata(onnx_bytes)
    assert json.loads(meta["class_names"]) == ckpt.class_names
    assert json.loads(meta["band_stats"]) == ckpt.band_stats
    assert json.loads(meta["model_config"])["depth"] == 3
    assert meta["checkpoint_id"] == ckpt.id and meta["task"] == "semantic"


def test_pt2_round_trips_with_the_same_logits(ckpt, tmp_path):
    data = export_checkpoint(ckpt, "pt2")
    (tmp_path / "m.pt2").write_bytes(data)
    program = torch.export.load(str(tmp_path / "m.pt2"))  # a plain torch.export archive
    assert program is not None
    run, meta = load_pt2(data)
    assert json.loads(meta["class_names"]) == ckpt.class_names and meta["checkpoint_id"] == ckpt.id
    for b, h, w in SIZES:
        x = _pixels(b, h, w)
        with torch.no_grad():
            assert (run(x) - _eager(ckpt, x)).abs().max() < 1e-4


def test_serving_model_is_the_eager_path(ckpt):
    x = _pixels(2, 29, 51)
    with torch.no_grad():
        assert torch.allclose(serving_model(ckpt)(x), _eager(ckpt, x), atol=1e-5)


def test_instance_checkpoints_are_refused():
    ckpt = Checkpoint(task="instance", model_config={"name": "maskrcnn_resnet50_fpn", "num_classes": 3},
                      class_names=["bg", "a", "b"], model_state={})
    with pytest.raises(ValueError, match="only semantic models export"):
        export_checkpoint(ckpt, "onnx")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        export_checkpoint(_checkpoint(), "tflite")


# --------------------------------------------------------------------------- TTA


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
def test_inverse_undoes_forward(name, h, w):
    forward, inverse = TRANSFORMS[name]
    x = torch.randn(2, 3, h, w)
    assert torch.equal(inverse(forward(x)), x)


def test_no_transforms_is_one_pass():
    calls = []
    run = lambda x: calls.append(x.shape) or x * 2  # noqa: E731
    x = torch.randn(1, 2, 5, 7)
    assert torch.equal(tta_logits(run, x, []), x * 2) and len(calls) == 1


@pytest.mark.parametrize("h,w", [(16, 16), (16, 24), (37, 45)])
def test_equivariant_model_is_unchanged(h, w):
    """A per-pixel model (1x1 conv) commutes with flips and rotations: TTA gives its logits."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        ref = model(x)
        out = tta_logits(model, x, ["hflip", "vflip", "rot90"])
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("h,w", [(32, 48), (37, 45)])
def test_unet_takes_rotated_non_square_inputs(ckpt, h, w):
    """rot90 runs U-Net on W x H: it must give logits of that size, and the mean stays at H x W."""
    x = _pixels(1, h, w)
    model = serving_model(ckpt)
    with torch.no_grad():
        assert model(torch.rot90(x, 1, dims=(-2, -1))).shape[-2:] == (w, h)
        out = tta_logits(model, x, ["rot90", "hflip"])
        # the mean of three maps, each of which the TTA recomputes here by hand
        by_hand = (model(x) + torch.rot90(model(torch.rot90(x, 1, (-2, -1))), -1, (-2, -1))
                   + torch.flip(model(torch.flip(x, (-1,))), (-1,))) / 3
    assert out.shape == (1, 4, h, w) and torch.allclose(out, by_hand, atol=1e-5)


def test_transform_names_are_checked():
    assert check_transforms(("hflip",)) == ["hflip"]
    with pytest.raises(ValueError, match="unknown transform"):
        check_transforms(["rot45"])
    with pytest.raises(ValueError, match="twice"):
        check_transforms(["hflip", "hflip"])


def test_configs_take_predictor_and_tta(tmp_path):
    base = {"source": {"images": "x"}, "checkpoint": "c.pt", "output": "o"}
    cfg = InferJobConfig(**base, predictor="onnxruntime", tta=["hflip", "rot90"])
    assert cfg.predictor == "onnxruntime" and cfg.tta == ["hflip", "rot90"] and cfg.onnx_model is None
    assert InferJobConfig(**base).tta == [] and InferJobConfig(**base).predictor == "eager"
    assert SceneInferJobConfig(**base, tta=["vflip"]).tta == ["vflip"]
    for bad in ({"tta": ["rot45"]}, {"tta": ["hflip", "hflip"]}, {"predictor": "tensorrt"},
                {"onnx_model": "m.onnx"}):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({**base, **bad}))
        with pytest.raises(ConfigError):
            load_config(InferJobConfig, str(path))


def test_predictor_runtimes_agree(ckpt, onnx_bytes, tmp_path):
    """The Predictor's eager and onnxruntime runtimes give the same class maps (and TTA runs on both);
    an ONNX file of another checkpoint is refused."""
    from segray.infer.steps import Predictor

    ckpt.save(str(tmp_path / "c.pt"))
    (tmp_path / "other.onnx").write_bytes(onnx_bytes)  # the id of `ckpt`, not of the saved file
    with pytest.raises(ValueError, match="exported from checkpoint"):
        Predictor(str(tmp_path / "c.pt"), device="cpu", predictor="onnxruntime", onnx_model=str(tmp_path / "other.onnx"))
    (tmp_path / "m.onnx").write_bytes(export_checkpoint(Checkpoint.load(str(tmp_path / "c.pt")), "onnx"))
    images = [_pixels(1, 37, 45, seed=s)[0].numpy() for s in range(3)] + [_pixels(1, 64, 48)[0].numpy()]
    eager = Predictor(str(tmp_path / "c.pt"), device="cpu")
    ort_ = Predictor(str(tmp_path / "c.pt"), device="cpu", predictor="onnxruntime", onnx_model=str(tmp_path / "m.onnx"),
                     threads=1)
    for (pa_, ca), (pb, cb) in zip(eager.predict(images), ort_.predict(images)):
        assert np.array_equal(pa_, pb) and abs(ca - cb) < 1e-5
    eager.tta = ort_.tta = ["hflip", "rot90"]
    for (pa_, _), (pb, _) in zip(eager.predict(images), ort_.predict(images)):
        assert np.array_equal(pa_, pb)
