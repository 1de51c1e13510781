import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segray.cli import app
from segray.config import (
    ActorPoolConfig,
    ConfigError,
    DemoJobConfig,
    ImagePoolConfig,
    InferJobConfig,
    MaskRCNNConfig,
    ModelConfig,
    NightlyJobConfig,
    SceneInferJobConfig,
    TorchvisionSegConfig,
    TrainJobConfig,
    UNetConfig,
    build_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"source": {"images": "imgs", "masks": "masks"}}}


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(TrainJobConfig, path, ["train.epochs=3", "model.up=bilinear", "loss.class_weights=[1, 2]"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.up == "bilinear" and cfg.loss.class_weights == [1.0, 2.0]
    assert cfg.data.source.images == "imgs"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.epocs=3", "train.epocs"),
        ("model.name=resnet9000", "model.name"),
        ("model.up=cubic", "model.up"),
        ("loss.terms=[{name: bce}]", "loss.terms"),
        ("data.val_fraction=1.5", "data.val_fraction"),
    ],
)
def test_bad_field_is_named(override, field):
    with pytest.raises(ConfigError) as err:
        build_config(TrainJobConfig, MINIMAL, [override])
    assert field.split(".")[-1] in str(err.value) or field.split(".")[0] in str(err.value)
    if "epocs" in field:
        assert "train.epocs" in str(err.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="class_names"):
        build_config(TrainJobConfig, MINIMAL, ["model.num_classes=5"])
    with pytest.raises(ConfigError, match="exactly one of images, glob, manifest"):
        build_config(InferJobConfig, {"source": {}, "checkpoint": "c", "output": "o"})


INSTANCE = {"data": {"source": {"images": "imgs"}, "format": "coco", "coco_json": "a.json",
                     "class_names": ["background", "building"]},
            "model": {"name": "maskrcnn_resnet50_fpn", "num_classes": 2}}


@pytest.mark.parametrize("override, match", [
    ("data.bands=[1, 2]", "data.bands"),
    ("data.val_fraction=0", "train.metric"),
    ("loss.terms=[{name: dice}]", "loss"),
    ("train.metric=val_miou", "train.metric"),
    ("model.num_classes=3", "class_names"),
])
def test_instance_configs_get_the_same_checks(override, match):
    cfg = build_config(TrainJobConfig, INSTANCE)
    assert cfg.train.metric == "val_segm_ap"  # the task's default metric
    assert TrainJobConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # as the Train workers receive it
    with pytest.raises(ConfigError, match=match):
        build_config(TrainJobConfig, INSTANCE, [override])


def test_example_configs_validate():
    load_config(TrainJobConfig, REPO / "configs" / "demo_train.yaml")
    load_config(InferJobConfig, REPO / "configs" / "demo_infer.yaml")


