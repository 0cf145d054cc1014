"""Per-task metrics against scikit-learn (with missing labels), the Trainer's EvalPrediction
layout, delta_m by hand, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    mean_absolute_error,
    r2_score,
    root_mean_squared_error,
)
from transformers import EvalPrediction

from hf_tlmtl import TaskSpec
from hf_tlmtl.multitask.metrics import build_compute_metrics, delta_m, task_metrics

RNG = np.random.default_rng(0)
N = 40
TASKS = [
    TaskSpec(name="shape", type="classification", num_labels=4),
    TaskSpec(name="marks", type="multilabel", num_labels=3),
    TaskSpec(name="scale", type="regression"),
]


def _fixed_predictions():
    class_logits = RNG.normal(size=(N, 4))
    class_labels = RNG.integers(0, 4, size=N)
    class_labels[[0, 5, 9]] = -100
    multi_logits = RNG.normal(size=(N, 3))
    multi_labels = (RNG.random((N, 3)) < 0.5).astype(np.float64)
    multi_labels[2, 1] = np.nan  # one missing entry
    multi_labels[7, :] = np.nan  # a whole missing row
    values = RNG.random(N)
    predictions = values + RNG.normal(scale=0.2, size=N)
    values[[1, 3]] = np.nan
    return {
        "logits": {"shape": class_logits, "marks": multi_logits, "scale": predictions.reshape(-1, 1)},
        "labels": (class_labels, multi_labels, values),
    }


def test_classification_matches_sklearn_without_missing_rows():
    data = _fixed_predictions()
    logits, labels = data["logits"]["shape"], data["labels"][0]
    keep = labels != -100
    got = task_metrics(TASKS[0], logits, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels[keep], logits[keep].argmax(1)))
    assert got["macro_f1"] == pytest.approx(f1_score(labels[keep], logits[keep].argmax(1), average="macro"))


def test_multilabel_matches_sklearn_entry_by_entry():
    data = _fixed_predictions()
    logits, labels = data["logits"]["marks"], data["labels"][1]
    got = task_metrics(TASKS[1], logits, labels)
    known = ~np.isnan(labels)
    predicted = (logits > 0).astype(int)
    assert got["micro_f1"] == pytest.approx(f1_score(labels[known].astype(int), predicted[known]))
    per_label_f1, per_label_ap = [], []
    for j in range(3):
        rows = known[:, j]
        per_label_f1.append(f1_score(labels[rows, j].astype(int), predicted[rows, j]))
        per_label_ap.append(average_precision_score(labels[rows, j].astype(int), logits[rows, j]))
    assert got["macro_f1"] == pytest.approx(np.mean(per_label_f1))
    assert got["map"] == pytest.approx(np.mean(per_label_ap))
    # Without missing entries this is exactly scikit-learn's multilabel averaging.
    full = np.nan_to_num(labels[~np.isnan(labels).any(1)]).astype(int)
    full_logits = logits[~np.isnan(labels).any(1)]
    plain = task_metrics(TASKS[1], full_logits, full)
    assert plain["macro_f1"] == pytest.approx(f1_score(full, (full_logits > 0).astype(int), average="macro"))
    assert plain["map"] == pytest.approx(average_precision_score(full, full_logits, average="macro"))


def test_regression_matches_sklearn_without_missing_rows():
    data = _fixed_predictions()
    predictions, labels = data["logits"]["scale"][:, 0], data["labels"][2]
    keep = ~np.isnan(labels)
    got = task_metrics(TASKS[2], predictions, labels)
    assert got["mae"] == pytest.approx(mean_absolute_error(labels[keep], predictions[keep]))
    assert got["rmse"] == pytest.approx(root_mean_squared_error(labels[keep], predictions[keep]))
    assert got["r2"] == pytest.approx(r2_score(labels[keep], predictions[keep]))


def test_compute_metrics_reads_trainer_layout_and_scores():
    data = _fixed_predictions()
    compute = build_compute_metrics(TASKS)
    out = compute(EvalPrediction(predictions=data["logits"], label_ids=data["labels"]))
    expected_keys = {f"shape_{m}" for m in ("accuracy", "macro_f1")}
    expected_keys |= {f"marks_{m}" for m in ("micro_f1", "macro_f1", "map")}
    expected_keys |= {f"scale_{m}" for m in ("mae", "rmse", "r2")}
    assert set(out) == expected_keys | {"score"}
    assert out["score"] == pytest.approx(np.mean([out["shape_accuracy"], out["marks_map"], out["scale_r2"]]))
    # A tuple of logits in task order is read the same way.
    as_tuple = tuple(data["logits"][t.name] for t in TASKS)
    assert compute(EvalPrediction(predictions=as_tuple, label_ids=data["labels"])) == out


def test_single_task_labels_arrive_as_one_array():
    data = _fixed_predictions()
    compute = build_compute_metrics([TASKS[2]])
    out = compute(EvalPrediction(predictions={"scale": data["logits"]["scale"]}, label_ids=data["labels"][2]))
    assert out["scale_mae"] == pytest.approx(task_metrics(TASKS[2], data["logits"]["scale"], data["labels"][2])["mae"])


def test_metric_selection_and_label_order():
    data = _fixed_predictions()
    compute = build_compute_metrics(TASKS, metrics={"scale": ["mae"]}, label_names=["scale", "shape", "marks"])
    labels = (data["labels"][2], data["labels"][0], data["labels"][1])
    out = compute(EvalPrediction(predictions=data["logits"], label_ids=labels))
    assert set(out) == {"scale_mae"}
    assert out["scale_mae"] == pytest.approx(task_metrics(TASKS[2], data["logits"]["scale"], data["labels"][2])["mae"])


def test_task_without_any_label_is_skipped():
    compute = build_compute_metrics(TASKS[:1])
    out = compute(EvalPrediction(predictions={"shape": np.zeros((3, 4))}, label_ids=np.full(3, -100)))
    assert out == {}


def test_delta_m_by_hand():
    metrics = {"eval_shape_accuracy": 0.90, "eval_marks_map": 0.60, "eval_scale_mae": 0.15}
    baselines = {"shape": 0.80, "marks": 0.75, "scale": 0.20}
    # shape +12.5 %, marks -20 %, scale: MAE 0.20 -> 0.15 is 25 % better (lower is better).
    assert delta_m(metrics, baselines, TASKS) == pytest.approx((12.5 - 20.0 + 25.0) / 3)
    assert delta_m({"shape_accuracy": 0.8}, {"shape": 0.8}, TASKS) == 0.0


def test_score_is_delta_m_when_baselines_given():
    data = _fixed_predictions()
    baselines = {"shape": 0.3, "scale": 0.2}
    out = build_compute_metrics(TASKS, baselines=baselines)(
        EvalPrediction(predictions=data["logits"], label_ids=data["labels"])
    )
    assert out["score"] == pytest.approx(delta_m(out, baselines, TASKS))


def test_bad_input_is_rejected_early():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['age'\]; the model's tasks are"):
        build_compute_metrics(TASKS, metrics={"age": ["mae"]})
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['mae'\]; valid: \['accuracy', 'macro_f1'\]"):
        build_compute_metrics(TASKS, metrics={"shape": ["mae"]})
    with pytest.raises(ValueError, match=r"Baselines given for unknown task\(s\) \['age'\]"):
        build_compute_metrics(TASKS, baselines={"age": 1.0})
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"shape_accuracy": 0.5}, {"shape": 0.0}, TASKS)
    with pytest.raises(ValueError, match="needs scale_mae"):
        delta_m({"shape_accuracy": 0.5}, {"scale": 0.2}, TASKS)
