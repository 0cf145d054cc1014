"""What a model that ignores the image scores, per task: the floor a trained model's metrics are read against.

- classification: the training set's majority class, always (``accuracy``);
- regression with one output: the training mean, always (``mae``; ``r2`` is 0 by definition);
- multilabel: each label's frequency as a constant score (``map`` = the mean prevalence of the labels present).

Missing labels (``None``, negative classes, ``NaN``) are skipped; a task with nothing to compare gets no entry.

Example:
    >>> from hf_tlmtl import TaskSpec
    >>> tasks = [TaskSpec(name="shape", type="classification", num_labels=3), TaskSpec(name="size", type="regression")]
    >>> train = {"shape": [0, 0, 1, -1], "size": [1.0, 3.0, None, 2.0]}
    >>> validation = {"shape": [0, 1, 2, 0], "size": [2.5, 1.5, 2.0, 2.0]}
    >>> baseline_metrics(train, validation, tasks)
    {'shape': {'accuracy': 0.5}, 'size': {'mae': 0.25, 'r2': 0.0}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tasks import TaskSpec


def baseline_metrics(
    train: Mapping[str, Any], validation: Mapping[str, Any], tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of a model that ignores the image, on ``validation``, from ``train``'s labels.

    ``train`` and ``validation`` give each task's label column by its ``source_column`` (a ``datasets.Dataset``,
    or a dict of lists).
    """
    baselines: dict[str, dict[str, float]] = {}
    for task in tasks:
        column = task.source_column
        y_train, y_eval = list(train[column]), list(validation[column])
        if task.type == "classification":
            known = [int(v) for v in y_train if v is not None and int(v) >= 0]
            labelled = [int(v) for v in y_eval if v is not None and int(v) >= 0]
            if known and labelled:
                majority = max(set(known), key=known.count)
                baselines[task.name] = {"accuracy": sum(v == majority for v in labelled) / len(labelled)}
        elif task.type == "regression" and task.num_outputs == 1:
            known = np.asarray([v for v in y_train if v is not None], dtype=float)
            labelled = np.asarray([v for v in y_eval if v is not None], dtype=float)
            known, labelled = known[~np.isnan(known)], labelled[~np.isnan(labelled)]
            if known.size and labelled.size:
                baselines[task.name] = {"mae": float(np.abs(labelled - known.mean()).mean()), "r2": 0.0}
        elif task.type == "multilabel":
            rows = [row for row in y_eval if row is not None]
            if rows and all(isinstance(v, (int, np.integer)) for row in rows for v in row):
                prevalence = [sum(i in row for row in rows) / len(rows) for i in range(task.num_outputs)]
                present = [p for p in prevalence if p > 0]
                if present:
                    baselines[task.name] = {"map": float(np.mean(present))}
    return baselines


__all__ = ["baseline_metrics"]
