"""Train on the union of datasets that each label only some tasks.

:func:`concatenate_partially_labelled` adds every task column a dataset lacks, filled with the
"missing label" value of its type, then joins the datasets with ``datasets.concatenate_datasets``:

- classification (``ClassLabel`` / int): ``-100`` (the ``TaskSpec`` / PyTorch ignore index);
- regression (float, or a fixed-length list of floats): ``NaN``;
- multilabel as a list of label indices (``List(ClassLabel)``): ``None`` (no list), which the
  collator turns into a row of ``NaN``; as a fixed-length multi-hot list of floats: ``NaN``s.

The model then gives a task zero loss on rows without its label, and zero loss and zero gradient
on a batch where no row has it (``MultiTaskTrainer`` leaves such a task out of the balancer).

Example:
    >>> from datasets import ClassLabel, Dataset, Features, Value
    >>> from hf_tlmtl import TaskSpec
    >>> tasks = [TaskSpec(name="shape", type="classification", num_labels=2), TaskSpec(name="scale", type="regression")]
    >>> a = Dataset.from_dict({"x": [1, 2], "shape": [0, 1]},
    ...                       features=Features({"x": Value("int64"), "shape": ClassLabel(names=["sq", "el"])}))
    >>> b = Dataset.from_dict({"x": [3], "scale": [0.5]})
    >>> both = concatenate_partially_labelled([a, b], tasks)
    >>> list(both["shape"]), list(both["scale"])
    ([0, 1, -100], [nan, nan, 0.5])
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from datasets import ClassLabel, Dataset, LargeList, List, Value, concatenate_datasets
from datasets import Sequence as SequenceFeature

from ..tasks import IGNORE_INDEX, TaskSpec

_LIST_FEATURES = (List, LargeList, SequenceFeature)


def missing_label_value(task: TaskSpec, feature: Any) -> Any:
    """The value that means "no label" for ``task`` stored as ``feature`` (a ``datasets`` feature).

    Example:
        >>> from datasets import Value
        >>> from hf_tlmtl import TaskSpec
        >>> missing_label_value(TaskSpec(name="y", type="regression"), Value("float32"))
        nan
    """
    if isinstance(feature, _LIST_FEATURES):
        inner = getattr(feature, "feature", None)
        length = getattr(feature, "length", -1)
        if isinstance(inner, Value) and inner.dtype.startswith("float") and length and length > 0:
            return [math.nan] * length
        return None  # a list of label indices (or of variable length): no list at all
    if task.type == "classification":
        return IGNORE_INDEX
    return math.nan


def concatenate_partially_labelled(datasets: Sequence[Dataset], tasks: Sequence[TaskSpec]) -> Dataset:
    """One dataset from several that each label only some of ``tasks``; missing labels filled.

    Every task column (``TaskSpec.source_column``) must be labelled by at least one dataset, and
    share one feature type across the datasets that have it. Other columns (images, ids) must be
    the same in every dataset. Datasets are concatenated in the given order; shuffle the result
    (the Trainer's sampler does) so batches mix them.

    Raises ``ValueError`` naming the dataset and column when a task is labelled nowhere, when its
    feature type differs between datasets, or when the non-task columns differ.

    Example:
        >>> from datasets import Dataset
        >>> from hf_tlmtl import TaskSpec
        >>> concatenate_partially_labelled([Dataset.from_dict({"x": [1]})], [TaskSpec(name="y", type="regression")])
        Traceback (most recent call last):
        ...
        ValueError: No dataset has a column 'y' for task 'y': give at least one dataset labelled for it, or drop the task.
    """
    datasets = list(datasets)
    if not datasets or not all(isinstance(d, Dataset) for d in datasets):
        raise ValueError(
            "concatenate_partially_labelled takes a list of datasets.Dataset (one split each, e.g. "
            "[ds_a['train'], ds_b['train']]), got " + repr([type(d).__name__ for d in datasets]) + "."
        )
    columns = {t.source_column: t for t in tasks}
    reference_features = {column: _shared_feature(datasets, column, task) for column, task in columns.items()}
    _check_other_columns(datasets, set(columns))

    filled = []
    for dataset in datasets:
        for column, task in columns.items():
            if column not in dataset.column_names:
                feature = reference_features[column]
                value = missing_label_value(task, feature)
                dataset = dataset.add_column(column, [value] * dataset.num_rows, feature=feature)
        filled.append(dataset)
    return concatenate_datasets(filled)


def _shared_feature(datasets: Sequence[Dataset], column: str, task: TaskSpec) -> Any:
    features = [(i, d.features[column]) for i, d in enumerate(datasets) if column in d.column_names]
    if not features:
        raise ValueError(
            f"No dataset has a column {column!r} for task {task.name!r}: give at least one dataset labelled "
            "for it, or drop the task."
        )
    first_index, first = features[0]
    for index, feature in features[1:]:
        if feature != first:
            raise ValueError(
                f"Column {column!r} (task {task.name!r}) is {first} in dataset {first_index} but {feature} in "
                f"dataset {index}: make them agree first (dataset.cast_column({column!r}, ...)); for ClassLabel "
                "the class names and their order must match."
            )
    if task.type == "classification" and not isinstance(first, (ClassLabel, Value)):
        raise ValueError(
            f"Column {column!r} (classification task {task.name!r}) holds {first}; expected class indices "
            "(ClassLabel or an int Value)."
        )
    return first


def _check_other_columns(datasets: Sequence[Dataset], task_columns: set[str]) -> None:
    others = [set(d.column_names) - task_columns for d in datasets]
    common = set.intersection(*others)
    for index, columns in enumerate(others):
        extra = sorted(columns - common)
        if extra:
            raise ValueError(
                f"Dataset {index} has column(s) {extra} that not every dataset has (and that are not task "
                f"labels): drop them first (dataset.remove_columns({extra})) or rename them to match."
            )
    for column in common:
        kinds = {str(d.features[column]) for d in datasets}
        if len(kinds) > 1:
            raise ValueError(
                f"Column {column!r} has different types across the datasets ({sorted(kinds)}): cast them to "
                f"one type first (dataset.cast_column({column!r}, ...))."
            )
