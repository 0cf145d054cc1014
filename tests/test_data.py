"""Transforms, dataset preparation and the collator, on real datasets and a real model."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset

SIZE = 32


@pytest.fixture(scope="module")
def shapes():
    return load_embedded_dataset("shapes", n_train=16, n_eval=8, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def tasks(shapes):
    features = shapes["train"].features
    return [
        TaskSpec(name="shape", type="classification", labels=features["shape"].names),
        TaskSpec(name="scale", type="regression"),
        TaskSpec(name="marks", type="multilabel", labels=features["marks"].feature.names),
    ]


@pytest.fixture(scope="module")
def model(tasks):
    return TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=SIZE)


def _with_missing_labels() -> Dataset:
    features = Features(
        {
            "image": Image(),
            "shape": ClassLabel(names=["square", "ellipse", "triangle", "heart"]),
            "scale": Value("float32"),
            "marks": List(ClassLabel(names=["outline", "center_dot", "speckles"])),
        }
    )
    gray = PILImage.new("L", (20, 24), color=128)  # grayscale on purpose: must come out RGB
    return Dataset.from_dict(
        {"image": [gray] * 3, "shape": [2, None, 0], "scale": [0.25, 0.5, None], "marks": [[0, 2], None, []]},
        features=features,
    )


# ------------------------------------------------------------------------------- transforms
def test_eval_transform_matches_config_and_is_deterministic(model, shapes):
    transform = build_transforms(model.config, train=False)
    image = shapes["train"][0]["image"]
    first, second = transform(image), transform(image)
    assert tuple(first.shape) == tuple(model.config.data_config["input_size"])
    assert torch.equal(first, second)
    # Normalised with the config's mean/std: the dark background maps below zero.
    mean, std = model.config.data_config["mean"][0], model.config.data_config["std"][0]
    assert first[0, 0, 0].item() == pytest.approx((24 / 255 - mean) / std, abs=0.05)


def test_train_transform_is_timm_augmentation(model, shapes):
    transform = build_transforms(model.config, train=True)
    image = shapes["train"][0]["image"]
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(4)]
    assert all(tuple(o.shape) == (3, SIZE, SIZE) for o in outputs)
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    no_flip = build_transforms(model.config, train=True, hflip=0.0)
    assert "RandomHorizontalFlip" not in [type(t).__name__ for t in no_flip.transforms]


# ---------------------------------------------------------------------------------- prepare
def test_prepared_batch_trains_real_model(model, shapes):
    prepared = prepare_dataset(shapes["train"], model.config, train=True)
    loader = DataLoader(prepared, batch_size=8, collate_fn=MultiTaskCollator(model.tasks))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["shape"].dtype == torch.long and batch["shape"].tolist() == shapes["train"]["shape"][:8]
    assert batch["scale"].shape == (8,) and batch["scale"].dtype == torch.float32
    assert torch.allclose(batch["scale"], torch.tensor(shapes["train"]["scale"][:8]))
    expected_marks = torch.zeros(8, 3)
    for row, marks in enumerate(shapes["train"]["marks"][:8]):
        expected_marks[row, marks] = 1.0
    assert torch.equal(batch["marks"], expected_marks)
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.loss) and set(out.task_losses) == {"shape", "scale", "marks"}
    out.loss.backward()
    assert all(head.fc.weight.grad.abs().sum() > 0 for head in model.heads.values())


def test_missing_labels_become_ignore_values_and_rgb(model):
    prepared = prepare_dataset(_with_missing_labels(), model.config, train=False)
    batch = MultiTaskCollator(model.tasks)([prepared[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["shape"].tolist() == [2, -100, 0]
    assert batch["scale"][:2].tolist() == [0.25, 0.5] and math.isnan(batch["scale"][2])
    assert batch["marks"][0].tolist() == [1.0, 0.0, 1.0] and batch["marks"][2].tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(batch["marks"][1]).all()
    features = Features({"image": Image(), "shape": _with_missing_labels().features["shape"]})
    unlabelled = Dataset.from_dict({"image": [PILImage.new("RGB", (8, 8))], "shape": [-1]}, features=features)
    row = prepare_dataset(unlabelled, model.config, train=False, labelled_tasks=["shape"])[0]
    assert row["shape"].item() == -100  # -1 is datasets' ClassLabel "no label"
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # Only labelled rows count: the shape loss equals cross-entropy over rows 0 and 2.
    expected = torch.nn.functional.cross_entropy(out.logits["shape"][[0, 2]], torch.tensor([2, 0]))
    assert out.task_losses["shape"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_tasks_a_dataset_does_not_label_are_filled(model):
    only_shape = _with_missing_labels().remove_columns(["scale", "marks"])
    with pytest.raises(ValueError, match=r"reads column 'scale'.*columns: \['image', 'shape'\].*labelled_tasks"):
        prepare_dataset(only_shape, model.config, train=False)
    prepared = prepare_dataset(only_shape, model.config, train=False, labelled_tasks=["shape"])
    assert sorted(prepared[0]) == ["pixel_values", "shape"]
    batch = MultiTaskCollator(model)([prepared[i] for i in range(3)])
    assert batch["scale"].shape == (3,) and torch.isnan(batch["scale"]).all()
    assert batch["marks"].shape == (3, 3) and torch.isnan(batch["marks"]).all()
    out = model(**batch)
    assert out.task_losses["scale"].item() == 0.0 and out.task_losses["marks"].item() == 0.0
    assert out.loss.item() == pytest.approx(out.task_losses["shape"].item())


def test_int_and_multi_output_columns(model):
    tasks = [
        TaskSpec(name="kind", type="classification", num_labels=3),
        TaskSpec(name="box", type="regression", num_labels=2),
        TaskSpec(name="tags", type="multilabel", num_labels=2),
    ]
    dataset = Dataset.from_dict(
        {
            "image": [PILImage.new("RGB", (SIZE, SIZE))] * 2,
            "kind": [1, 2],
            "box": [[0.1, 0.2], [None, 0.4]],
            "tags": [[1.0, 0.0], [0.0, 1.0]],
        },
        features=Features(
            {"image": Image(), "kind": Value("int64"), "box": List(Value("float32"), length=2), "tags": List(Value("float32"))}
        ),
    )
    m = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=SIZE)
    batch = MultiTaskCollator(m.tasks)(list(prepare_dataset(dataset, m.config, train=False)))
    assert batch["kind"].tolist() == [1, 2]
    assert batch["box"].shape == (2, 2) and math.isnan(batch["box"][1, 0]) and batch["box"][1, 1].item() == pytest.approx(0.4)
    assert batch["tags"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert torch.isfinite(m(**batch).loss)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.rename_column("image", "picture"), r"Image column 'image' not in the dataset \(columns: \["),
        (lambda d: d.remove_columns("scale").add_column("scale", [0, 1, 2]).cast_column("scale", ClassLabel(num_classes=3)), r"'scale'.*class label; make the task type='classification'"),
        (lambda d: d.cast_column("shape", Value("float32")), r"classification needs class indices"),
        (lambda d: d.cast_column("shape", Value("string")), r"class_encode_column\('shape'\)"),
        (lambda d: d.cast_column("shape", ClassLabel(names=list("abcdef"))), r"6 classes but the task has 4 outputs"),
        (
            lambda d: d.cast_column("shape", ClassLabel(names=["heart", "square", "ellipse", "triangle"])),
            r"do not match the task's labels.*align_labels_with_mapping",
        ),
        (lambda d: d.remove_columns("marks").add_column("marks", [1.0] * 3), r"multilabel needs a list of class indices"),
    ],
    ids=["missing-image", "regression-on-classlabel", "float-class", "string-class", "too-many-classes", "class-order", "multilabel-scalar"],
)
def test_prepare_rejects_mismatched_columns(model, change, message):
    with pytest.raises(ValueError, match=message):
        prepare_dataset(change(_with_missing_labels()), model.config, train=False)


def test_prepare_rejects_non_image_column_and_dataset_dict(model, shapes):
    paths = _with_missing_labels().remove_columns("image").add_column("image", ["a.png"] * 3)
    with pytest.raises(ValueError, match=r"cast_column\('image', datasets.Image\(\)\)"):
        prepare_dataset(paths, model.config, train=False)
    with pytest.raises(ValueError, match=r"one split.*\['train', 'validation'\].*ds\['train'\]"):
        prepare_dataset(shapes, model.config, train=True)


# --------------------------------------------------------------------------------- collator
def test_collator_dtypes_shapes_and_filling():
    tasks = [
        TaskSpec(name="kind", type="classification", num_labels=3),
        TaskSpec(name="size", type="regression"),
        TaskSpec(name="box", type="regression", num_labels=2),
        TaskSpec(name="tags", type="multilabel", num_labels=4),
    ]
    collate = MultiTaskCollator(tasks)
    batch = collate(
        [
            {"features": [0.0] * 5, "kind": 2, "size": 1.5, "box": [1, 2], "tags": [0, 1, 1, 0]},
            {"features": [1.0] * 5, "kind": None, "box": torch.tensor([3.0, 4.0])},
        ]
    )
    assert batch["features"].shape == (2, 5) and batch["features"].dtype == torch.float32
    assert batch["kind"].dtype == torch.long and batch["kind"].tolist() == [2, -100]
    assert batch["size"].shape == (2,) and batch["size"][0] == 1.5 and torch.isnan(batch["size"][1])
    assert batch["box"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert batch["tags"].shape == (2, 4) and batch["tags"][0].tolist() == [0, 1, 1, 0]
    assert torch.isnan(batch["tags"][1]).all()
    with pytest.raises(ValueError, match="'box': expected 2 value"):
        collate([{"features": [0.0], "box": [1.0, 2.0, 3.0]}])
    with pytest.raises(ValueError, match="Rows need 'pixel_values' or 'features'"):
        collate([{"kind": 1}])
