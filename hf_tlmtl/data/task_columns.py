"""Tasks from a dataset's columns: stated (``"digit:classification:10"``) or inferred from the features, and the
label columns encoded to match them (:func:`resolve_tasks`).

- ``ClassLabel`` -> classification, float -> regression, list of ``ClassLabel`` -> multilabel;
- string columns (CSV/Parquet class names) become ``ClassLabel`` (sorted names, or the task's
  stated labels, in that order); lists of strings become lists of ``ClassLabel``;
- int columns are class indices only when the task is stated (``digit:classification:10``).

Every problem is a ``ValueError`` that names the column, value and row, and the fix.

Example:
    >>> from hf_tlmtl.data import load_image_dataset
    >>> ds, tasks = resolve_tasks(load_image_dataset("shapes", n_train=8, n_eval=4, image_size=32), "shape,scale,marks")
    >>> [(t.name, t.type, t.num_outputs) for t in tasks]
    [('shape', 'classification', 4), ('scale', 'regression', 1), ('marks', 'multilabel', 3)]
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers.utils import logging

from ..tasks import IGNORE_INDEX, TASK_TYPES, TaskSpec
from .labels import INT_DTYPES, STRING_DTYPES

logger = logging.get_logger(__name__)


def parse_task_arg(spec: str | Sequence[str | dict[str, Any]]) -> list[dict[str, Any]]:
    """Task requests from ``--tasks``: partial :class:`TaskSpec` dicts (``name`` always, the rest if stated).

    Accepted forms: ``"shape,scale"`` (types inferred); ``"shape:classification,scale:regression"``;
    classes after a second colon, ``"shape:classification:square|circle"`` or a count,
    ``"digit:classification:10"``; a JSON list of TaskSpec dicts; or (from YAML) a list of such
    strings / dicts.

    Example:
        >>> parse_task_arg("shape:classification:square|circle,scale")
        [{'name': 'shape', 'type': 'classification', 'labels': ['square', 'circle']}, {'name': 'scale'}]
        >>> parse_task_arg('[{"name": "age", "type": "regression", "weight": 0.5}]')
        [{'name': 'age', 'type': 'regression', 'weight': 0.5}]
    """
    if isinstance(spec, Mapping) or (isinstance(spec, str) and spec.strip().startswith("{")):
        raise ValueError(
            f"--tasks is a list of task specs (tasks: [shape, 'age:regression'] in YAML, or --tasks shape,age:regression), "
            f"not a mapping: {spec if isinstance(spec, str) else json.dumps(dict(spec))}"
        )
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("["):
            try:
                items: Sequence[Any] = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--tasks looks like JSON but does not parse ({e}).") from None
        else:
            items = [s for s in (part.strip() for part in text.split(",")) if s]
    else:
        items = list(spec)
    requests = []
    for item in items:
        request = dict(item) if isinstance(item, dict) else _parse_task_item(str(item))
        if not request.get("name"):
            raise ValueError(f"Task {item!r} has no name; write name[:type[:labels]], e.g. shape:classification.")
        if request.get("type") is not None and request["type"] not in TASK_TYPES:
            close = difflib.get_close_matches(str(request["type"]), TASK_TYPES, n=1)
            raise ValueError(
                f"Task {request['name']!r}: unknown type {request['type']!r}; use one of {list(TASK_TYPES)}"
                + (f" (did you mean {close[0]!r}?)." if close else ".")
            )
        requests.append(request)
    if not requests:
        raise ValueError("--tasks is empty; name at least one column, e.g. --tasks label.")
    names = [r["name"] for r in requests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--tasks names {duplicates} more than once.")
    return requests


def _parse_task_item(item: str) -> dict[str, Any]:
    name, _, rest = item.partition(":")
    kind, _, classes = rest.partition(":")
    request: dict[str, Any] = {"name": name.strip()}
    if kind.strip():
        request["type"] = kind.strip()
    classes = classes.strip()
    if classes.isdigit():
        request["num_labels"] = int(classes)
    elif classes:
        request["labels"] = [c.strip() for c in classes.split("|")]
    return request


def infer_tasks(features: Features, image_column: str = "image", names: Iterable[str] | None = None) -> list[TaskSpec]:
    """TaskSpecs from column features: ClassLabel -> classification, float -> regression, list of
    ClassLabel -> multilabel. ``names`` restricts (and orders) the columns; without it, columns of
    other types are skipped.

    Example:
        >>> from datasets import ClassLabel, Features, List, Value
        >>> features = Features({"image": Value("string"), "kind": ClassLabel(names=["a", "b"]),
        ...                      "size": Value("float32"), "tags": List(ClassLabel(names=["x", "y", "z"])),
        ...                      "id": Value("int64")})
        >>> [(t.name, t.type, t.num_outputs) for t in infer_tasks(features)]
        [('kind', 'classification', 2), ('size', 'regression', 1), ('tags', 'multilabel', 3)]
    """
    columns = [c for c in features if c != image_column]
    if names is not None:
        names = list(names)
        for name in names:
            _require_column(name, columns)
        columns = names
    tasks = []
    for column in columns:
        kind, labels = _kind_from_feature(features[column])
        if kind is None:
            if names is not None:
                raise ValueError(
                    f"Cannot infer a task type for column {column!r} ({features[column]}); state it, e.g. "
                    f"--tasks {column}:regression or {column}:classification:NUM_CLASSES."
                )
            continue
        tasks.append(TaskSpec(name=_task_name(column), type=kind, labels=labels, column=_column_if_renamed(column)))
    if not tasks:
        raise ValueError(
            f"No task columns found among {columns} (tasks are ClassLabel, float or list-of-ClassLabel columns); "
            "state them with --tasks name:type,..."
        )
    return tasks


def _kind_from_feature(feature: Any) -> tuple[str | None, list[str] | None]:
    if isinstance(feature, ClassLabel):
        return "classification", list(feature.names)
    item = getattr(feature, "feature", None)
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and isinstance(item, ClassLabel):
        return "multilabel", list(item.names)
    if isinstance(feature, Value) and feature.dtype.startswith(("float", "bfloat")):
        return "regression", None
    return None, None


def _task_name(column: str) -> str:
    """Column names such as ``"hair color"`` become identifiers (``hair_color``) for the task name."""
    name = re.sub(r"\W+", "_", column).strip("_") or "task"
    return f"t_{name}" if name[0].isdigit() else name


def _column_if_renamed(column: str) -> str | None:
    return None if _task_name(column) == column else column


def _require_column(column: str, columns: Sequence[str]) -> None:
    if column not in columns:
        close = difflib.get_close_matches(column, columns, n=1)
        raise ValueError(
            f"Task column {column!r} is not in the dataset; the columns are {list(columns)}."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )


def resolve_tasks(
    data: DatasetDict, tasks: str | Sequence[str | dict[str, Any]] | None = None, image_column: str = "image"
) -> tuple[DatasetDict, list[TaskSpec]]:
    """The tasks of ``data`` (stated in ``tasks`` or inferred) and ``data`` with label columns encoded for them.

    String class columns become ``ClassLabel`` in the order of the task's stated labels (else
    sorted), ``ClassLabel`` columns are re-ordered to stated labels, and class values are
    checked against the task's classes in every split. Missing values (``None``) stay missing.

    Example:
        >>> from datasets import Dataset, DatasetDict
        >>> ds = DatasetDict(train=Dataset.from_dict({"image": ["a.png", "b.png"], "kind": ["dog", "cat"]}))
        >>> ds, tasks = resolve_tasks(ds, "kind:classification:dog|cat")
        >>> tasks[0].labels, list(ds["train"]["kind"])
        (['dog', 'cat'], [0, 1])
        >>> resolve_tasks(ds, "kind:classification:dog|bird")
        Traceback (most recent call last):
        ...
        ValueError: Column 'kind' has class 'cat' (train row 1, image 'b.png'), not one of the labels of task 'kind': ['dog', 'bird']; fix the data or list every class in --tasks.
    """
    columns = [c for c in data["train"].column_names if c != image_column]
    if tasks is None or (isinstance(tasks, str) and not tasks.strip()):
        for column in columns:
            _refuse_ambiguous(data, column)
        candidates = [c for c in columns if _candidate(data, c)]  # reads string columns: once
        requests = [{"name": _task_name(c), "column": _column_if_renamed(c)} for c in candidates]
        if not requests:
            single = [c for c in columns if _is_strings(data["train"].features[c]) and len({v for v in _all_values(data, c) if v is not None}) == 1]
            if single:
                value = next(v for v in _all_values(data, single[0]) if v is not None)
                raise ValueError(
                    f"Column {single[0]!r} holds one value ({value!r}) in every row, so there is nothing to learn from it "
                    "and no other column names a task; add images of other classes, or add a label column."
                )
        left_out = [c for c in columns if c not in candidates and _is_ints(data["train"].features[c])]
        if left_out:
            logger.warning(
                "Integer column(s) %s left out of the inferred tasks: class indices and ids look the same. To train on "
                "one, state it: --tasks %s:classification:NUM_CLASSES (or :regression).", left_out, left_out[0],
            )
        if not requests:
            infer_tasks(data["train"].features, image_column)  # raises the "no task columns" error
        inferred = True
    else:
        requests = parse_task_arg(tasks)
        inferred = False
    specs = []
    for request in requests:
        column = request.get("column") or request["name"]
        _require_column(column, columns)
        data = _encode_column(data, column, request, image_column)
        specs.append(_task_spec(data, column, request, image_column))
    if inferred and not specs:
        raise ValueError(f"No task columns found among {columns}; state them with --tasks name:type,...")
    return data, specs


def _candidate(data: DatasetDict, column: str) -> bool:
    """Inference: typed label columns, plus string columns whose values repeat (class names, not ids/paths)."""
    feature = data["train"].features[column]
    if _kind_from_feature(feature)[0] is not None:
        return True
    if _is_strings(feature) or _is_string_lists(feature):
        values = _all_values(data, column)
        flat = [v for row in values for v in (row or [])] if _is_string_lists(feature) else values
        distinct = {v for v in flat if v is not None}
        return 2 <= len(distinct) <= max(2, len(values) // 2)
    return False


def _is_ints(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in INT_DTYPES


_DECIMAL_COMMA = re.compile(r"^\s*-?\d+,\d+\s*$")


def _refuse_ambiguous(data: DatasetDict, column: str) -> None:
    """Inference refuses to guess what a column is when the file's format hid it:

    - whole numbers with empty cells: a CSV reader makes them floats, so they would look like a regression
      target although they are most often class indices;
    - numbers written with a decimal comma (``1,5``): read as text, they would be dropped or taken as class names.
    """
    feature = data["train"].features[column]
    if isinstance(feature, Value) and feature.dtype in ("float16", "float32", "float64"):
        values = np.asarray([v for split in data.values() for v in split[column]], dtype=np.float64)
        present = values[~np.isnan(values)]
        if present.size and present.size < values.size and np.all(present == np.round(present)):
            raise ValueError(
                f"Column {column!r} holds whole numbers and {values.size - present.size} empty cell(s): class indices or a "
                f"number to regress? State it: --tasks {column}:classification:NUM_CLASSES (empty = no label) or "
                f"{column}:regression."
            )
    if _is_strings(feature):
        values = [v for v in _all_values(data, column) if v is not None]
        if values and all(_DECIMAL_COMMA.match(v) for v in values):
            raise ValueError(
                f"Column {column!r} holds numbers written with a decimal comma ({values[0]!r}); write them with a decimal "
                f"point, or convert the column (float(value.replace(',', '.'))) and state it: --tasks {column}:regression."
            )


def _is_strings(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in STRING_DTYPES


def _is_string_lists(feature: Any) -> bool:
    item = getattr(feature, "feature", None)
    return isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and _is_strings(item)


def _all_values(data: DatasetDict, column: str) -> list[Any]:
    return [v for split in data.values() for v in split[column]]


def _describe_row(split_name: str, split: Dataset, row: int, image_column: str) -> str:
    """"train row 3, image 'x.png'" (the image file name when the images are files)."""
    where = f"{split_name} row {row}"
    if image_column in split.column_names:
        item = split.cast_column(image_column, datasets.Image(decode=False))[row][image_column]
        if isinstance(item, dict) and item.get("path"):
            where += f", image {Path(item['path']).name!r}"
    return where


def _locate(data: DatasetDict, column: str, bad: Any, image_column: str) -> str:
    """Where the first row whose value in ``column`` is (or, for lists, contains) ``bad`` is."""
    for split_name, split in data.items():
        for row, value in enumerate(split[column]):
            if value == bad or (isinstance(value, list) and bad in value):
                return _describe_row(split_name, split, row, image_column)
    return "row unknown"


def _encode_column(data: DatasetDict, column: str, request: dict[str, Any], image_column: str) -> DatasetDict:
    """String (or list-of-string) class columns -> ClassLabel; ClassLabel columns -> the stated label order."""
    feature = data["train"].features[column]
    kind = request.get("type")
    stated = request.get("labels")
    multilabel = _is_string_lists(feature) or (isinstance(getattr(feature, "feature", None), ClassLabel))
    if _is_strings(feature) or _is_string_lists(feature):
        if kind == "regression":
            raise ValueError(
                f"Column {column!r} holds text, but task {request['name']!r} is regression; use a numeric column "
                "or type classification."
            )
        values = _all_values(data, column)
        flat = [v for row in values for v in (row or [])] if multilabel else values
        present = sorted({str(v) for v in flat if v is not None})
        names = [str(x) for x in stated] if stated else present
        _check_known(data, column, request, present, names, image_column)
        return _recode(data, column, names, {n: i for i, n in enumerate(names)}, multilabel, from_names=True)
    label = feature if isinstance(feature, ClassLabel) else getattr(feature, "feature", None)
    if isinstance(label, ClassLabel) and stated and list(label.names) != [str(x) for x in stated]:
        names = [str(x) for x in stated]
        present_ids = {v for v in (_flatten(_all_values(data, column)) if multilabel else _all_values(data, column)) if v is not None}
        present = sorted({label.names[i] for i in present_ids})
        _check_known(data, column, request, present, names, image_column, old_names=label.names)
        mapping = {i: names.index(n) for i, n in enumerate(label.names) if n in names}
        return _recode(data, column, names, mapping, multilabel, from_names=False)
    return data


def _flatten(rows: list[Any]) -> list[Any]:
    return [v for row in rows for v in (row or [])]


def _check_known(
    data: DatasetDict,
    column: str,
    request: dict[str, Any],
    present: list[str],
    names: list[str],
    image_column: str,
    old_names: Sequence[str] | None = None,
) -> None:
    unknown = [v for v in present if v not in names]
    if not unknown:
        return
    bad = unknown[0]
    target: Any = old_names.index(bad) if old_names is not None else bad
    where = _locate(data, column, target, image_column)
    raise ValueError(
        f"Column {column!r} has class {bad!r} ({where}), not one of the labels of task {request['name']!r}: {names}; "
        "fix the data or list every class in --tasks."
    )


def _recode(
    data: DatasetDict, column: str, names: list[str], mapping: dict[Any, int], multilabel: bool, from_names: bool
) -> DatasetDict:
    label = ClassLabel(names=names)
    features = data["train"].features.copy()
    features[column] = datasets.List(label) if multilabel else label

    def lookup(value: Any) -> Any:
        return None if value is None else mapping[str(value) if from_names else value]

    def recode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if multilabel:
            batch[column] = [None if row is None else [lookup(v) for v in row] for row in batch[column]]
        else:
            batch[column] = [lookup(v) for v in batch[column]]
        return batch

    return DatasetDict(
        {
            name: split.map(recode, batched=True, features=_split_features(split, features, column), desc=f"Encoding {column}")
            for name, split in data.items()
        }
    )


def _split_features(split: Dataset, features: Features, column: str) -> Features:
    """``features`` with only ``column`` changed, for one split (splits may differ in other columns)."""
    own = split.features.copy()
    own[column] = features[column]
    return own


def _task_spec(data: DatasetDict, column: str, request: dict[str, Any], image_column: str) -> TaskSpec:
    feature = data["train"].features[column]
    inferred_kind, labels = _kind_from_feature(feature)
    kind = request.get("type") or inferred_kind
    is_int = isinstance(feature, Value) and feature.dtype in INT_DTYPES
    if kind is None:
        hint = f"{request['name']}:classification:NUM_CLASSES" if is_int else f"{request['name']}:regression"
        raise ValueError(f"Cannot infer a task type for column {column!r} ({feature}); state it, e.g. --tasks {hint}.")
    fields = {k: v for k, v in request.items() if k not in ("name", "type", "labels", "num_labels", "column")}
    stated_labels = request.get("labels")
    num_labels = request.get("num_labels")
    if kind in ("classification", "multilabel"):
        if labels is None and not stated_labels and num_labels is None:
            if not is_int:
                raise ValueError(
                    f"Task {request['name']!r} ({kind}) reads column {column!r} ({feature}), which has no class names; "
                    f"state them: --tasks {request['name']}:{kind}:a|b|c."
                )
            num_labels = max(2, _max_int(data, column) + 1)
        if is_int:
            _check_class_indices(data, column, request["name"], len(stated_labels) if stated_labels else num_labels, image_column)
        if stated_labels:
            labels = [str(x) for x in stated_labels]
        elif num_labels is not None:
            labels = None
        if kind == "classification" and labels is not None and len(labels) == 1:
            raise ValueError(
                f"Column {column!r} holds one class ({labels[0]!r}) in every row: a classification task needs at least "
                f"two; add images of another class, or state the classes it can take: --tasks "
                f"{request['name']}:classification:{labels[0]}|OTHER."
            )
    elif kind == "regression":
        labels = [str(x) for x in stated_labels] if stated_labels else None
    try:
        return TaskSpec(
            name=request["name"],
            type=kind,
            labels=labels,
            num_labels=None if labels else num_labels,
            column=request.get("column") or (None if column == request["name"] else column),
            **fields,
        )
    except TypeError as e:
        raise ValueError(f"Task {request['name']!r}: {e}; TaskSpec fields are name, type, labels, num_labels, weight, loss, column.") from None


def _int_column(data: DatasetDict, split: str, column: str) -> np.ndarray:
    values = data[split].data.column(column).to_numpy(zero_copy_only=False)
    return np.asarray([IGNORE_INDEX if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values], dtype=np.int64)


def _max_int(data: DatasetDict, column: str) -> int:
    return int(max((_int_column(data, s, column).max(initial=0) for s in data), default=0))


def _check_class_indices(data: DatasetDict, column: str, task: str, num_classes: int, image_column: str) -> None:
    for split in data:
        values = _int_column(data, split, column)
        bad = np.flatnonzero((values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes)))
        if bad.size:
            row = int(bad[0])
            where = _describe_row(split, data[split], row, image_column)
            raise ValueError(
                f"Column {column!r} has class index {int(values[row])} ({where}), "
                f"outside task {task!r}'s {num_classes} classes (0..{num_classes - 1}); fix the data or state the "
                f"number of classes: --tasks {task}:classification:N."
            )
