"""Datasets that label only some tasks: concatenation with missing labels, zero gradient for a
task absent from a batch, balancers that skip it, and learning both tasks from disjoint halves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, List, Value
from transformers import TrainerCallback

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.data.partial_labels import concatenate_partially_labelled
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments

IMAGE_SIZE = 32



@pytest.fixture(scope="module")
def shapes():
    return load_embedded_dataset("shapes", n_train=512, n_eval=128, image_size=IMAGE_SIZE, seed=0)


def _tasks(ds):
    return [
        TaskSpec(name="shape", type="classification", labels=ds["train"].features["shape"].names),
        TaskSpec(name="scale", type="regression"),
        TaskSpec(name="marks", type="multilabel", labels=ds["train"].features["marks"].feature.names),
    ]


# ------------------------------------------------------------------------------ the helper
def test_missing_columns_are_filled_per_type(shapes):
    train = shapes["train"].select_columns(["image", "shape", "scale", "marks"])
    only_shape = train.select(range(3)).remove_columns(["scale", "marks"])
    only_scale_marks = train.select(range(3, 5)).remove_columns(["shape"])
    both = concatenate_partially_labelled([only_shape, only_scale_marks], _tasks(shapes))
    assert both.num_rows == 5
    assert both.features["shape"] == train.features["shape"]  # ClassLabel names kept
    assert both.features["marks"] == train.features["marks"]
    assert both["shape"][:3] == train["shape"][:3] and both["shape"][3:] == [-100, -100]
    assert all(math.isnan(v) for v in both["scale"][:3]) and both["scale"][3:] == pytest.approx(train["scale"][3:5])
    assert both["marks"][:3] == [None] * 3 and both["marks"][3:] == train["marks"][3:5]

    # Through the data pipeline, missing labels become -100 / NaN rows the model ignores.
    model = TimmMultiTaskModel.from_backbone("test_resnet", _tasks(shapes), image_size=IMAGE_SIZE)
    prepared = prepare_dataset(both, model.config, train=False)
    batch = MultiTaskCollator(model.tasks)([prepared[i] for i in range(5)])
    assert batch["shape"].tolist()[3:] == [-100, -100]
    assert torch.isnan(batch["scale"][:3]).all() and not torch.isnan(batch["scale"][3:]).any()
    assert torch.isnan(batch["marks"][:3]).all() and not torch.isnan(batch["marks"][3:]).any()


def test_multihot_float_lists_are_filled_with_nan():
    features = Features({"x": Value("int64"), "attrs": List(Value("float32"), length=2)})
    labelled = Dataset.from_dict({"x": [1], "attrs": [[1.0, 0.0]]}, features=features)
    unlabelled = Dataset.from_dict({"x": [2]})
    both = concatenate_partially_labelled([labelled, unlabelled], [TaskSpec(name="attrs", type="multilabel", num_labels=2)])
    assert both["attrs"][0] == [1.0, 0.0] and all(math.isnan(v) for v in both["attrs"][1])


def test_bad_input_names_column_and_fix():
    tasks = [TaskSpec(name="shape", type="classification", num_labels=2), TaskSpec(name="scale", type="regression")]
    a = Dataset.from_dict({"x": [1], "shape": [0]}, features=Features({"x": Value("int64"), "shape": ClassLabel(names=["a", "b"])}))
    b = Dataset.from_dict({"x": [2], "shape": [1]}, features=Features({"x": Value("int64"), "shape": ClassLabel(names=["b", "a"])}))
    with pytest.raises(ValueError, match="No dataset has a column 'scale'"):
        concatenate_partially_labelled([a], tasks)
    c = Dataset.from_dict({"x": [2], "scale": [0.5]})
    with pytest.raises(ValueError, match=r"Column 'shape' .* in dataset 0 but .* in dataset 1: make them agree"):
        concatenate_partially_labelled([a, b, c], tasks)
    extra = Dataset.from_dict({"x": [3], "scale": [0.5], "note": ["hi"]})
    with pytest.raises(ValueError, match=r"Dataset 1 has column\(s\) \['note'\].*remove_columns"):
        concatenate_partially_labelled([a, extra], tasks)
    with pytest.raises(ValueError, match="list of datasets.Dataset"):
        concatenate_partially_labelled({"train": a}, tasks)


# --------------------------------------------------------------------- absent task in a batch
class CaptureGradients(TrainerCallback):
    """Copies every gradient after the backward, before the optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            self.grads[name] = None if param.grad is None else param.grad.detach().clone()


