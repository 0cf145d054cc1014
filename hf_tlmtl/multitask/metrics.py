"""Per-task evaluation metrics (scikit-learn) and the multi-task summary ``delta_m``.

Metrics by task type (missing labels, ``-100`` / ``NaN``, are skipped):

- classification: ``accuracy``, ``macro_f1`` (over the classes present in labels or predictions,
  scikit-learn's default). Main metric: ``accuracy``.
- multilabel (a label is on when its logit > 0): ``micro_f1``, ``macro_f1``, ``map`` (mean
  average precision over the labels that have a positive). Main metric: ``map``.
- regression (averaged over outputs): ``mae``, ``rmse``, ``r2``. Main metric: ``mae`` (lower is
  better).

``build_compute_metrics(tasks)`` is what ``MultiTaskTrainer`` uses by default: the Trainer logs
``eval_<task>_<metric>`` and ``eval_score``.

Example:
    >>> import numpy as np
    >>> from transformers import EvalPrediction
    >>> from hf_tlmtl import TaskSpec
    >>> tasks = [TaskSpec(name="shape", type="classification", num_labels=3), TaskSpec(name="scale", type="regression")]
    >>> compute = build_compute_metrics(tasks)
    >>> logits = {"shape": np.eye(3)[[0, 1, 2, 0]], "scale": np.array([[0.5], [1.0], [1.5], [2.0]])}
    >>> labels = (np.array([0, 1, 1, -100]), np.array([0.5, 1.0, np.nan, 1.0]))
    >>> out = compute(EvalPrediction(predictions=logits, label_ids=labels))
    >>> round(out["shape_accuracy"], 4), round(out["scale_mae"], 4)
    (0.6667, 0.3333)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    mean_absolute_error,
    r2_score,
    root_mean_squared_error,
)

from ..tasks import IGNORE_INDEX, TaskSpec

METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "multilabel": ("micro_f1", "macro_f1", "map"),
    "regression": ("mae", "rmse", "r2"),
}
MAIN_METRIC: dict[str, str] = {"classification": "accuracy", "multilabel": "map", "regression": "mae"}
"""Metric of each task type that ``delta_m`` compares against the single-task baseline."""
SCORE_METRIC: dict[str, str] = {"classification": "accuracy", "multilabel": "map", "regression": "r2"}
"""Higher-is-better metric of each type averaged into ``score`` when no baselines are given."""
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae", "rmse"})


def _classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    labels = labels.reshape(-1).astype(np.int64)
    keep = labels != IGNORE_INDEX
    if not keep.any():
        return {}
    y_true, y_pred = labels[keep], logits[keep].argmax(axis=-1)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def _multilabel_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    labels = labels.reshape(logits.shape).astype(np.float64)
    labelled = ~np.isnan(labels)
    if not labelled.any():
        return {}
    predicted = (logits > 0).astype(np.int64)
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    truth = np.where(labelled, labels, 0).astype(np.int64)
    # Column by column so that a missing entry drops only that entry, not the whole row.
    per_label_f1, per_label_ap = [], []
    for j in range(labels.shape[1]):
        keep = labelled[:, j]
        if not keep.any():
            continue
        per_label_f1.append(f1_score(truth[keep, j], predicted[keep, j], zero_division=0))
        if truth[keep, j].any():
            per_label_ap.append(average_precision_score(truth[keep, j], scores[keep, j]))
    result = {
        "micro_f1": float(f1_score(truth[labelled], predicted[labelled], zero_division=0)),
        "macro_f1": float(np.mean(per_label_f1)),
    }
    if per_label_ap:
        result["map"] = float(np.mean(per_label_ap))
    return result


def _regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = predictions.reshape(predictions.shape[0], -1).astype(np.float64)
    labels = labels.reshape(predictions.shape).astype(np.float64)
    columns = []
    for j in range(labels.shape[1]):
        keep = ~np.isnan(labels[:, j])
        if not keep.any():
            continue
        y_true, y_pred = labels[keep, j], predictions[keep, j]
        r2 = float(r2_score(y_true, y_pred)) if keep.sum() > 1 else float("nan")
        columns.append((mean_absolute_error(y_true, y_pred), root_mean_squared_error(y_true, y_pred), r2))
    if not columns:
        return {}
    mae, rmse, r2 = np.mean(np.asarray(columns), axis=0)
    return {"mae": float(mae), "rmse": float(rmse), "r2": float(r2)}


_COMPUTE_BY_TYPE: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "classification": _classification_metrics,
    "multilabel": _multilabel_metrics,
    "regression": _regression_metrics,
}


def task_metrics(task: TaskSpec, logits: Any, labels: Any) -> dict[str, float]:
    """All metrics of one task's type from raw head outputs and labels (missing labels skipped).

    Returns ``{}`` when no row is labelled.

    Example:
        >>> import numpy as np
        >>> from hf_tlmtl import TaskSpec
        >>> m = task_metrics(TaskSpec(name="y", type="regression"), np.array([1.0, 2.0]), np.array([1.0, 4.0]))
        >>> {k: round(v, 4) for k, v in m.items()}
        {'mae': 1.0, 'rmse': 1.4142, 'r2': 0.1111}
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 1:
        logits = logits.reshape(-1, 1)
    return _COMPUTE_BY_TYPE[task.type](logits, np.asarray(labels, dtype=np.float64))


