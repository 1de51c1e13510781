"""``model.name: smp``: every architecture at any size and band count, encoder weights from files,
the registry's align and encoder, and the fine-tuning pieces of the training loop."""

from __future__ import annotations

import pytest
import timm
import torch
from segmentation_models_pytorch.encoders._utils import patch_first_conv
from torch import nn

from segray.config import ConfigError, ModelConfig, OptimConfig, TrainJobConfig, build_config
from segray.config.models import SMP_ARCHS, SmpConfig
from segray.core.models import build_model, model_encoder, model_spec, tile_align
from segray.core.models.smp import adapt_first_conv, is_weights_name
from segray.core.optim import batch_norm_eval, build_optimizer, group_scales, set_lr
from segray.train.loop import check_finetune, finetune_setup

MINIMAL = {"data": {"source": {"images": "imgs", "masks": "masks"}}}


def _encoder(arch: str) -> str:
    return "mit_b0" if arch == "Segformer" else "resnet18"


def _smp(arch: str = "Unet", bands: int = 3, **fields) -> SmpConfig:
    return ModelConfig(name="smp", arch=arch, encoder=fields.pop("encoder", _encoder(arch)), in_channels=bands,
                       num_classes=3, **fields)


@pytest.mark.parametrize("arch", SMP_ARCHS)
def test_every_arch_gives_logits_at_any_size_and_aligns_to_its_stride(arch):
    assert {"Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3Plus", "Segformer", "UPerNet"} <= set(SMP_ARCHS)
    for bands in (3, 13):
        cfg = _smp(arch, bands)
        model = build_model(cfg).eval()
        with torch.no_grad():
            out = model(torch.randn(1, bands, 100, 75))
            features = model_encoder("smp", model)(torch.randn(1, bands, 64, 64))
        assert out.shape == (1, 3, 100, 75) and torch.isfinite(out).all()
        # the registry's align is the deepest grid the built encoder really gives
        assert tile_align(cfg) == 64 // features[-1].shape[-1]
        assert tile_align(cfg.model_dump(mode="json")) == tile_align(cfg)  # a checkpoint's model_config too
        assert model_encoder("smp", model) is model.net.encoder


def test_align_follows_encoder_depth_and_dilation():
    for arch in ("Unet", "FPN", "PSPNet"):
        cfg = _smp(arch, encoder_depth=3)
        with torch.no_grad():
            out = build_model(cfg).eval()(torch.randn(1, 3, 37, 21))
        assert tile_align(cfg) == 8 and out.shape == (1, 3, 37, 21)
    assert tile_align(_smp("DeepLabV3Plus")) == 16 and tile_align(_smp("DeepLabV3")) == 8


def _timm_resnet18(bands: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(bands)
    return timm.create_model("resnet18", pretrained=False, in_chans=bands).state_dict()  # timm keys, fc.* included


@pytest.mark.parametrize("bands", [4, 13])
def test_rgb_weights_file_loads_with_its_first_conv_adapted_as_smp_does(tmp_path, bands):
    state = _timm_resnet18(3)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    encoder = build_model(_smp("Unet", bands, encoder_weights=str(path))).net.encoder
    conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    conv.weight.data = state["conv1.weight"].clone()
    patch_first_conv(nn.Sequential(conv), bands, pretrained=True)  # smp's own adaptation
    own = encoder.state_dict()
    torch.testing.assert_close(own["conv1.weight"], conv.weight.detach(), rtol=0, atol=0)
    for k, v in own.items():
        if k != "conv1.weight":
            assert torch.equal(v, state[k]), k
    assert "fc.weight" not in own


def test_multiband_weights_load_directly(tmp_path):
    state = _timm_resnet18(13)  # TorchGeo-style: a timm encoder trained on 13 Sentinel-2 bands
    path = tmp_path / "s2.pth"
    torch.save(state, path)
    own = build_model(_smp("FPN", 13, encoder_weights=str(path))).net.encoder.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in own.items())


def test_timm_features_encoder_loads_timm_keys_and_cache_folders(tmp_path):
    from safetensors.torch import save_file

    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    folder = tmp_path / "models--timm--convnext_atto" / "snapshots" / "abc"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))  # a Hugging Face cache's layout
    cfg = _smp("Unet", 4, encoder="tu-convnext_atto", encoder_weights=str(tmp_path))
    own = build_model(cfg).net.encoder.state_dict()
    assert torch.equal(own["model.stem_0.weight"], adapt_first_conv(state["stem.0.weight"], 4))
    assert torch.equal(own["model.stages_1.blocks.0.conv_dw.weight"], state["stages.1.blocks.0.conv_dw.weight"])


def test_weights_that_do_not_fit_fail_naming_the_field(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_timm_resnet18(5), path)
    with pytest.raises(ValueError, match="model.encoder_weights: .* input conv has 5 bands"):
        build_model(_smp("Unet", 4, encoder_weights=str(path)))
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)  # same names, other shapes
    with pytest.raises(ValueError, match=r"model.encoder_weights: .* layer1.0.conv1.weight is \(64, 64, 1, 1\)"):
        build_model(_smp("Unet", 3, encoder="resnet18", encoder_weights=str(path)))
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="model.encoder_weights: .* does not fit encoder"):
        build_model(_smp("Unet", 3, encoder_weights=str(path)))
    with pytest.raises(ValueError, match="^model.encoder: unknown smp encoder 'resnet19'"):
        build_model(_smp("Unet", encoder="resnet19"))
    assert is_weights_name("imagenet") and not is_weights_name(str(path)) and not is_weights_name("s3://b/w.pth")


