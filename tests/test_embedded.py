"""Embedded datasets: deterministic, typed, and the labels describe the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, DatasetDict, Image, List, Value

from hf_tlmtl import embedded
from hf_tlmtl.data.embedded import COLORS, PHOTOS, SHAPES, load_embedded_dataset


def _pixels(dataset) -> np.ndarray:
    return np.stack([np.asarray(row["image"]) for row in dataset])


@pytest.fixture(scope="module")
def shapes() -> DatasetDict:
    return load_embedded_dataset("shapes", n_train=240, n_eval=40, image_size=32, seed=0)


def test_shapes_features_and_sizes(shapes):
    assert isinstance(shapes, DatasetDict) and set(shapes) == {"train", "validation"}
    assert (shapes["train"].num_rows, shapes["validation"].num_rows) == (240, 40)
    features = shapes["train"].features
    assert isinstance(features["image"], Image)
    assert isinstance(features["shape"], ClassLabel) and features["shape"].names == SHAPES
    assert isinstance(features["color"], ClassLabel) and features["color"].names == list(COLORS)
    for factor in ("scale", "rotation", "pos_x", "pos_y"):
        assert features[factor] == Value("float32")
        values = np.asarray(shapes["train"][factor])
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 0.2
    assert isinstance(features["marks"], List) and isinstance(features["marks"].feature, ClassLabel)
    image = shapes["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    # Every class of the class factors occurs.
    assert set(shapes["train"]["shape"]) == set(range(len(SHAPES)))
    assert set(shapes["train"]["color"]) == set(range(len(COLORS)))
    marks = shapes["train"]["marks"]
    assert any(len(m) == 0 for m in marks) and any(len(m) == 3 for m in marks)


def test_shapes_deterministic_by_seed(shapes):
    again = load_embedded_dataset("shapes", n_train=240, n_eval=40, image_size=32, seed=0)
    np.testing.assert_array_equal(_pixels(shapes["train"]), _pixels(again["train"]))
    assert shapes["train"]["scale"] == again["train"]["scale"]
    assert shapes["validation"]["marks"] == again["validation"]["marks"]
    other = load_embedded_dataset("shapes", n_train=240, n_eval=40, image_size=32, seed=1)
    assert not np.array_equal(_pixels(shapes["train"]), _pixels(other["train"]))
    # Train and validation come from different streams.
    assert shapes["train"]["scale"][:40] != shapes["validation"]["scale"]


def test_shapes_labels_match_pixels(shapes):
    """Scale drives the shape's area; pos_x drives its horizontal centre; color its dominant channel."""
    train = shapes["train"]
    pixels = _pixels(train).astype(np.float32)
    foreground = np.abs(pixels - pixels[:, :1, :1, :]).sum(-1) > 60  # differs from the corner (background)
    plain = np.array([len(m) == 0 for m in train["marks"]])  # no outline / dot / speckles
    area = foreground.sum((1, 2))
    scale = np.asarray(train["scale"])
    assert np.corrcoef(scale[plain], area[plain])[0, 1] > 0.7
    columns = np.arange(32)
    centre_x = (foreground * columns).sum((1, 2)) / np.maximum(foreground.sum((1, 2)), 1)
    pos_x = np.asarray(train["pos_x"])
    assert np.corrcoef(pos_x[plain], centre_x[plain])[0, 1] > 0.8
    red = list(COLORS).index("red")
    is_red = (np.asarray(train["color"]) == red) & plain
    mean_rgb = np.array([pixels[i][foreground[i]].mean(0) for i in np.flatnonzero(is_red)])
    assert np.all(mean_rgb[:, 0] > mean_rgb[:, 1] + 80)


def test_digits_split_and_labels():
    ds = load_embedded_dataset("digits", n_train=300, n_eval=100, image_size=24, seed=3)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (300, 100)
    assert ds["train"].features["digit"].names == [str(d) for d in range(10)]
    image = ds["validation"][0]["image"]
    assert image.mode == "RGB" and image.size == (24, 24)
    # Stratified: every digit has its share (1,797 images, about 10% each) in both splits.
    for split, n in (("train", 300), ("validation", 100)):
        counts = np.bincount(ds[split]["digit"], minlength=10)
        assert counts.min() >= n // 10 - 2 and counts.max() <= n // 10 + 3
    again = load_embedded_dataset("digits", n_train=300, n_eval=100, image_size=24, seed=3)
    np.testing.assert_array_equal(_pixels(ds["train"]), _pixels(again["train"]))
    other = load_embedded_dataset("digits", n_train=300, n_eval=100, image_size=24, seed=4)
    assert ds["train"]["digit"] != other["train"]["digit"]
    # Defaults use every image once.
    full = load_embedded_dataset("digits", image_size=16)
    assert full["train"].num_rows + full["validation"].num_rows == 1797


def test_bad_requests_raise_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown embedded dataset 'cifar'.*\['digits', 'photos', 'shapes', 'shapes_affinity'\]"):
        load_embedded_dataset("cifar")
    with pytest.raises(ValueError, match=r"digits has 1797 images.*at most 1797"):
        load_embedded_dataset("digits", n_train=1700, n_eval=200)
    with pytest.raises(ValueError, match="at least 10 rows each"):
        load_embedded_dataset("digits", n_train=100, n_eval=5)
    with pytest.raises(ValueError, match="n_train must be a positive int"):
        load_embedded_dataset("shapes", n_train=0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        load_embedded_dataset("shapes", n_train=4, n_eval=4, seed=-1)
    with pytest.raises(ValueError, match="image_size must be an int >= 16"):
        load_embedded_dataset("shapes", n_train=4, n_eval=4, image_size=8)


def test_photos_are_balanced_crops_of_every_photo_and_deterministic():
    ds = load_embedded_dataset("photos", n_train=64, n_eval=16, image_size=32, seed=0)
    assert ds["train"].features["photo"].names == list(PHOTOS) and len(PHOTOS) == 8
    assert np.bincount(ds["train"]["photo"], minlength=8).tolist() == [8] * 8
    assert np.bincount(ds["validation"]["photo"], minlength=8).tolist() == [2] * 8
    assert ds["train"][0]["image"].size == (32, 32) and ds["train"][0]["image"].mode == "RGB"
    again = load_embedded_dataset("photos", n_train=64, n_eval=16, image_size=32, seed=0)
    np.testing.assert_array_equal(_pixels(ds["validation"]), _pixels(again["validation"]))
    # The photos differ, so the crops of one photo look alike more than crops of two: mean colour per class.
    pixels = _pixels(ds["train"]).reshape(64, -1, 3).mean(1)
    labels = np.asarray(ds["train"]["photo"])
    class_means = np.stack([pixels[labels == c].mean(0) for c in range(8)])
    assert np.ptp(class_means, axis=0).max() > 40


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_no_validation_pixel_is_in_a_training_crop():
    photos = [embedded._load_photo(name) for name in PHOTOS]
    train_blocks, eval_blocks = embedded._split_blocks(photos, seed=3)
    rng = np.random.default_rng(0)
    train, validation = embedded._crop_boxes(train_blocks, 400, rng), embedded._crop_boxes(eval_blocks, 100, rng)
    for label, box in validation:
        assert not any(_overlap(box, other) for other_label, other in train if other_label == label)
        assert any(b[0] <= box[0] and b[1] <= box[1] and box[2] <= b[2] and box[3] <= b[3] for b in eval_blocks[label])
    held_out = embedded.photo_validation_blocks(3)
    assert all(len(set(h)) == 4 for h in held_out) and held_out != embedded.photo_validation_blocks(4)