def _check_requested(tasks: Sequence[TaskSpec], requested: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    by_name = {t.name: t for t in tasks}
    unknown = sorted(set(requested or {}) - set(by_name))
    if unknown:
        raise ValueError(f"Metrics requested for unknown task(s) {unknown}; the model's tasks are {sorted(by_name)}.")
    if requested is None:
        return {t.name: METRICS_BY_TYPE[t.type] for t in tasks}
    selected: dict[str, tuple[str, ...]] = {}
    for name, names in requested.items():
        valid = METRICS_BY_TYPE[by_name[name].type]
        bad = sorted(set(names) - set(valid))
        if bad:
            raise ValueError(f"Task {name!r} ({by_name[name].type}): unknown metric(s) {bad}; valid: {list(valid)}.")
        selected[name] = tuple(names)
    return selected


def build_compute_metrics(
    tasks: Sequence[TaskSpec],
    baselines: Mapping[str, float] | None = None,
    metrics: Mapping[str, Sequence[str]] | None = None,
    label_names: Sequence[str] | None = None,
) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``Trainer`` that scores every task of a multi-task model.

    Args:
        tasks: The model's tasks.
        baselines: Optional single-task baseline of each task's main metric (``MAIN_METRIC``);
            then ``score`` is :func:`delta_m` (in percent) instead of the mean of the
            higher-is-better metrics (accuracy / mAP / R², ``SCORE_METRIC``).
        metrics: Optional ``{task: [metric, ...]}`` to evaluate only some tasks / metrics.
        label_names: Order of the label arrays in ``EvalPrediction.label_ids`` (the Trainer's
            ``args.label_names``); defaults to the task order.

    Returns a function of an ``EvalPrediction`` whose ``predictions`` are the logits by task
    (a dict, or a tuple in task order) giving ``{"<task>_<metric>": value, ..., "score": value}``.
    Unknown tasks or metrics raise ``ValueError`` here, before any evaluation runs.

    Example:
        >>> from hf_tlmtl import TaskSpec
        >>> build_compute_metrics([TaskSpec(name="y", type="regression")], metrics={"age": ["mae"]})
        Traceback (most recent call last):
        ...
        ValueError: Metrics requested for unknown task(s) ['age']; the model's tasks are ['y'].
    """
    tasks = list(tasks)
    selected = _check_requested(tasks, metrics)
    if baselines is not None:
        _check_baselines(baselines, tasks)
    order = list(label_names) if label_names is not None else [t.name for t in tasks]
    missing = sorted(set(selected) - set(order))
    if missing and metrics is not None:
        raise ValueError(f"label_names {order} lack the evaluated task(s) {missing}; add them to args.label_names.")
    selected = {name: names for name, names in selected.items() if name in order}

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        logits_by_task = _by_task(eval_prediction.predictions, [t.name for t in tasks], "predictions")
        labels_by_task = _by_task(eval_prediction.label_ids, order, "label_ids")
        result: dict[str, float] = {}
        for task in tasks:
            if task.name not in selected or labels_by_task.get(task.name) is None:
                continue
            values = task_metrics(task, logits_by_task[task.name], labels_by_task[task.name])
            result.update({f"{task.name}_{k}": v for k, v in values.items() if k in selected[task.name]})
        if baselines is not None:
            result["score"] = delta_m(result, baselines, tasks)
        else:
            scores = [result[f"{t.name}_{SCORE_METRIC[t.type]}"] for t in tasks if f"{t.name}_{SCORE_METRIC[t.type]}" in result]
            if scores:
                result["score"] = float(np.mean(scores))
        return result

    return compute_metrics


def _by_task(values: Any, names: Sequence[str], what: str) -> dict[str, Any]:
    """Trainer gives a dict (dict logits), a tuple / list (several label arrays) or one array."""
    if isinstance(values, Mapping):
        return dict(values)
    if not isinstance(values, (list, tuple)):
        values = [values]
    if len(values) != len(names):
        raise ValueError(f"EvalPrediction.{what} has {len(values)} arrays for {len(names)} tasks {list(names)}.")
    return dict(zip(names, values))


def _check_baselines(baselines: Mapping[str, float], tasks: Sequence[TaskSpec]) -> None:
    names = {t.name for t in tasks}
    unknown = sorted(set(baselines) - names)
    if unknown:
        raise ValueError(f"Baselines given for unknown task(s) {unknown}; the tasks are {sorted(names)}.")
    zero = sorted(name for name, value in baselines.items() if not float(value))
    if zero:
        raise ValueError(f"Baseline of task(s) {zero} is 0: delta_m divides by the baseline; give a non-zero value.")


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float], tasks: Sequence[TaskSpec]) -> float:
    """Mean relative change (%) of each task's main metric against its single-task baseline.

    ``delta_m = 100 / T * sum_t (-1)^{l_t} (M_t - B_t) / B_t`` with ``l_t = 1`` when lower is
    better (regression MAE), else 0 (Maninis et al. 2019; Vandenhende et al. 2021). Positive means
    the multi-task model beats the single-task models on average. Only the tasks in ``baselines``
    count; ``metrics`` keys are ``<task>_<metric>``, with or without the Trainer's ``eval_`` prefix.

    Example:
        >>> from hf_tlmtl import TaskSpec
        >>> tasks = [TaskSpec(name="a", type="classification", num_labels=2), TaskSpec(name="r", type="regression")]
        >>> round(delta_m({"a_accuracy": 0.9, "r_mae": 0.3}, {"a": 0.8, "r": 0.2}, tasks), 4)  # (+12.5 - 50) / 2
        -18.75
    """
    _check_baselines(baselines, tasks)
    by_name = {t.name: t for t in tasks}
    changes = []
    for name, baseline in baselines.items():
        metric = MAIN_METRIC[by_name[name].type]
        key = next((k for k in (f"{name}_{metric}", f"eval_{name}_{metric}") if k in metrics), None)
        if key is None:
            raise ValueError(f"delta_m needs {name}_{metric} (main metric of {name!r}) in metrics; got {sorted(metrics)}.")
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        changes.append(sign * (float(metrics[key]) - float(baseline)) / float(baseline))
    if not changes:
        raise ValueError("delta_m needs at least one task baseline, e.g. baselines={'shape': 0.91}.")
    return float(100.0 * np.mean(changes))