def test_cli_fails_fast_naming_the_field_before_ray_starts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    # A fresh interpreter, so Ray started by other tests in this session cannot mask a late failure.
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from segray.cli import app\n"
        f"r = CliRunner().invoke(app, ['train', {str(path)!r}, '--set', 'train.num_workers=-1'])\n"
        "print(r.exit_code); print(r.output)\n"
        "print('RAY_STARTED', 'ray' in sys.modules and sys.modules['ray'].is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    assert out.splitlines()[0] == "2"
    assert "train.num_workers" in out
    assert "RAY_STARTED False" in out

    result = CliRunner().invoke(app, ["infer", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_help_explains_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("demo", "train", "infer", "show-config"):
        assert cmd in result.output
    result = CliRunner().invoke(app, ["infer", "--help"])
    assert "--set" in result.output and "Parquet" in result.output


# --------------------------------------------------------------------------- model configs (a union keyed by name)

# What a checkpoint written before the per-model configs holds: the flat ModelConfig, every field.
OLD_FLAT = {
    "name": "unet", "in_channels": 3, "num_classes": 2, "depth": 4, "base_width": 32, "batch_norm": True,
    "dropout": 0.0, "sync_batch_norm": False, "down": "maxpool", "up": "transpose", "weights": None,
    "backbone_weights": None, "trainable_backbone_layers": 3, "frozen_batch_norm": False, "min_size": 800,
    "max_size": 1333, "anchor_sizes": [32, 64, 128, 256, 512], "aspect_ratios": [0.5, 1.0, 2.0],
    "box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100, "mask_threshold": 0.5,
    "rpn_proposals_train": 2000, "rpn_proposals_test": 1000, "box_batch_size_per_image": 512,
}


def test_model_section_picks_its_class_by_name():
    assert type(build_config(TrainJobConfig, MINIMAL).model) is UNetConfig  # no model section at all
    cfg = build_config(TrainJobConfig, MINIMAL, ["model.depth=2"])  # a section without name: unet
    assert type(cfg.model) is UNetConfig and cfg.model.depth == 2
    fcn = build_config(TrainJobConfig, MINIMAL, ["model.name=deeplabv3_resnet50"]).model
    assert type(fcn) is TorchvisionSegConfig and set(fcn.model_dump()) == {
        "name", "in_channels", "num_classes", "weights", "sync_batch_norm"}
    mrcnn = build_config(TrainJobConfig, INSTANCE, ["model.min_size=128", "model.max_size=256"]).model
    assert type(mrcnn) is MaskRCNNConfig and mrcnn.family == "instance" and mrcnn.min_size == 128
    # a dump validates back to the same class (what Train workers and checkpoints receive)
    assert TrainJobConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    # ModelConfig(...) and ModelConfig.model_validate dispatch the same way
    assert type(ModelConfig(depth=2)) is UNetConfig and type(ModelConfig()) is UNetConfig
    assert type(ModelConfig(name="maskrcnn_resnet50_fpn_v2", min_size=64, max_size=96)) is MaskRCNNConfig
    assert type(ModelConfig.model_validate({"name": "fcn_resnet50"})) is TorchvisionSegConfig
    assert isinstance(UNetConfig(), ModelConfig)


@pytest.mark.parametrize("cfg, override, message", [
    (MINIMAL, "model.min_size=256",
     "model.min_size: not a field of model 'unet' (it belongs to maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2)"),
    (MINIMAL, "model.backbone_weights=w.pth", "model.backbone_weights: not a field of model 'unet'"),
    (INSTANCE, "model.depth=3", "model.depth: not a field of model 'maskrcnn_resnet50_fpn' (it belongs to unet)"),
    (MINIMAL, "model.dept=3", "model.dept: not a field of model 'unet' (its fields: name, in_channels,"),
])
def test_a_field_of_another_model_fails_on_one_line(cfg, override, message):
    with pytest.raises(ConfigError) as err:
        build_config(TrainJobConfig, cfg, [override])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(message)  # "invalid config:" + one line
    with pytest.raises(ConfigError, match="model.depth: not a field of model 'fcn_resnet50'"):
        build_config(TrainJobConfig, {**MINIMAL, "model": {"name": "fcn_resnet50", "depth": 3}})
    with pytest.raises(ConfigError, match="model: give a mapping"):
        build_config(TrainJobConfig, {**MINIMAL, "model": "unet"})


def test_every_example_config_loads():
    """configs/*.yaml (written for the flat model section) load unchanged."""
    jobs = {"demo_train": TrainJobConfig, "scenes_train": TrainJobConfig, "train_instance": TrainJobConfig,
            "train_smp": TrainJobConfig,
            "demo_infer": InferJobConfig, "infer_instance": InferJobConfig, "scenes_infer": SceneInferJobConfig,
            "stac_scenes": SceneInferJobConfig,
            "nightly": NightlyJobConfig, "nightly_iceberg": NightlyJobConfig}
    assert {p.stem for p in (REPO / "configs").glob("*.yaml")} <= set(jobs)
    for stem, cls in jobs.items():
        path = REPO / "configs" / f"{stem}.yaml"
        if path.exists():
            load_config(cls, path)


@pytest.mark.parametrize("name", ["unet", "fcn_resnet50", "deeplabv3_resnet50", "maskrcnn_resnet50_fpn",
                                  "maskrcnn_resnet50_fpn_v2"])
def test_old_flat_checkpoint_dumps_still_load(name):
    # Semantic configs used to accept (and ignore) Mask R-CNN fields, so old dumps may hold
    # non-default values there too: any field another model owns is dropped.
    dump = {**OLD_FLAT, "name": name, "depth": 2, "min_size": 512}
    cfg = ModelConfig.from_checkpoint(dump)
    assert cfg.name == name and set(cfg.model_dump()) == set(type(cfg).model_fields)
    if name == "unet":
        assert cfg.depth == 2
    if name.startswith("maskrcnn"):
        assert cfg.min_size == 512
    # a new dump round-trips; a field no model knows still fails
    assert ModelConfig.from_checkpoint(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValueError, match="not a field of model"):
        ModelConfig.from_checkpoint({**dump, "colour": "red"})
    with pytest.raises(ValueError, match="not a field of model"):
        ModelConfig.model_validate(dump)  # validating a config (not a checkpoint) stays strict


def test_demo_model_follows_the_task():
    assert type(build_config(DemoJobConfig, {}).model) is UNetConfig
    assert type(build_config(DemoJobConfig, {}, ["task=instance"]).model) is MaskRCNNConfig
    with pytest.raises(ConfigError, match="model.min_size: not a field of model 'unet'"):
        build_config(DemoJobConfig, {}, ["model.min_size=128"])


# --------------------------------------------------------------------------- shared job sections


def test_inference_jobs_share_the_actor_pool():
    pool = {"batch_size": 4, "num_actors": 3, "num_gpus_per_actor": 0.5, "cpus_per_actor": 1.0, "cpus_per_task": 0.25}
    base = {"source": {"images": "i"}, "checkpoint": "c", "output": "o"}
    for cls in (InferJobConfig, SceneInferJobConfig):
        assert issubclass(cls, ActorPoolConfig)
        cfg = build_config(cls, {**base, **pool})  # flat in these jobs' YAML
        assert {k: getattr(cfg, k) for k in pool} == pool
        assert not {"actors", "pool"} & set(cfg.model_dump())
    assert SceneInferJobConfig(**base).batch_size == 8 and InferJobConfig(**base).batch_size == 16
    # A nightly run holds them in its infer section; the flat shape of earlier versions still loads.
    nightly = build_config(NightlyJobConfig, {**base, **pool, "max_pixels": 1000})
    assert isinstance(nightly.infer, ActorPoolConfig) and "batch_size" not in nightly.model_dump()
    infer = nightly.infer_config("out")
    assert infer.output == "out" and {k: getattr(infer, k) for k in ImagePoolConfig.model_fields} == {
        **pool, "max_pixels": 1000, "out_of_range": "warn"}


def test_config_package_is_the_lowest_layer():
    """segray.config imports nothing else of segray (and no torch): the model registry points at it."""
    probe = ("import json, sys, segray.config\n"
             "print(json.dumps([m for m in sys.modules if m.startswith(('segray', 'torch'))]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    loaded = json.loads(out.stdout)
    assert all(m == "segray" or m.startswith("segray.config") for m in loaded), loaded


def test_a_nightly_config_contains_the_infer_run_settings_and_old_flat_configs_load():
    from segray.config import ImageRunConfig

    base = {"source": {"images": "s3://a/images"}, "checkpoint": "c", "output": "o"}
    nested = build_config(NightlyJobConfig, {**base, "infer": {"batch_size": 4, "max_detections": 3}})
    flat = build_config(NightlyJobConfig, {**base, "batch_size": 4, "max_detections": 3})
    assert isinstance(nested.infer, ImageRunConfig) and nested == flat
    run = flat.infer_config("o/run_date=2025-01-01")
    assert (run.batch_size, run.max_detections, run.output) == (4, 3, "o/run_date=2025-01-01")
    assert set(ImageRunConfig.model_fields) <= set(InferJobConfig.model_fields), "the same settings as segray infer"
    with pytest.raises(ConfigError, match="infer.batch_size: given both"):
        build_config(NightlyJobConfig, {**base, "batch_size": 4, "infer": {"batch_size": 8}})
    with pytest.raises(ConfigError, match="infer.bogus"):
        build_config(NightlyJobConfig, {**base, "infer": {"bogus": 1}})
