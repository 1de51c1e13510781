import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segray.cli import app
from segray.config import ConfigError, InferJobConfig, TrainJobConfig, build_config, load_config

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
