"""Mask R-CNN from ModelConfig: registry, any band count, frozen stages, weights from files (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from segray.config import ModelConfig
from segray.core.models import build_model
from segray.core.models.maskrcnn import set_inference_limits

SMALL = dict(min_size=64, max_size=96, rpn_proposals_test=50, rpn_proposals_train=100, box_batch_size_per_image=32)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_build_forward_any_bands_and_config(name):
    cfg = ModelConfig(name=name, in_channels=4, num_classes=3, trainable_backbone_layers=1, box_score_thresh=0.0,
                      box_detections_per_img=7, anchor_sizes=[8, 16, 32, 64, 128], **SMALL)
    model = build_model(cfg)
    assert model.backbone.body.conv1.in_channels == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    trainable = {n.split(".")[2] for n, p in model.backbone.body.named_parameters(prefix="backbone.body") if p.requires_grad}
    assert trainable == {"layer4"}  # one stage from the top
    model.eval()
    with torch.no_grad():
        out = model([torch.randn(4, 70, 90), torch.randn(4, 50, 64)])
    assert len(out) == 2 and out[0]["masks"].shape[1:] == (1, 70, 90) and len(out[0]["boxes"]) <= 7
    set_inference_limits(model, score_threshold=1.01, max_detections=3)
    with torch.no_grad():
        assert len(model([torch.randn(4, 70, 90)])[0]["boxes"]) == 0


def test_full_weights_adapt_class_layers_and_bands(tmp_path):
    src = build_model(ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=91, **SMALL))
    path = tmp_path / "coco_like.pth"
    torch.save(src.state_dict(), path)
    dst = build_model(ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=3, in_channels=1, weights=str(path), **SMALL))
    s, d = src.state_dict(), dst.state_dict()
    torch.testing.assert_close(d["backbone.fpn.layer_blocks.0.0.weight"], s["backbone.fpn.layer_blocks.0.0.weight"])
    torch.testing.assert_close(d["roi_heads.box_head.fc6.weight"], s["roi_heads.box_head.fc6.weight"])
    assert d["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3  # re-initialised for 3 classes
    assert d["backbone.body.conv1.weight"].shape[1] == 1
    torch.testing.assert_close(d["backbone.body.conv1.weight"][:, 0], s["backbone.body.conv1.weight"].sum(1))
    with pytest.raises(ValueError, match="do not fit"):
        build_model(ModelConfig(name="maskrcnn_resnet50_fpn_v2", num_classes=3, weights=str(path), **SMALL))


def test_backbone_weights_only(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=2, backbone_weights=str(path),
                                    frozen_batch_norm=True, trainable_backbone_layers=0, **SMALL))
    torch.testing.assert_close(model.backbone.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    torch.save({"not": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="ResNet-50"):
        build_model(ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=2, backbone_weights=str(tmp_path / "junk.pth")))


def test_instance_steps_without_ray(tmp_path, shared_data):
    """listing -> read_decode_instances -> InstancePredictor -> encode_instances on real VOC files, as the
    Ray Data pipeline calls them; no detections at all is a normal row, not a crash."""
    from segray.config import SourceConfig
    from segray.core.checkpoint import make_payload, save_payload
    from segray.core.instances import decode_rle
    from segray.io.sources import list_samples
    from segray.infer.instance import INSTANCE_SCHEMA, InstancePredictor, encode_instances, instance_items, \
        read_decode_instances

    voc = shared_data / "voc_labelme_instances"
    names = (voc / "class_names.txt").read_text().split("\n")
    cfg = ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=len(names), **SMALL)
    ckpt = tmp_path / "m.pt"
    stats = {"mean": [110.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0]}
    save_payload(make_payload(build_model(cfg), cfg.model_dump(mode="json"), names, stats, task="instance",
                              ignore_index=255), str(ckpt))
    source = SourceConfig(images=str(voc / "JPEGImages"), masks=str(voc / "SegmentationObject"))
    items, _, _ = instance_items(list_samples(source), None, names, class_masks=str(voc / "SegmentationClass"))
    assert [i["class_mask"].endswith(f"SegmentationClass/{i['image_id']}.png") for i in items] == [True] * 3
    batch = {k: [it[k] for it in items] for k in items[0]}
    decoded = read_decode_instances(batch, num_classes=len(names), ignore_index=255)
    assert list(decoded["status"]) == ["ok"] * 3 and all(decoded["has_gt"])
    category_ids = list(range(len(names)))

    none = encode_instances(InstancePredictor(str(ckpt), score_threshold=1.0)(dict(decoded)), names, category_ids)
    assert none.schema == INSTANCE_SCHEMA
    for row in none.to_pylist():
        assert row["status"] == "ok" and row["num_instances"] == 0 and row["instances"] == []
        assert row["num_gt"] == len(row["gt_instances"]) > 0 and row["segm_ap"] == 0.0  # objects, none found
        assert {g["class_name"] for g in row["gt_instances"]} <= {"person", "bottle", "chair", "sofa", "bus", "car"}
        ids = np.asarray(Image.open(voc / "SegmentationObject" / f"{row['image_id']}.png"))
        assert sum(g["area"] for g in row["gt_instances"]) == int(((ids > 0) & (ids < 255)).sum())

    some = encode_instances(InstancePredictor(str(ckpt), score_threshold=0.0, max_detections=4)(dict(decoded)),
                            names, category_ids).to_pylist()
    for row in some:
        assert row["num_instances"] == len(row["instances"]) == 4
        for inst in row["instances"]:
            m = decode_rle(inst["mask"])
            assert m.shape == (row["height"], row["width"]) and inst["area"] == int(m.sum())
            assert inst["category_id"] == inst["label"] and inst["class_name"] == names[inst["label"]]
