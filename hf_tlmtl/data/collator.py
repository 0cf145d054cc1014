"""Batches for :class:`~hf_tlmtl.TimmMultiTaskModel`: :class:`MultiTaskCollator` stacks images (or cached features)
and targets by task, filling tasks a dataset does not label as missing.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch

from ..configuration import TimmMultiTaskConfig
from ..tasks import IGNORE_INDEX, TaskSpec
from .labels import float_row
from .preparation import FEATURES_COLUMN
from .transforms import as_config


class MultiTaskCollator:
    """Stack prepared rows into a batch: inputs plus one label tensor per task.

    Inputs are ``pixel_values`` (images) or ``features`` (cached pooled features). Labels:
    classification ``long (B,)``; regression ``float (B,)`` for one output, ``(B, n)`` for more;
    multilabel multi-hot ``float (B, n)``. A task missing from a row (or ``None``) is filled
    with ``-100`` / ``NaN``, which the model leaves out of that task's loss, so datasets that
    label only some tasks can be mixed.

    Args:
        tasks: The model's tasks (a list of TaskSpec, the config, or the model).

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec
        >>> collate = MultiTaskCollator([TaskSpec(name="kind", type="classification", num_labels=3),
        ...                              TaskSpec(name="size", type="regression")])
        >>> batch = collate([{"pixel_values": torch.zeros(3, 8, 8), "kind": 2},
        ...                  {"pixel_values": torch.zeros(3, 8, 8), "size": 0.5}])
        >>> batch["kind"].tolist(), batch["size"].tolist()
        ([2, -100], [nan, 0.5])
    """

    def __init__(self, tasks: Sequence[TaskSpec] | TimmMultiTaskConfig | Any):
        if hasattr(tasks, "task_specs") or hasattr(tasks, "config"):
            tasks = as_config(tasks).task_specs
        self.tasks = list(tasks)
        if not self.tasks or not all(isinstance(t, TaskSpec) for t in self.tasks):
            raise ValueError("MultiTaskCollator needs the model's tasks: MultiTaskCollator(model.tasks).")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("MultiTaskCollator got an empty batch.")
        first = examples[0]
        input_key = next((k for k in ("pixel_values", FEATURES_COLUMN) if k in first), None)
        if input_key is None:
            raise ValueError(
                f"Rows need 'pixel_values' or '{FEATURES_COLUMN}', got keys {sorted(first)}; "
                "prepare the dataset with prepare_dataset(...) or cache_features(...)."
            )
        batch = {input_key: torch.stack([torch.as_tensor(e[input_key], dtype=torch.float32) for e in examples])}
        for task in self.tasks:
            batch[task.name] = self._labels(task, [e.get(task.name) for e in examples])
        return batch

    @staticmethod
    def _labels(task: TaskSpec, values: list[Any]) -> torch.Tensor:
        if task.type == "classification":
            return torch.tensor([IGNORE_INDEX if v is None else int(v) for v in values], dtype=torch.long)
        width = task.num_outputs
        if all(isinstance(v, torch.Tensor) and v.numel() == width for v in values):
            labels = torch.stack([v.reshape(width) for v in values]).float()
        else:
            labels = torch.tensor([float_row(v, width, task) for v in values], dtype=torch.float32)
        return labels.reshape(-1) if task.type == "regression" and width == 1 else labels


def check_first_batch(dataset: Any, collator: MultiTaskCollator, size: int = 2) -> dict[str, torch.Tensor]:
    """Collate the first ``size`` rows of ``dataset`` (a ``Dataset`` or a stream): data errors surface now, not in training.

    Rows are read through the dataset's transform, so an unreadable image or a label outside its task's classes
    raises here. Returns the batch.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec
        >>> rows = [{"pixel_values": torch.zeros(3, 8, 8), "kind": 1}, {"pixel_values": torch.zeros(3, 8, 8), "kind": 0}]
        >>> check_first_batch(rows, MultiTaskCollator([TaskSpec(name="kind", type="classification", num_labels=2)]))["kind"]
        tensor([1, 0])
    """
    if hasattr(dataset, "__len__"):
        first = [dataset[i] for i in range(min(size, len(dataset)))]
    else:
        first = list(itertools.islice(iter(dataset), size))
    return collator(first)
