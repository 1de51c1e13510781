"""Instance targets: id masks, COCO polygons/RLE, RLE round trips, joint flips, demo scenes, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segray.config import ConfigError, DemoJobConfig, InferJobConfig, TrainJobConfig, build_config, load_config
from segray.core.instances import (
    CocoIndex, Instances, augment_instances, boxes_from_masks, coco_segmentation_rle, decode_rle, decode_rles,
    encode_rle, encode_rles, hflip, instances_from_coco, instances_from_id_mask, rot90, vflip)
from segray.demo.instance_scenes import (
    INSTANCE_DEMO_CLASSES, label_components, make_instance_scene, write_instance_demo_dataset)

REPO = Path(__file__).resolve().parents[2]


def _voc(shared: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    root = shared / "voc_labelme_instances"
    return (np.asarray(Image.open(root / "SegmentationObject" / f"{stem}.png")).astype(np.int64),
            np.asarray(Image.open(root / "SegmentationClass" / f"{stem}.png")).astype(np.int64))


# --------------------------------------------------------------------------- RLE


def test_rle_round_trip_and_area_on_real_masks(shared_data):
    ids = np.asarray(Image.open(shared_data / "spacenet4_atlanta_solaris" / "instance_labels_derived.png"))
    masks = np.stack([ids == k for k in range(1, int(ids.max()) + 1)]).astype(np.uint8)
    rles = encode_rles(masks)
    assert len(rles) == 43 and all(isinstance(r["counts"], str) and r["size"] == [900, 900] for r in rles)
    np.testing.assert_array_equal(decode_rles(rles, 900, 900), masks)
    np.testing.assert_array_equal(decode_rle(rles[5]), masks[5])
    assert [int(mask_utils.area({"size": r["size"], "counts": r["counts"].encode()})) for r in rles] == \
        masks.reshape(43, -1).sum(1).tolist()
    json.dumps(rles)  # JSON-ready as is
    with pytest.raises(ValueError, match="size"):
        decode_rles(rles, 90, 900)


def test_uncompressed_rle_decodes_like_compressed():
    m = np.zeros((7, 5), np.uint8)
    m[2:5, 1:3] = 1
    # column-major runs: 0s, 1s, 0s ...
    flat = m.flatten(order="F")
    counts, last, run = [], 0, 0
    for v in flat:
        if v != last:
            counts.append(run)
            run, last = 0, v
        run += 1
    counts.append(run)
    np.testing.assert_array_equal(decode_rle({"size": [7, 5], "counts": counts}), m)
    assert coco_segmentation_rle({"size": [7, 5], "counts": counts}, 7, 5) == encode_rle(m)


# --------------------------------------------------------------------------- instance-id masks


def test_instances_from_voc_id_mask_with_class_map(shared_data):
    ids, classes = _voc(shared_data, "2011_000006")
    inst, warnings = instances_from_id_mask(ids, classes, ignore_index=255, num_classes=21)
    present = [v for v in np.unique(ids) if v not in (0, 255)]
    assert len(inst) == len(present) and not warnings
    for k, v in enumerate(present):
        np.testing.assert_array_equal(inst.masks[k], ids == v)
        under = classes[ids == v]
        under = under[(under != 0) & (under != 255)]
        assert inst.labels[k] == np.bincount(under).argmax()
        rows, cols = np.nonzero(ids == v)
        assert inst.boxes[k].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert set(inst.labels.tolist()) <= {9, 15, 18}  # chair, person, sofa in this image
    with pytest.raises(ValueError, match="outside"):
        instances_from_id_mask(ids, classes, ignore_index=255, num_classes=10)


def test_instances_one_class_for_all_and_ignored_pixels(shared_data):
    ids = np.asarray(Image.open(shared_data / "pennfudan_torchvision_1" / "FudanPed00054_mask.png")).astype(np.int64)
    inst, _ = instances_from_id_mask(ids)
    assert len(inst) == 3 and inst.labels.tolist() == [1, 1, 1] and inst.size == ids.shape
    assert (inst.boxes[:, 2] > inst.boxes[:, 0]).all() and (inst.boxes[:, 3] > inst.boxes[:, 1]).all()
    ids2 = ids.copy()
    ids2[ids == 2] = 255
    inst2, _ = instances_from_id_mask(ids2, ignore_index=255)
    assert len(inst2) == 2
    cls = np.zeros_like(ids)
    cls[ids == 1] = 3
    inst3, warnings = instances_from_id_mask(ids, cls)
    assert inst3.labels.tolist() == [3] and len(warnings) == 2  # objects on background only are dropped


def test_one_pixel_object_has_a_positive_box():
    ids = np.zeros((6, 6), np.int64)
    ids[2, 4] = 1
    inst, _ = instances_from_id_mask(ids)
    assert inst.boxes.tolist() == [[4, 2, 5, 3]]


def test_instances_json_round_trip():
    ids = np.zeros((20, 30), np.int64)
    ids[2:8, 3:9], ids[10:19, 20:29] = 1, 2
    inst, _ = instances_from_id_mask(ids)
    inst.iscrowd[1] = True
    back = Instances.from_json(inst.to_json())
    np.testing.assert_array_equal(back.masks, inst.masks)
    np.testing.assert_array_equal(back.boxes, inst.boxes)
    assert back.labels.tolist() == [1, 1] and back.iscrowd.tolist() == [False, True]
    empty = Instances.from_json(Instances.empty(5, 7).to_json())
    assert len(empty) == 0 and empty.masks.shape == (0, 5, 7) and empty.boxes.shape == (0, 4)


# --------------------------------------------------------------------------- COCO JSON


def _labelme_coco(shared: Path) -> dict:
    """VOC labelme polygons (real annotations) as a COCO file."""
    root = shared / "voc_labelme_instances"
    names = (root / "class_names.txt").read_text().split("\n")
    coco: dict = {"images": [], "annotations": [], "categories": []}
    cats: dict[str, int] = {}
    for n, path in enumerate(sorted((root / "labelme_json").glob("*.json")), start=1):
        d = json.loads(path.read_text())
        coco["images"].append({"id": n, "file_name": f"JPEGImages/{path.stem}.jpg",
                               "height": d["imageHeight"], "width": d["imageWidth"]})
        objects: dict = {}  # shapes sharing a group_id are one object (several polygons)
        for k, s in enumerate(d["shapes"]):
            if s["label"] == "__ignore__":  # void regions
                continue
            key = (s["label"], s["group_id"]) if s["group_id"] is not None else (s["label"], f"shape{k}")
            objects.setdefault(key, []).append([float(v) for p in s["points"] for v in p])
        for (label, _), polys in objects.items():
            cid = cats.setdefault(label, 100 + names.index(label))
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": n, "category_id": cid,
                                        "segmentation": polys, "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 0]})
    coco["categories"] = [{"id": i, "name": k} for k, i in cats.items()]
    return coco


def test_coco_polygons_rasterise_like_pycocotools(shared_data):
    coco = _labelme_coco(shared_data)
    index = CocoIndex.parse(json.dumps(coco))
    names = (shared_data / "voc_labelme_instances" / "class_names.txt").read_text().split("\n")
    labels = index.category_labels(names)
    assert labels == {c["id"]: c["id"] - 100 for c in coco["categories"]}
    for image_id, im in index.images.items():
        anns = index.annotations[image_id]
        inst = instances_from_coco(anns, im["height"], im["width"], labels)
        assert len(inst) == len(anns)
        for k, a in enumerate(anns):
            expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"])))
            np.testing.assert_array_equal(inst.masks[k], expected)
            assert inst.labels[k] == labels[a["category_id"]]
        # The polygons trace the VOC instance masks: most pixels agree.
        ids, _ = _voc(shared_data, im["file_name"].split("/")[-1][:-4])
        union = inst.masks.any(0)
        assert (union == (ids > 0)).mean() > 0.9
    with pytest.raises(ValueError, match="class_names"):
        index.category_labels(["background", "person"])


def test_coco_rle_segmentations_and_crowd(shared_data):
    ids = np.asarray(Image.open(shared_data / "pennfudan_torchvision_1" / "FudanPed00054_mask.png"))
    h, w = ids.shape
    rles = encode_rles(np.stack([ids == k for k in (1, 2, 3)]))
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": rles[0], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": {"size": [h, w], "counts": rles[1]["counts"].encode()},
             "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 1, "segmentation": rles[2], "iscrowd": 1}]
    inst = instances_from_coco(anns, h, w, {1: 1})
    for k in range(3):
        np.testing.assert_array_equal(inst.masks[k], ids == k + 1)
    assert inst.iscrowd.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="size"):
        instances_from_coco(anns, h + 1, w, {1: 1})


def test_coco_file_names_match_urls_on_path_boundaries():
    index = CocoIndex.parse({"images": [{"id": 3, "file_name": "JPEGImages/a.jpg"}, {"id": 4, "file_name": "b.png"},
                                        {"id": 5, "file_name": "missing.png"}], "annotations": [], "categories": []})
    urls = ["s3://bkt/voc/JPEGImages/a.jpg", "/data/x/b.png", "/data/x/ab.png", "/data/JPEGImages2/a.jpg"]
    assert index.match(urls) == {3: 0, 4: 1}
    with pytest.raises(ValueError, match="matches 2"):
        index.match(urls + ["/other/b.png"])
    with pytest.raises(ValueError, match="not listed"):
        CocoIndex.parse({"images": [], "annotations": [{"id": 1, "image_id": 9}]})


# --------------------------------------------------------------------------- joint transforms


def _random_instances(rng, h=23, w=31, n=4) -> tuple[np.ndarray, Instances]:
    masks = np.zeros((n, h, w), np.uint8)
    for k in range(n):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        masks[k, y : y + rng.integers(1, 4), x : x + rng.integers(1, 6)] = 1
    return rng.normal(size=(3, h, w)).astype(np.float32), Instances(boxes_from_masks(masks), np.arange(1, n + 1), masks)


@pytest.mark.parametrize("op", [hflip, vflip, lambda im, i: rot90(im, i, 1), lambda im, i: rot90(im, i, 2),
                                lambda im, i: rot90(im, i, 3)])
def test_flips_keep_boxes_masks_and_pixels_consistent(op):
    rng = np.random.default_rng(0)
    image, inst = _random_instances(rng)
    marker = image.copy()
    marker[0] = 0
    marker[0][inst.masks[0] > 0] = 1  # band 0 marks object 0's pixels
    out_img, out = op(marker, inst)
    np.testing.assert_array_equal(out.boxes, boxes_from_masks(out.masks))
    np.testing.assert_array_equal(out_img[0] > 0, out.masks[0] > 0)  # pixels moved with the mask
    assert out.masks.shape[1:] == out_img.shape[1:] and out.labels.tolist() == inst.labels.tolist()


def test_augment_instances_is_consistent_and_varies():
    from segray.config import AugmentConfig

    rng = np.random.default_rng(1)
    image, inst = _random_instances(rng, 20, 20)
    cfg = AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, brightness=0.1, contrast=0.1)
    seen = set()
    for _ in range(12):
        img, out = augment_instances(image, inst, cfg, rng)
        np.testing.assert_array_equal(out.boxes, boxes_from_masks(out.masks))
        assert img.dtype == np.float32 and img.flags.c_contiguous and out.masks.flags.c_contiguous
        seen.add(out.masks.tobytes())
    assert len(seen) > 2


# --------------------------------------------------------------------------- demo scenes


def test_label_components():
    b = np.zeros((6, 8), bool)
    b[0:2, 0:2] = b[4:6, 5:8] = b[0, 6] = True
    lab = label_components(b)
    assert lab.max() == 3 and set(np.unique(lab[b])) == {1, 2, 3} and (lab[~b] == 0).all()
    assert len(np.unique(lab[0:2, 0:2])) == 1


def test_instance_scenes_have_separate_objects_of_every_class():
    seen = set()
    for i in range(6):
        img, ids, classes = make_instance_scene((96, 128), np.random.default_rng([5, i]))
        assert img.shape == (96, 128, 3) and ids.shape == classes.shape == (96, 128)
        n = int(ids.max())
        assert n > 0 and set(np.unique(ids)) == set(range(n + 1))  # ids are 1..N, none missing
        for k in range(1, n + 1):
            assert len(np.unique(classes[ids == k])) == 1  # one class per object
        assert ((ids > 0) == (classes > 0)).all()
        seen |= set(np.unique(classes).tolist())
    assert seen == set(range(len(INSTANCE_DEMO_CLASSES)))


def test_write_instance_demo_dataset_matches_its_coco_file(tmp_path):
    d = write_instance_demo_dataset(tmp_path, 3, 96, seed=2)
    coco = json.loads(Path(d["coco_json"]).read_text())
    assert [c["name"] for c in coco["categories"]] == INSTANCE_DEMO_CLASSES[1:]
    shapes = set()
    for im in coco["images"]:
        ids = np.asarray(Image.open(Path(d["masks"]) / im["file_name"]))
        assert ids.shape == (im["height"], im["width"])
        shapes.add(ids.shape)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == ids.max()
        inst = instances_from_coco(anns, *ids.shape, {k: k for k in (1, 2, 3)})
        for k in range(len(anns)):
            np.testing.assert_array_equal(inst.masks[k], ids == k + 1)
    assert all(s[0] in (96, 72) and s[1] in (96, 72) for s in shapes)


# --------------------------------------------------------------------------- configs


INSTANCE = {"data": {"source": {"images": "i", "masks": "m"}, "format": "instance_masks",
                     "class_names": ["background", "person"]},
            "model": {"name": "maskrcnn_resnet50_fpn", "num_classes": 2}}


def test_instance_config_defaults_and_checks():
    cfg = build_config(TrainJobConfig, INSTANCE)
    assert cfg.task == "instance" and cfg.train.metric == "val_segm_ap"
    for override, field in [
        ("model.name=unet", "model.name"),
        ("model.num_classes=3", "class_names"),
        ("data.format=coco", "coco_json"),
        ("data.image_size=128", "image_size"),
        ("train.metric=val_miou", "train.metric"),
        ("model.min_size=2000", "min_size"),
        ("model.anchor_sizes=[8, 16]", "anchor_sizes"),
        ("model.trainable_backbone_layers=6", "trainable_backbone_layers"),
        ("data.coco_json=x.json", "coco_json"),
    ]:
        with pytest.raises(ConfigError, match=field):
            build_config(TrainJobConfig, INSTANCE, [override])
    semantic = build_config(TrainJobConfig, {"data": {"source": {"images": "i", "masks": "m"}}})
    assert semantic.task == "semantic" and semantic.train.metric == "val_miou"
    with pytest.raises(ConfigError, match="data.format"):
        build_config(TrainJobConfig, {"data": {"source": {"images": "i", "masks": "m"}}},
                     ["model.name=maskrcnn_resnet50_fpn"])
    with pytest.raises(ConfigError, match="class_masks"):
        build_config(TrainJobConfig, {"data": {"source": {"images": "i", "masks": "m"}, "class_masks": "c"}})
    with pytest.raises(ConfigError, match="backbone_weights"):
        build_config(TrainJobConfig, {"data": {"source": {"images": "i", "masks": "m"}}}, ["model.backbone_weights=x"])


def test_demo_config_switches_to_mask_rcnn():
    cfg = build_config(DemoJobConfig, {}, ["task=instance", "train.epochs=1"])
    assert cfg.model.name == "maskrcnn_resnet50_fpn" and cfg.model.num_classes == len(INSTANCE_DEMO_CLASSES)
    assert cfg.train.metric == "val_segm_ap" and cfg.train.batch_size == 2 and cfg.train.epochs == 1
    assert build_config(DemoJobConfig, {}).model.name == "unet"
    refined = build_config(DemoJobConfig, {}, ["task=instance", "model.min_size=128", "model.max_size=160"])
    assert refined.model.name == "maskrcnn_resnet50_fpn" and refined.model.min_size == 128
    assert refined.model.anchor_sizes == [8, 16, 32, 64, 128]  # the rest stays the demo's
    with pytest.raises(ConfigError, match="model.name"):
        build_config(DemoJobConfig, {}, ["task=instance", "model.name=unet"])


def test_instance_example_configs_validate():
    cfg = load_config(TrainJobConfig, REPO / "configs" / "train_instance.yaml")
    assert cfg.task == "instance" and cfg.data.format == "coco" and cfg.train.metric == "val_segm_ap"
    infer = load_config(InferJobConfig, REPO / "configs" / "infer_instance.yaml")
    assert infer.coco_json and infer.score_threshold is not None