def _one_step(shapes, tmp_path, method, labelled_tasks):
    tasks = _tasks(shapes)[:2]
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=IMAGE_SIZE)
    rows = shapes["train"].select(range(4)).select_columns(["image", "shape", "scale"])
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_balancing=method, max_steps=1,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, logging_steps=1,
    )
    trainer = MultiTaskTrainer(
        model=model, args=args, data_collator=MultiTaskCollator(tasks),
        train_dataset=prepare_dataset(rows, model.config, train=False, labelled_tasks=labelled_tasks),
    )
    capture = CaptureGradients()
    trainer.add_callback(capture)
    trainer.train()
    return trainer, capture.grads


@pytest.mark.parametrize("method", ["static", "uncertainty", "dwa", "upgrad"])
def test_absent_task_gives_exact_zero_gradient_to_its_head(shapes, tmp_path, method):
    trainer, grads = _one_step(shapes, tmp_path, method, labelled_tasks=["shape"])  # no scale label at all
    for name in ("heads.scale.fc.weight", "heads.scale.fc.bias"):
        assert grads[name] is not None and torch.count_nonzero(grads[name]) == 0
    assert torch.count_nonzero(grads["heads.shape.fc.weight"]) > 0
    assert torch.count_nonzero(grads["backbone.conv1.0.weight"]) > 0
    # The balancer never saw the absent task: no loss statistics, no learned weight for it.
    logged = trainer.state.log_history[0]
    assert "loss_shape" in logged and "loss_scale" not in logged
    if method == "uncertainty":
        assert float(trainer.balancer.log_vars["scale"].detach()) == 0.0
        assert float(trainer.balancer.log_vars["shape"].detach()) != 0.0
    if method == "dwa":
        assert set(trainer.balancer.history[-1]) == {"shape"}


def test_batch_without_any_label_gives_zero_loss_and_zero_gradient(shapes, tmp_path):
    trainer, grads = _one_step(shapes, tmp_path, "static", labelled_tasks=[])
    assert trainer.state.log_history[0]["loss"] == 0.0
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads.values())


# -------------------------------------------------------------------------- real training
def test_model_learns_both_tasks_from_disjoint_label_sets(shapes, tmp_path):
    columns = ["image", "shape", "scale"]
    train = shapes["train"].select_columns(columns)
    half = train.num_rows // 2
    only_shape = train.select(range(half)).remove_columns("scale")
    only_scale = train.select(range(half, train.num_rows)).remove_columns("shape")
    union = concatenate_partially_labelled([only_shape, only_scale], _tasks(shapes)[:2])

    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", _tasks(shapes)[:2], image_size=IMAGE_SIZE)
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=16,
        num_train_epochs=10, learning_rate=3e-3, seed=0, save_strategy="no", disable_tqdm=True,
        logging_steps=16,
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=prepare_dataset(union, model.config, train=False),
        eval_dataset=prepare_dataset(shapes["validation"].select_columns(columns), model.config, train=False),
        data_collator=MultiTaskCollator(model.tasks),
    )
    trainer.train()
    metrics = trainer.evaluate()  # the default compute_metrics, built from the tasks

    validation = shapes["validation"]
    majority = np.bincount(validation["shape"]).max() / validation.num_rows
    assert metrics["eval_shape_accuracy"] > majority + 0.15
    mean_predictor_mae = np.abs(np.asarray(validation["scale"]) - np.mean(train["scale"])).mean()
    assert metrics["eval_scale_mae"] < 0.8 * mean_predictor_mae
    assert metrics["eval_scale_r2"] > 0.2
    assert {"eval_shape_macro_f1", "eval_scale_rmse", "eval_score"} <= set(metrics)
