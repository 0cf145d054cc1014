import math

import pytest
import torch
import torch.nn.functional as F

from hf_tlmtl import TaskSpec
from hf_tlmtl.tasks import normalize_tasks


def test_num_outputs_and_id2label_per_type():
    assert TaskSpec(name="c", type="classification", labels=["a", "b", "c"]).num_outputs == 3
    assert TaskSpec(name="m", type="multilabel", num_labels=4).id2label == {i: f"m_{i}" for i in range(4)}
    assert TaskSpec(name="r", type="regression").num_outputs == 1
    assert TaskSpec(name="r2", type="regression", labels=["x", "y"]).num_outputs == 2


def test_classification_loss_masks_ignore_index():
    task = TaskSpec(name="c", type="classification", num_labels=3)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])
    loss = task.compute_loss(logits, torch.tensor([0, -100, 2]))
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("loss_name", ["mse", "huber", "smooth_l1", "l1"])
def test_regression_loss_masks_nan(loss_name):
    task = TaskSpec(name="r", type="regression", num_labels=2, loss=loss_name, huber_delta=0.5)
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.3, 0.3]])
    target = torch.tensor([[0.5, float("nan")], [1.0, 1.0], [float("nan"), float("nan")]])
    kept_logits, kept_target = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.5, 1.0, 1.0])
    fn = {
        "mse": lambda a, b: F.mse_loss(a, b),
        "huber": lambda a, b: F.huber_loss(a, b, delta=0.5),
        "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, beta=0.5),
        "l1": lambda a, b: F.l1_loss(a, b),
    }[loss_name]
    torch.testing.assert_close(task.compute_loss(logits, target), fn(kept_logits, kept_target))


def test_multilabel_loss_masks_nan_elements():
    task = TaskSpec(name="m", type="multilabel", labels=["red", "big"])
    logits = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(task.compute_loss(logits, target), expected)


@pytest.mark.parametrize(
    "task,target",
    [
        (TaskSpec(name="c", type="classification", num_labels=3), torch.full((4,), -100)),
        (TaskSpec(name="r", type="regression"), torch.full((4,), float("nan"))),
        (TaskSpec(name="m", type="multilabel", num_labels=2), torch.full((4, 2), float("nan"))),
    ],
)
def test_all_missing_batch_gives_zero_loss_and_zero_gradient(task, target):
    logits = torch.randn(4, task.num_outputs, requires_grad=True)
    loss = task.compute_loss(logits, target)
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_index_out_of_range_names_task_and_value():
    task = TaskSpec(name="shape", type="classification", num_labels=3)
    with pytest.raises(ValueError, match=r"'shape'.*class index 7"):
        task.compute_loss(torch.zeros(2, 3), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="class index -3"):
        task.compute_loss(torch.zeros(1, 3), torch.tensor([-3]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="hair color", type="classification", num_labels=2), "not a Python identifier"),
        (dict(name="class", type="classification", num_labels=2), "not a Python identifier"),
        (dict(name="pixel_values", type="regression"), "reserved"),
        (dict(name="y", type="classification"), "labels=\\[...\\].*num_labels"),
        (dict(name="y", type="ordinal", num_labels=2), "unknown type"),
        (dict(name="y", type="regression", weight=-1.0), "weight must be a finite number >= 0"),
        (dict(name="y", type="regression", weight=float("nan")), "weight must be a finite number >= 0"),
        (dict(name="y", type="classification", labels=["a", "b"], num_labels=3), "num_labels=3 but 2 labels"),
        (dict(name="y", type="regression", loss="hinge"), "unknown regression loss"),
    ],
)
def test_bad_task_specs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(**kwargs)


def test_duplicate_task_names_are_rejected():
    with pytest.raises(ValueError, match=r"Duplicate task name\(s\) \['a'\]"):
        normalize_tasks([TaskSpec(name="a", type="regression"), {"name": "a", "type": "regression"}])


def test_taskspec_dict_round_trip():
    task = TaskSpec(name="attrs", type="multilabel", labels=["red", "big"], weight=0.5)
    assert TaskSpec.from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="Unknown TaskSpec field"):
        TaskSpec.from_dict({**task.to_dict(), "colour": 1})


def test_predict_transforms():
    logits = torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(TaskSpec(name="c", type="classification", num_labels=2).predict(logits), logits.softmax(-1))
    torch.testing.assert_close(TaskSpec(name="m", type="multilabel", num_labels=2).predict(logits), logits.sigmoid())
    torch.testing.assert_close(TaskSpec(name="r", type="regression", num_labels=2).predict(logits), logits)
