"""Label columns checked against the tasks (:func:`plan_label_columns`), scanned for infinite values
(:func:`check_finite_labels`) and encoded as targets (:func:`encode_labels`): class indices, values, multi-hot rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import ClassLabel, Dataset, DatasetDict, List, Value

from ..tasks import IGNORE_INDEX, TaskSpec


@dataclass(frozen=True)
class LabelColumn:
    """How one task's labels are read from a dataset column.

    ``kind`` is ``class`` (class index), ``value`` (one float), ``values`` (float vector),
    ``indices`` (multilabel as a list of class indices) or ``multihot`` (multilabel as 0/1 row).
    """

    task: TaskSpec
    column: str
    kind: str


_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}


STRING_DTYPES = ("string", "large_string")
INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def _list_item(feature: Any) -> tuple[Any, int] | None:
    """(item feature, fixed length or -1) of a list-like feature, else None."""
    if isinstance(feature, (List, datasets.LargeList)):
        return feature.feature, getattr(feature, "length", -1)
    return None


def _check_class_names(task: TaskSpec, column: str, label: ClassLabel) -> None:
    if label.num_classes > task.num_outputs:
        raise ValueError(
            f"Task {task.name!r}: column {column!r} has {label.num_classes} classes but the task has "
            f"{task.num_outputs} outputs. Build the task from the dataset: "
            f"TaskSpec(name={task.name!r}, type={task.type!r}, labels=dataset.features[{column!r}].names)."
        )
    if task.labels and label.names != task.labels[: label.num_classes]:
        raise ValueError(
            f"Task {task.name!r}: class names of column {column!r} {label.names} do not match the task's labels "
            f"{task.labels} (same order needed). Reorder the column with "
            f"dataset.align_labels_with_mapping(task.label2id, {column!r}) or build the task from the dataset's names."
        )


def _label_kind(task: TaskSpec, column: str, feature: Any) -> str:
    """Check a column's feature type against the task type; return how to read it."""
    dtype = getattr(feature, "dtype", None)
    item = _list_item(feature)
    described = f"Task {task.name!r} ({task.type}): column {column!r} has feature {feature}"
    if task.type == "classification":
        if isinstance(feature, ClassLabel):
            _check_class_names(task, column, feature)
            return "class"
        if isinstance(feature, Value) and dtype in INT_DTYPES:
            return "class"
        fix = (
            f"encode it with dataset = dataset.class_encode_column({column!r})"
            if dtype in ("string", "large_string")
            else "use a column of class indices (ClassLabel or int)"
        )
        raise ValueError(f"{described}; classification needs class indices: {fix}.")
    if task.type == "regression":
        if isinstance(feature, ClassLabel):
            raise ValueError(f"{described}, a class label; make the task type='classification' or use a float column.")
        if isinstance(feature, Value) and dtype in _FLOAT_DTYPES | INT_DTYPES:
            if task.num_outputs != 1:
                raise ValueError(
                    f"{described}, one number per row, but the task has {task.num_outputs} outputs; "
                    "use a list column of that length or num_labels=1."
                )
            return "value"
        if item and isinstance(item[0], Value) and item[0].dtype in _FLOAT_DTYPES | INT_DTYPES:
            if item[1] not in (-1, None) and item[1] != task.num_outputs:
                raise ValueError(f"{described} ({item[1]} values per row) but the task has {task.num_outputs} outputs.")
            return "values"
        raise ValueError(f"{described}; regression needs numbers: cast with dataset.cast_column({column!r}, Value('float32')).")
    # multilabel
    if item and isinstance(item[0], ClassLabel):
        _check_class_names(task, column, item[0])
        return "indices"
    if item and isinstance(item[0], Value) and item[0].dtype in _FLOAT_DTYPES | INT_DTYPES | {"bool"}:
        if item[1] not in (-1, None) and item[1] != task.num_outputs:
            raise ValueError(f"{described} ({item[1]} values per row) but the task has {task.num_outputs} outputs.")
        return "multihot"
    raise ValueError(
        f"{described}; multilabel needs a list of class indices (cast with dataset.cast_column({column!r}, "
        f"List(ClassLabel(names=...)))) or a multi-hot list of {task.num_outputs} numbers per row."
    )


def require_dataset(dataset: Any, what: str) -> Dataset:
    if isinstance(dataset, DatasetDict):
        raise ValueError(
            f"{what} takes one split (a datasets.Dataset), got a DatasetDict with splits {list(dataset)}; "
            f"call it per split, e.g. {what}(ds['train'], ...)."
        )
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{what} needs a datasets.Dataset, got {type(dataset).__name__}.")
    return dataset


