import pytest
import torch

from segray.config import LossConfig, ModelConfig
from segray.core.losses import build_loss
from segray.core.models import MODELS, build_model, load_weights, num_output_channels
from segray.core.models.unet import UNet


def test_registry_lists_config_names():
    assert set(MODELS) == {"unet", "fcn_resnet50", "deeplabv3_resnet50", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"}
    with pytest.raises(ValueError):
        build_model(ModelConfig.model_construct(name="segformer"))


@pytest.mark.parametrize(
    "depth, bands, classes, down, up, size",
    [
        (1, 1, 1, "maxpool", "transpose", (37, 53)),
        (2, 13, 5, "conv", "bilinear", (37, 53)),
        (3, 3, 2, "maxpool", "bilinear", (16, 16)),
        (4, 13, 1, "conv", "transpose", (33, 17)),
        (5, 1, 13, "maxpool", "transpose", (37, 53)),
        (5, 4, 3, "conv", "bilinear", (1, 70)),
    ],
)
def test_unet_output_shape(depth, bands, classes, down, up, size):
    cfg = ModelConfig(in_channels=bands, num_classes=classes, depth=depth, base_width=4, down=down, up=up)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, bands, *size))
    assert out.shape == (2, num_output_channels(cfg), *size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_unet_widths_double_and_dropout_at_bottleneck():
    model = UNet(3, 2, depth=3, base_width=8, dropout=0.3)
    assert [d[-1][0].out_channels for d in model.downs] == [16, 32, 64]
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 1


def test_unet_without_batch_norm_has_conv_bias():
    model = UNet(3, 2, depth=2, base_width=4, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.stem[0].bias is not None


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_torchvision_models_take_any_band_count(name):
    model = build_model(ModelConfig(name=name, in_channels=4, num_classes=3)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 64, 64)


@pytest.fixture
def tiny_cfg():
    return ModelConfig(in_channels=2, num_classes=3, depth=2, base_width=4)


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("form", ["raw", "payload", "ddp"])
def test_weights_round_trip(tmp_path, tiny_cfg, form):
    torch.manual_seed(0)
    src = build_model(tiny_cfg)
    state = src.state_dict()
    saved = {
        "raw": state,
        "payload": {"model_state": state, "class_names": ["a", "b", "c"], "epoch": 3},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[form]
    path = tmp_path / "w.pt"
    torch.save(saved, path)

    torch.manual_seed(1)
    dst = build_model(tiny_cfg)
    assert not _same_params(src, dst)
    load_weights(dst, str(path))
    assert _same_params(src, dst)
    # build_model loads cfg.weights itself, here through an fsspec URL.
    assert _same_params(src, build_model(tiny_cfg.model_copy(update={"weights": f"file://{path}"})))


def test_weights_from_fsspec_memory(tiny_cfg):
    import fsspec

    src = build_model(tiny_cfg)
    with fsspec.open("memory://segray-test/w.pt", "wb") as f:
        torch.save({"model_state": src.state_dict()}, f)
    assert _same_params(src, load_weights(build_model(tiny_cfg), "memory://segray-test/w.pt"))


def test_weights_mismatch_fails(tmp_path, tiny_cfg):
    path = tmp_path / "w.pt"
    torch.save(build_model(tiny_cfg).state_dict(), path)
    with pytest.raises(RuntimeError):
        load_weights(build_model(tiny_cfg.model_copy(update={"num_classes": 4})), str(path))


@pytest.mark.parametrize("classes, terms", [(3, ["ce", "dice"]), (1, ["bce", "focal"])])
def test_few_steps_overfit_tiny_problem(classes, terms):
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=2, num_classes=classes, depth=2, base_width=4))
    loss_fn = build_loss(LossConfig(terms=[{"name": t} for t in terms]), classes, ignore_index=None)
    x = torch.randn(2, 2, 16, 16)
    y = (x[:, 0] > 0).long() + (classes > 1) * (x[:, 1] > 1).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
