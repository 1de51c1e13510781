import numpy as np
import pytest
from PIL import Image

from segray.core.masks import class_fractions
from segray.demo.scenes import DEMO_CLASSES, make_scene, write_demo_dataset

K = len(DEMO_CLASSES)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_scene(128, np.random.default_rng([42, i])) for i in range(12)]


def test_classes():
    assert DEMO_CLASSES == ["background", "building", "road", "water", "vegetation"]


@pytest.mark.parametrize("size, shape", [(128, (128, 128)), ((96, 160), (96, 160)), (32, (32, 32))])
def test_shapes_and_dtypes(size, shape):
    img, mask = make_scene(size, np.random.default_rng(0))
    assert img.shape == (*shape, 3) and img.dtype == np.uint8
    assert mask.shape == shape and mask.dtype == np.uint8
    assert mask.max() < K


def test_deterministic_per_seed():
    a_img, a_mask = make_scene(96, np.random.default_rng(7))
    b_img, b_mask = make_scene(96, np.random.default_rng(7))
    c_img, _ = make_scene(96, np.random.default_rng(8))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_every_class_usually_present(scenes):
    present = np.array([[(mask == k).any() for k in range(K)] for _, mask in scenes])
    assert present.any(axis=0).all()
    assert (present.mean(axis=0) >= 0.75).all(), present.mean(axis=0)


def test_class_balance_not_degenerate(scenes):
    total = np.mean([class_fractions(mask, K) for _, mask in scenes], axis=0)
    assert total.max() <= 0.85, total
    assert total.min() >= 0.01, total


def test_classes_are_textured_not_flat(scenes):
    """Each class varies in colour within and across scenes: no single colour identifies it."""
    pixels = {k: [] for k in range(K)}
    for img, mask in scenes:
        for k in range(K):
            pixels[k].append(img[mask == k].astype(np.float32))
    for k, chunks in pixels.items():
        std = np.concatenate(chunks).std(axis=0)
        assert (std > 4).all(), (DEMO_CLASSES[k], std)


def test_write_demo_dataset(tmp_path):
    info = write_demo_dataset(tmp_path / "demo", num_images=3, size=64, seed=5)
    assert info["count"] == 3 and info["class_names"] == DEMO_CLASSES
    images = sorted(p.name for p in (tmp_path / "demo" / "images").iterdir())
    masks = sorted(p.name for p in (tmp_path / "demo" / "masks").iterdir())
    assert images == masks == ["scene_0000.png", "scene_0001.png", "scene_0002.png"]
    assert (tmp_path / "demo" / "classes.txt").read_text().split() == DEMO_CLASSES

    img = np.asarray(Image.open(f"{info['images']}/scene_0001.png"))
    with Image.open(f"{info['masks']}/scene_0001.png") as m:
        assert m.mode == "L"
        mask = np.asarray(m)
    want_img, want_mask = make_scene(64, np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(img, want_img)
    np.testing.assert_array_equal(mask, want_mask)


def test_write_demo_dataset_deterministic(tmp_path):
    write_demo_dataset(tmp_path / "a", num_images=2, size=48, seed=1)
    write_demo_dataset(tmp_path / "b", num_images=2, size=48, seed=1)
    for sub in ("images", "masks"):
        for name in ("scene_0000.png", "scene_0001.png"):
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes()
