import dataclasses
from typing import Union, get_args

import pytest
import torch

from segray.config import (
    MODEL_CONFIGS,
    AnyModelConfig,
    ConfigError,
    LossConfig,
    MaskRCNNConfig,
    ModelConfig,
    TorchvisionSegConfig,
    TrainJobConfig,
    UNetConfig,
    build_config,
)
from segray.core.losses import build_loss
from segray.core.models import (
    MODELS,
    ModelSpec,
    build_model,
    load_weights,
    model_family,
    model_spec,
    num_output_channels,
    receptive_radius,
    register_model,
    tile_align,
)
from segray.core.models.unet import UNet
from segray.infer.scene_steps import model_align

ALL = {"unet", "fcn_resnet50", "deeplabv3_resnet50", "smp", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"}


def test_registry_lists_config_names():
    assert set(MODELS) == ALL
    with pytest.raises(ValueError, match="unknown model 'segformer'"):
        build_model(UNetConfig.model_construct(name="segformer"))


def test_registry_and_config_union_agree():
    """The names the config union accepts are the registry's, and each entry points at its class."""
    assert set(MODELS) == set(MODEL_CONFIGS)
    union = get_args(get_args(AnyModelConfig)[0])  # Annotated[Union[...], validator] -> the classes
    assert get_args(AnyModelConfig)[0].__origin__ is Union and set(union) == set(MODEL_CONFIGS.values())
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert spec.config is MODEL_CONFIGS[name] and spec.family == spec.config.family
        assert ModelConfig(name=name).name == name  # every registered name validates ...
        assert isinstance(ModelConfig(name=name), spec.config)  # ... as its registered class
    # The config's error for an unknown name lists exactly the registry's names.
    with pytest.raises(ConfigError) as err:
        build_config(TrainJobConfig, {"data": {"source": {"images": "i", "masks": "m"}}}, ["model.name=segformer"])
    assert f"model.name: unknown model 'segformer'; available: {', '.join(sorted(MODELS))}" in str(err.value)
    with pytest.raises(ValueError, match=", ".join(sorted(MODELS))):
        model_spec("segformer")


@pytest.mark.parametrize("depth", [2, 3])
def test_unet_receptive_radius_is_what_the_input_gradient_shows(depth):
    model = build_model(UNetConfig(num_classes=3, depth=depth, base_width=4)).eval()
    x = torch.randn(1, 3, 192, 192, requires_grad=True)
    model(x)[0, :, 96, 96].sum().backward()
    seen = (x.grad[0].abs().sum(0) > 0).nonzero() - 96
    assert int(seen.abs().max()) == receptive_radius(UNetConfig(depth=depth)) == 6 * 2**depth - 2
    assert receptive_radius({"name": "fcn_resnet50"}) is None, "unknown: scenes blend"


def test_specs_carry_family_and_align():
    assert {n for n in MODELS if model_family(n) == "instance"} == {"maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"}
    assert model_spec("unet").config is UNetConfig and model_spec("fcn_resnet50").config is TorchvisionSegConfig
    assert model_spec("maskrcnn_resnet50_fpn_v2").config is MaskRCNNConfig
    assert model_spec("maskrcnn_resnet50_fpn").handles_weights and not model_spec("unet").handles_weights
    assert tile_align(UNetConfig(depth=3)) == 8 and tile_align(ModelConfig(depth=5)) == 32
    assert tile_align(ModelConfig(name="deeplabv3_resnet50")) == tile_align({"name": "fcn_resnet50"}) == 8
    assert tile_align(ModelConfig(name="maskrcnn_resnet50_fpn")) == 1
    # scene tiling asks the registry, with a checkpoint's model_config (old flat dumps too)
    assert model_align(UNetConfig(depth=2).model_dump(mode="json")) == 4
    assert model_align({**MaskRCNNConfig(name="maskrcnn_resnet50_fpn").model_dump(), "name": "unet", "depth": 3}) == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        model_spec("unet").align = 1  # type: ignore[misc]


def test_register_model_checks_family_and_names():
    with pytest.raises(ValueError, match="family 'instance'"):
        register_model("unet_like", family="instance", config=UNetConfig)
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet", config=UNetConfig)(lambda cfg: None)
    assert set(MODELS) == ALL
    with pytest.raises(TypeError, match="takes a UNetConfig"):
        build_model(TorchvisionSegConfig.model_construct(name="unet", in_channels=3, num_classes=2))


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
