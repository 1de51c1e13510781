"""Model families, input listers and row sinks: the seams the pipelines are wired through (no Ray here)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from segray.config import ConfigError, InferJobConfig, build_config
from segray.core.checkpoint import Checkpoint
from segray.infer.families import FAMILIES, family_of
from segray.infer.instance import INSTANCE_SCHEMA, InstancePredictor
from segray.infer.sinks import verify_rows
from segray.infer.steps import OUTPUT_SCHEMA, Predictor
from segray.io.fs import Sample
from segray.io.listing import table_of


def test_a_checkpoint_task_picks_its_family():
    assert family_of({"task": "instance"}) is FAMILIES["instance"]
    assert family_of({}).name == "semantic", "checkpoints from before tasks are semantic"
    assert family_of("semantic").schema == OUTPUT_SCHEMA and family_of("instance").schema == INSTANCE_SCHEMA
    with pytest.raises(ConfigError, match=r"unknown task 'panoptic'.*\['instance', 'semantic'\]"):
        family_of({"task": "panoptic"})


def test_families_give_the_images_pipeline_its_steps(tmp_path):
    cfg = build_config(InferJobConfig, {"source": {"images": str(tmp_path)}, "checkpoint": "c", "output": "o",
                                        "batch_size": 3})
    samples = [Sample(image=f"{tmp_path}/a.png", mask=None, image_id="a")]
    ckpt = Checkpoint(task="semantic", model_config={"name": "unet", "num_classes": 2}, class_names=["bg", "fg"],
                      model_state={}, ignore_index=255, bands=[2, 1, 0])
    stages = family_of(ckpt).image_stages(cfg, table_of(samples), ckpt)
    assert stages.items.to_pylist() == [{"image": f"{tmp_path}/a.png", "image_path_bytes": b"", "mask": "",
                             "mask_path_bytes": b"", "image_id": "a"}]
    assert stages.read_kwargs["bands"] == [2, 1, 0], "inputs are read with the bands the model was trained on"
    assert stages.predictor is Predictor and stages.predictor_kwargs["max_batch"] == 3
    assert stages.encode_kwargs == {"class_names": ["bg", "fg"], "ignore_index": 255}
    with pytest.raises(ConfigError, match="needs an instance"):
        family_of(ckpt).image_stages(cfg.model_copy(update={"coco_json": "x.json"}), table_of(samples), ckpt)
    assert issubclass(InstancePredictor, Predictor) and InstancePredictor.task == "instance"


def test_rows_are_verified_one_per_input_before_a_commit():
    verify_rows(pa.table({"source_path": ["a", "b"]}), ["b", "a"])
    for got in (["a"], ["a", "b", "b"], ["a", "c"]):
        with pytest.raises(RuntimeError, match="not committing"):
            verify_rows(pa.table({"source_path": got}), ["a", "b"])


def test_a_checkpoint_is_read_and_validated_once(tmp_path):
    import torch

    from segray.config import ModelConfig
    from segray.core.checkpoint import load_payload
    from segray.core.models import build_model

    cfg = ModelConfig(num_classes=3, depth=1, base_width=4)
    ckpt = Checkpoint.of(build_model(cfg), cfg.model_dump(mode="json"), ["a", "b", "c"],
                         {"mean": [1.0, 2.0, 3.0], "std": [2.0, 2.0, 2.0]}, metrics={"val_miou": 0.5})
    ckpt.save(str(tmp_path / "c.pt"))
    back = Checkpoint.load(str(tmp_path / "c.pt"))
    assert back.id and back.id == Checkpoint.load((tmp_path / "c.pt").read_bytes()).id
    assert (back.task, back.model_name, back.num_classes, back.class_names) == ("semantic", "unet", 3, ["a", "b", "c"])
    assert back.model() == cfg and back.metrics == {"val_miou": 0.5}
    mean, std = back.normalization()
    assert mean.shape == (3, 1, 1) and float(mean[2]) == 3.0 and float(std[0]) == 2.0
    assert load_payload(str(tmp_path / "c.pt"))["format"] == "segray/1"

    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a segray checkpoint"):
        Checkpoint.load(str(tmp_path / "bad.pt"))
    payload = ckpt.to_payload()
    torch.save({**payload, "model_config": {"name": "no_such_model", "num_classes": 2}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="model_config does not validate"):
        Checkpoint.load(str(tmp_path / "odd.pt"))
    del payload["class_names"]
    torch.save(payload, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="without class_names"):
        Checkpoint.load(str(tmp_path / "cut.pt"))


def test_every_registered_model_family_has_its_training_and_inference_parts():
    from segray.core.models import MODELS
    from segray.train.tasks import TASKS

    families = {spec.family for spec in MODELS.values()}
    assert families == {"semantic", "instance"}
    for name in families:
        assert family_of(name).name == name and family_of(name).scenes is not None, name
        assert TASKS[name].name == name, name


def test_every_kind_of_source_has_one_lister(tmp_path):
    from segray.config import SourceConfig
    from segray.io.sources import LISTERS, list_samples, source_kind

    (tmp_path / "img").mkdir()
    for name in ("b.png", "a.png", "notes.txt"):
        (tmp_path / "img" / name).write_bytes(b"x")
    (tmp_path / "list.csv").write_text("image,mask\nimg/b.png,img/a.png\n")
    sources = {"images": SourceConfig(images=str(tmp_path / "img")),
               "glob": SourceConfig(glob=str(tmp_path / "img" / "*.png")),
               "manifest": SourceConfig(manifest=str(tmp_path / "list.csv"))}
    assert set(LISTERS) == set(sources)
    assert {kind: source_kind(src) for kind, src in sources.items()} == {k: k for k in sources}
    assert [s.image_id for s in list_samples(sources["images"])] == ["a", "b"], "listing order is stable"
    assert [s.image_id for s in list_samples(sources["glob"])] == ["a", "b"]
    (only,) = list_samples(sources["manifest"])
    assert only.image.endswith("img/b.png") and only.mask.endswith("img/a.png")
