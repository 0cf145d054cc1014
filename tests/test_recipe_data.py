"""recipes/finetune.py on each data source: embedded (see test_recipe_cli.py), an image folder, CSV, Parquet.

Tasks come from the column features (ClassLabel -> classification, float -> regression, list of
ClassLabel -> multilabel) unless stated; a validation split is made when the data has none.
"""

from __future__ import annotations


import datasets
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from recipe_utils import TINY, check_ok, run_finetune, summary, write_csv, write_image_folder, write_image_table


def _tasks(info):
    return [(t["name"], t["type"], t.get("labels")) for t in info["tasks"]]


# ----------------------------------------------------------------------------- imagefolder
def test_image_folder_from_a_local_dir_timm_checkpoint(tmp_path):
    """FOLDER/<class>/<image>: one classification task 'label' from the folder names; the backbone
    starts from a ``local-dir:`` timm checkpoint (the offline stand-in for hf-hub: weights)."""
    import timm

    folder = write_image_folder(tmp_path / "pets", ["cat", "dog", "emu"], per_class=8)
    source = timm.create_model("test_resnet", pretrained=False)
    timm.models.save_for_hf(source, str(tmp_path / "timm_source"), safe_serialization=True)
    out = tmp_path / "out"
    proc = check_ok(
        run_finetune(
            [*TINY, "--dataset", folder, "--backbone", f"local-dir:{tmp_path / 'timm_source'}", "--pretrained", "true",
             "--validation_fraction", "0.25", "--transfer_strategy", "partial", "--trainable_groups", "1",
             "--output_dir", out],
            tmp_path,
        )
    )
    info = summary(out)
    assert _tasks(info) == [("label", "classification", ["cat", "dog", "emu"])]
    assert info["data"]["train_rows"] == 18 and info["data"]["validation_rows"] == 6  # split made: 24 * 0.25
    assert 0.0 <= info["per_task"]["label"]["accuracy"] <= 1.0
    assert "weights from local-dir:" in proc.stdout and "strategy partial" in proc.stdout
    # The frozen groups kept the source checkpoint's weights exactly; the top group (layer4) trained.
    from safetensors.torch import load_file

    source_sd = load_file(tmp_path / "timm_source" / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    frozen = [k for k in source_sd if k.startswith(("conv1", "layer1", "layer2")) and k.endswith("weight")]
    top = [k for k in source_sd if k.startswith("layer4") and k.endswith("conv1.weight")]
    assert frozen and top
    for key in frozen:
        assert torch.equal(trained[f"backbone.{key}"], source_sd[key]), key
    for key in top:
        assert not torch.equal(trained[f"backbone.{key}"], source_sd[key]), key


# ---------------------------------------------------------------------------------- tables
@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    root, records = write_image_table(tmp_path_factory.mktemp("table"), rows=24)
    write_csv(root / "data.csv", records)
    Dataset.from_list(records).to_parquet(str(root / "data.parquet"))
    return root, records


def test_csv_with_image_paths_infers_tasks(table_dir, tmp_path):
    root, records = table_dir
    out = tmp_path / "out"
    check_ok(run_finetune([*TINY, "--dataset", root / "data.csv", "--image_column", "path", "--output_dir", out], tmp_path))
    info = summary(out)
    # text class names -> classification (sorted), float -> regression; the int id column is no task
    assert _tasks(info) == [("kind", "classification", ["cat", "dog", "fox"]), ("brightness", "regression", None)]
    assert info["data"]["train_rows"] + info["data"]["validation_rows"] == 24
    assert set(info["per_task"]["brightness"]) >= {"mae", "rmse", "r2"}
    assert set(info["per_task"]["kind"]) >= {"accuracy"}


def test_parquet_with_stated_tasks_and_multilabel_lists(table_dir, tmp_path):
    root, records = table_dir
    out = tmp_path / "out"
    check_ok(
        run_finetune(
            [*TINY, "--dataset", root / "data.parquet", "--image_column", "path",
             "--tasks", "kind:classification:fox|dog|cat,tags,brightness", "--output_dir", out],
            tmp_path,
        )
    )
    info = summary(out)
    assert _tasks(info) == [
        ("kind", "classification", ["fox", "dog", "cat"]),  # the stated order, not sorted
        ("tags", "multilabel", ["round", "small"]),  # list of text -> multilabel
        ("brightness", "regression", None),
    ]
    assert "map" in info["per_task"]["tags"]


# -------------------------------------------------------------------- task inference (unit)
def _dict(features, rows):
    return DatasetDict(train=Dataset.from_dict(rows, features=features))


def test_tasks_inferred_from_column_features():
    from hf_tlmtl.data import resolve_tasks

    features = Features(
        {
            "image": Value("string"),
            "kind": ClassLabel(names=["a", "b"]),
            "size": Value("float32"),
            "tags": List(ClassLabel(names=["x", "y", "z"])),
            "id": Value("int64"),
            "name": Value("string"),
        }
    )
    data = _dict(
        features,
        {"image": ["p0", "p1", "p2", "p3"], "kind": [0, 1, 1, 0], "size": [0.1, 0.2, 0.3, 0.4],
         "tags": [[0], [1, 2], [], [2]], "id": [7, 8, 9, 10], "name": ["u", "v", "w", "q"]},
    )
    data, tasks = resolve_tasks(data)
    assert [(t.name, t.type, t.num_outputs) for t in tasks] == [
        ("kind", "classification", 2), ("size", "regression", 1), ("tags", "multilabel", 3)
    ]
    # An int column is a task only when stated, with its number of classes; values are checked.
    data, tasks = resolve_tasks(data, "id:classification:11,size")
    assert [(t.name, t.type, t.num_outputs) for t in tasks] == [("id", "classification", 11), ("size", "regression", 1)]
    with pytest.raises(ValueError, match=r"class index 10 .*outside task 'id'"):
        resolve_tasks(data, "id:classification:10")
    with pytest.raises(ValueError, match=r"Cannot infer a task type for column 'id'"):
        resolve_tasks(data, "id")


def test_text_labels_become_classlabels_and_missing_values_stay_missing():
    from hf_tlmtl.data import resolve_tasks

    data = DatasetDict(
        train=Dataset.from_dict({"image": ["a", "b", "c", "d"], "kind": ["dog", None, "cat", "dog"]}),
        validation=Dataset.from_dict({"image": ["e", "f"], "kind": ["cat", "dog"]}),
    )
    data, tasks = resolve_tasks(data, "kind")
    assert tasks[0].labels == ["cat", "dog"]
    assert isinstance(data["train"].features["kind"], datasets.ClassLabel)
    assert list(data["train"]["kind"]) == [1, None, 0, 1] and list(data["validation"]["kind"]) == [0, 1]