def test_adapt_first_conv_matches_smp_for_one_band():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    expected = conv.weight.detach().sum(1, keepdim=True)
    assert torch.equal(adapt_first_conv(conv.weight.detach(), 1), expected)


def test_config_union_old_yaml_and_foreign_fields():
    assert build_config(TrainJobConfig, MINIMAL).model.name == "unet"  # no name: still a U-Net
    job = build_config(TrainJobConfig, MINIMAL, ["model.name=smp", "model.arch=FPN", "model.encoder=resnet18"])
    assert isinstance(job.model, SmpConfig) and job.model.encoder_depth == 5
    with pytest.raises(ConfigError) as err:
        build_config(TrainJobConfig, MINIMAL, ["model.name=smp", "model.depth=3"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[1].strip().startswith("model.depth: not a field of model 'smp' (it belongs to unet)")
    with pytest.raises(ConfigError, match="model.arch"):
        build_config(TrainJobConfig, MINIMAL, ["model.name=smp", "model.arch=NoSuchNet"])
    # a checkpoint never re-reads the encoder weights it was trained from
    from segray.core.checkpoint import Checkpoint

    cfg = _smp(encoder_weights="s3://bucket/w.pth")
    assert Checkpoint.of(build_model(_smp()), cfg.model_dump(mode="json"), ["a", "b", "c"],
                         {"mean": [0.0] * 3, "std": [1.0] * 3}).model().encoder_weights is None


# ------------------------------------------------------------------ fine-tuning (the loop's pieces)


def _finetune_job(model: dict, **finetune) -> TrainJobConfig:
    return TrainJobConfig.model_validate({**MINIMAL, "data": {**MINIMAL["data"], "class_names": ["a", "b", "c"]},
                                          "model": model, "finetune": finetune})


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(2, 3, 16, 16)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_encoder_does_not_move_then_trains_at_its_multiplier(optimizer):
    job = _finetune_job({"name": "smp", "encoder": "resnet18", "encoder_depth": 3, "num_classes": 3},
                        freeze_encoder_epochs=1, encoder_lr_mult=0.1)
    model = build_model(job.model).train()
    groups, frozen_bn = finetune_setup(job, model)
    assert [g["name"] for g in groups] == ["encoder", "rest"] and frozen_bn == []
    opt = build_optimizer(OptimConfig(optimizer=optimizer, weight_decay=0.1), groups)
    encoder = {k: v.clone() for k, v in model.net.encoder.named_parameters()}
    decoder = {k: v.clone() for k, v in model.net.decoder.named_parameters()}
    set_lr(opt, 0.01, group_scales(job.finetune, epoch=0))
    _step(model, opt)
    assert all(torch.equal(v, encoder[k]) for k, v in model.net.encoder.named_parameters())
    assert any(not torch.equal(v, decoder[k]) for k, v in model.net.decoder.named_parameters())
    set_lr(opt, 0.01, group_scales(job.finetune, epoch=1))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01])
    _step(model, opt)
    assert any(not torch.equal(v, encoder[k]) for k, v in model.net.encoder.named_parameters())


def test_frozen_batch_norm_keeps_statistics_and_affine():
    job = _finetune_job({"name": "smp", "encoder": "resnet18", "encoder_depth": 3, "num_classes": 3},
                        encoder_batch_norm="frozen")
    model = build_model(job.model)
    groups, frozen_bn = finetune_setup(job, model)
    opt = build_optimizer(OptimConfig(), groups)
    bn = model.net.encoder.bn1
    assert bn in frozen_bn and not bn.weight.requires_grad
    assert all(p is not bn.weight for g in opt.param_groups for p in g["params"])  # never in the optimizer
    before = bn.running_mean.clone(), bn.weight.clone()
    model.train()
    batch_norm_eval(frozen_bn)
    _step(model, opt)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.weight, before[1])
    assert model.net.decoder.training and not bn.training


def test_finetune_without_an_encoder_is_refused_on_one_line():
    assert model_spec("maskrcnn_resnet50_fpn").encoder is None and model_spec("unet").encoder is not None
    tree = {"data": {"source": {"images": "imgs"}, "format": "coco", "coco_json": "a.json",
                     "class_names": ["background", "building"]},
            "model": {"name": "maskrcnn_resnet50_fpn", "num_classes": 2}, "finetune": {"encoder_lr_mult": 0.1}}
    with pytest.raises(ConfigError) as err:
        check_finetune(TrainJobConfig.model_validate(tree))
    assert str(err.value) == ("finetune.encoder_lr_mult: model 'maskrcnn_resnet50_fpn' has no encoder to "
                              "fine-tune (remove the finetune section)")
    # U-Net and torchvision models: the contracting path / the backbone
    unet = build_model(ModelConfig(depth=2, base_width=4))
    assert {id(p) for p in model_encoder("unet", unet).parameters()} == \
        {id(p) for m in (unet.stem, unet.downs) for p in m.parameters()}