def plan_label_columns(
    dataset: Dataset, tasks: Sequence[TaskSpec], labelled_tasks: Iterable[str] | None
) -> list[LabelColumn]:
    by_name = {t.name: t for t in tasks}
    wanted = list(by_name) if labelled_tasks is None else list(labelled_tasks)
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise ValueError(f"labelled_tasks names unknown task(s) {unknown}; the model's tasks are {list(by_name)}.")
    columns = dataset.column_names
    plan = []
    for name in wanted:
        task = by_name[name]
        column = task.source_column
        if column not in columns:
            raise ValueError(
                f"Task {name!r} reads column {column!r}, which the dataset does not have (columns: {columns}). "
                f"Rename the column (dataset.rename_column(old, {column!r})), set TaskSpec(column=...), or pass "
                f"labelled_tasks=[...] without {name!r} if this dataset does not label it."
            )
        plan.append(LabelColumn(task, column, _label_kind(task, column, dataset.features[column])))
    return plan


def float_row(value: Any, width: int, task: TaskSpec) -> list[float]:
    """One regression / multilabel target as ``width`` floats (``NaN`` for a missing label)."""
    if value is None:
        return [math.nan] * width
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    row = [math.nan if v is None else float(v) for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value])]
    if len(row) != width:
        raise ValueError(f"Task {task.name!r}: expected {width} value(s) per row, got {len(row)}: {value!r}.")
    return row


def _multi_hot(indices: Any, task: TaskSpec) -> list[float]:
    if indices is None:
        return [math.nan] * task.num_outputs
    row = [0.0] * task.num_outputs
    for index in indices:
        if not 0 <= int(index) < task.num_outputs:
            raise ValueError(f"Task {task.name!r}: label index {index} out of range for {task.num_outputs} labels.")
        row[int(index)] = 1.0
    return row


def check_finite_labels(dataset: Dataset, labels: Sequence[LabelColumn]) -> None:
    """``ValueError`` naming the task, column and first row when a regression / multilabel column holds ``inf``.

    ``NaN`` (or an empty cell) is a missing label; an infinite one is an error in the data that would turn the
    weights NaN at the first step it reaches, so it is refused before training.

    Example:
        >>> from datasets import Dataset
        >>> from hf_tlmtl import TaskSpec
        >>> ds = Dataset.from_dict({"age": [31.0, float("nan"), float("inf")]})
        >>> check_finite_labels(ds, plan_label_columns(ds, [TaskSpec(name="age", type="regression")], None))
        Traceback (most recent call last):
        ...
        ValueError: Task 'age' (column 'age'): row 2 holds inf (1 infinite value in the column). A regression / multilabel label must be a finite number, or NaN / empty for a missing one: fix or drop those rows (dataset.filter(...)).
    """
    for label in labels:
        if label.kind not in ("value", "values", "multihot"):
            continue
        column = dataset.select_columns([label.column]).with_format("arrow")[:][label.column].combine_chunks()
        rows = np.arange(len(column))
        while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
            rows = rows[pc.list_parent_indices(column).to_numpy()]
            column = pc.list_flatten(column)
        values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = np.flatnonzero(np.isinf(values))
        if bad.size:
            raise ValueError(
                f"Task {label.task.name!r} (column {label.column!r}): row {int(rows[bad[0]])} holds {values[bad[0]]:g} "
                f"({bad.size} infinite value{'s' if bad.size > 1 else ''} in the column). A regression / multilabel label "
                "must be a finite number, or NaN / empty for a missing one: fix or drop those rows (dataset.filter(...))."
            )


def encode_labels(label: LabelColumn, values: list[Any]) -> torch.Tensor:
    task = label.task
    if label.kind == "class":
        # None and -1 (datasets' ClassLabel "no label") are missing labels.
        return torch.tensor([IGNORE_INDEX if v is None or v == -1 else int(v) for v in values], dtype=torch.long)
    if label.kind == "value":
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    if label.kind == "indices":
        return torch.tensor([_multi_hot(v, task) for v in values], dtype=torch.float32).reshape(-1, task.num_outputs)
    return torch.tensor([float_row(v, task.num_outputs, task) for v in values], dtype=torch.float32).reshape(
        -1, task.num_outputs
    )
