"""Data for :class:`~hf_tlmtl.TimmMultiTaskModel`: timm transforms, dataset preparation, collator, feature cache.

The flow for a ``datasets.Dataset`` with an image column and one column per task::

    train = prepare_dataset(ds["train"], model.config, train=True)        # checks + lazy timm transform
    evals = prepare_dataset(ds["validation"], model.config, train=False)
    trainer = MultiTaskTrainer(model, args, train_dataset=train, eval_dataset=evals,
                               data_collator=MultiTaskCollator(model.tasks))

With a frozen backbone, :func:`cache_features` runs it once and stores the pooled features in
an Arrow cache that ``datasets`` reuses as long as the backbone weights, the data and the
transform are unchanged; the heads then train on ``model(features=...)``.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
    >>> from hf_tlmtl.embedded import load_embedded_dataset
    >>> ds = load_embedded_dataset("shapes", n_train=4, n_eval=2, image_size=32)
    >>> tasks = [TaskSpec(name="shape", type="classification", labels=ds["train"].features["shape"].names),
    ...          TaskSpec(name="scale", type="regression")]
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32)
    >>> train = prepare_dataset(ds["train"], model.config, train=True)
    >>> batch = MultiTaskCollator(model.tasks)([train[i] for i in range(4)])
    >>> batch["pixel_values"].shape, batch["shape"].dtype, batch["scale"].shape
    (torch.Size([4, 3, 32, 32]), torch.int64, torch.Size([4]))
    >>> bool(model(**batch).loss.isfinite())
    True
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import datasets
import numpy as np
import timm.data
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from PIL import Image as PILImage

from .configuration import TimmMultiTaskConfig
from .tasks import IGNORE_INDEX, TaskSpec

FEATURES_COLUMN = "features"
"""Column (and model keyword) holding pooled backbone features in a feature cache."""
ROW_COLUMN = "__hf_tlmtl_row__"
"""Column :func:`prepare_dataset` adds (with ``seed=``) so the transform knows which row it augments."""

# timm's default RandomResizedCrop keeps as little as 8% of the image (ImageNet at 224 px);
# small images lose the object at that zoom, so training crops keep at least 35% by default.
DEFAULT_TRAIN_SCALE = (0.35, 1.0)
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# Bumped when the layout of the feature cache changes, so old cache files are not reused.
_FEATURE_CACHE_VERSION = "1"


# ----------------------------------------------------------------------------------- transforms
def _as_config(config: Any) -> TimmMultiTaskConfig:
    """Accept a config or anything carrying one (the model)."""
    config = getattr(config, "config", config)
    if not isinstance(config, TimmMultiTaskConfig):
        raise ValueError(
            f"Expected a TimmMultiTaskConfig (or a TimmMultiTaskModel), got {type(config).__name__}; "
            "pass model.config."
        )
    return config


def build_transforms(config: TimmMultiTaskConfig, train: bool, **timm_overrides: Any) -> Callable:
    """timm's train or eval transform for the model's data config (input size, mean, std, crop).

    ``train=True`` gives timm's standard augmentation (random resized crop, horizontal flip,
    colour jitter; crop scale floor raised to :data:`DEFAULT_TRAIN_SCALE`); ``train=False``
    gives the deterministic resize + centre crop the model is evaluated with. Any keyword of
    ``timm.data.create_transform`` overrides (``scale=(1.0, 1.0)``, ``hflip=0.0``,
    ``auto_augment="rand-m9-mstd0.5"`` ...). Geometric augmentation changes geometric labels
    (size, rotation, position): for such regression tasks pass ``scale=(1, 1), ratio=(1, 1),
    hflip=0.0`` or train on the eval transform.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")],
        ...                                          image_size=32)
        >>> from PIL import Image
        >>> build_transforms(model.config, train=False)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    config = _as_config(config)
    data_config = config.data_config or {}
    if "input_size" not in data_config:
        raise ValueError(
            "The model config has no data_config['input_size']; build the model with "
            "TimmMultiTaskModel.from_backbone(...), which resolves timm's data config."
        )
    kwargs: dict[str, Any] = {k: data_config[k] for k in _TRANSFORM_KEYS if data_config.get(k) is not None}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    for key in ("mean", "std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if train:
        kwargs["scale"] = DEFAULT_TRAIN_SCALE
    kwargs.update(timm_overrides)
    return timm.data.create_transform(is_training=train, **kwargs)


# ------------------------------------------------------------------------------ label columns
@dataclass(frozen=True)
class _LabelColumn:
    """How one task's labels are read from a dataset column.

    ``kind`` is ``class`` (class index), ``value`` (one float), ``values`` (float vector),
    ``indices`` (multilabel as a list of class indices) or ``multihot`` (multilabel as 0/1 row).
    """

    task: TaskSpec
    column: str
    kind: str


_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}
_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


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
        if isinstance(feature, Value) and dtype in _INT_DTYPES:
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
        if isinstance(feature, Value) and dtype in _FLOAT_DTYPES | _INT_DTYPES:
            if task.num_outputs != 1:
                raise ValueError(
                    f"{described}, one number per row, but the task has {task.num_outputs} outputs; "
                    "use a list column of that length or num_labels=1."
                )
            return "value"
        if item and isinstance(item[0], Value) and item[0].dtype in _FLOAT_DTYPES | _INT_DTYPES:
            if item[1] not in (-1, None) and item[1] != task.num_outputs:
                raise ValueError(f"{described} ({item[1]} values per row) but the task has {task.num_outputs} outputs.")
            return "values"
        raise ValueError(f"{described}; regression needs numbers: cast with dataset.cast_column({column!r}, Value('float32')).")
    # multilabel
    if item and isinstance(item[0], ClassLabel):
        _check_class_names(task, column, item[0])
        return "indices"
    if item and isinstance(item[0], Value) and item[0].dtype in _FLOAT_DTYPES | _INT_DTYPES | {"bool"}:
        if item[1] not in (-1, None) and item[1] != task.num_outputs:
            raise ValueError(f"{described} ({item[1]} values per row) but the task has {task.num_outputs} outputs.")
        return "multihot"
    raise ValueError(
        f"{described}; multilabel needs a list of class indices (cast with dataset.cast_column({column!r}, "
        f"List(ClassLabel(names=...)))) or a multi-hot list of {task.num_outputs} numbers per row."
    )


def _require_dataset(dataset: Any, what: str) -> Dataset:
    if isinstance(dataset, DatasetDict):
        raise ValueError(
            f"{what} takes one split (a datasets.Dataset), got a DatasetDict with splits {list(dataset)}; "
            f"call it per split, e.g. {what}(ds['train'], ...)."
        )
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{what} needs a datasets.Dataset, got {type(dataset).__name__}.")
    return dataset


def _plan_label_columns(
    dataset: Dataset, tasks: Sequence[TaskSpec], labelled_tasks: Iterable[str] | None
) -> list[_LabelColumn]:
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
        plan.append(_LabelColumn(task, column, _label_kind(task, column, dataset.features[column])))
    return plan


# ---------------------------------------------------------------------------- label encoding
def _float_row(value: Any, width: int, task: TaskSpec) -> list[float]:
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


def _encode_labels(label: _LabelColumn, values: list[Any]) -> torch.Tensor:
    task = label.task
    if label.kind == "class":
        # None and -1 (datasets' ClassLabel "no label") are missing labels.
        return torch.tensor([IGNORE_INDEX if v is None or v == -1 else int(v) for v in values], dtype=torch.long)
    if label.kind == "value":
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    if label.kind == "indices":
        return torch.tensor([_multi_hot(v, task) for v in values], dtype=torch.float32).reshape(-1, task.num_outputs)
    return torch.tensor([_float_row(v, task.num_outputs, task) for v in values], dtype=torch.float32).reshape(
        -1, task.num_outputs
    )


class _BatchTransform:
    """The ``with_transform`` function: images -> ``pixel_values`` (or cached ``features``), labels by task.

    With ``seed``, each image is transformed under random generators (Python's, NumPy's and torch's)
    seeded from ``(seed, epoch, row)`` and put back afterwards: the same row in the same epoch gets
    the same augmentation whichever process, worker or resumed run reads it, and reading it does not
    move the generators that the training step uses (dropout, the sampler's shuffle). The Trainer
    sets the epoch (:meth:`set_epoch`, by ``MultiTaskTrainer``).
    """

    def __init__(
        self,
        labels: list[_LabelColumn],
        image_column: str | None,
        image_transform: Callable | None,
        seed: int | None = None,
    ):
        self.labels = labels
        self.image_column = image_column
        self.image_transform = image_transform
        self.seed = seed
        self.epoch = 0

    @property
    def labelled_tasks(self) -> list[str]:
        return [label.task.name for label in self.labels]

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next rows are read in (a seeded transform draws new augmentations per epoch)."""
        self.epoch = int(epoch)

    def _row_seed(self, row: int) -> int:
        # Per image, so kept cheap (benchmarks/data_loading.py): a hash rather than np.random.SeedSequence (~0.2 ms).
        key = struct.pack("<3Q", self.seed % 2**64, self.epoch % 2**64, int(row) % 2**64)
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")

    def _pixel_values(self, images: list, rows: list) -> torch.Tensor:
        if self.seed is None or rows is None:
            return torch.stack([self.image_transform(_to_rgb(image, self.image_column)) for image in images])
        # The generators are saved and put back once per batch, not per image: NumPy's get/set_state alone
        # costs ~0.1 ms, as much as a small image's augmentation. Seeding the CPU generator alone, not
        # torch.manual_seed, which seeds every device (~0.25 ms).
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                out = []
                for image, row in zip(images, rows):
                    seed = self._row_seed(row)
                    random.seed(seed)
                    np.random.seed(seed)
                    torch.default_generator.manual_seed(seed)
                    out.append(self.image_transform(_to_rgb(image, self.image_column)))
                return torch.stack(out)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.image_transform is None:
            out[FEATURES_COLUMN] = torch.tensor(np.asarray(batch[FEATURES_COLUMN], dtype=np.float32))
        else:
            out["pixel_values"] = self._pixel_values(batch[self.image_column], batch.get(ROW_COLUMN))
        for label in self.labels:
            out[label.task.name] = _encode_labels(label, batch[label.column])
        return out


def _to_rgb(image: Any, column: str | None) -> PILImage.Image:
    if not isinstance(image, PILImage.Image):
        raise ValueError(
            f"Column {column!r} holds {type(image).__name__}, not decoded images; "
            f"use dataset.cast_column({column!r}, datasets.Image())."
        )
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------- prepare
def prepare_dataset(
    dataset: Dataset,
    config: TimmMultiTaskConfig,
    train: bool,
    image_column: str = "image",
    labelled_tasks: Iterable[str] | None = None,
    transform: Callable | None = None,
    seed: int | None = None,
) -> Dataset:
    """Check a dataset against the model's tasks and attach the timm transform lazily.

    Checks, raising ``ValueError`` that says what to change: the image column exists and holds
    images; every labelled task's column (``TaskSpec.source_column``) exists; its feature type
    fits the task type (classification: ``ClassLabel`` or int, class names in the task's order;
    regression: float/int, or a list of ``num_outputs`` floats; multilabel: a list of
    ``ClassLabel`` indices or a multi-hot list).

    Rows then come out (via ``dataset.with_transform``, computed when read) as
    ``{"pixel_values": (C, H, W) float tensor, <task name>: label}``: class index (``-100`` where
    the column is ``None`` or ``-1``, datasets' "no label"), float / float vector (``NaN`` where
    missing), multi-hot float row
    (all ``NaN`` where missing). Images are converted to RGB.

    Args:
        dataset: One split (``datasets.Dataset``); prepare each split of a ``DatasetDict`` on its own.
        config: The model's config (or the model): tasks and timm data config.
        train: ``True``: timm's training augmentation; ``False``: the deterministic eval transform.
        image_column: Column with the images.
        labelled_tasks: Task names this dataset labels (default: all of the model's tasks). The
            others are left out and :class:`MultiTaskCollator` fills them as missing.
        transform: Replaces :func:`build_transforms` (any ``PIL image -> tensor`` callable).
        seed: Seed the augmentation per row: row ``i`` in epoch ``e`` is transformed under random
            generators seeded from ``(seed, e, i)`` (and the global generators are left as they were),
            so a resumed or data-parallel run augments every row exactly as an uninterrupted run
            does. :class:`~hf_tlmtl.trainer.MultiTaskTrainer` advances the epoch. Adds a row-index
            column (:data:`ROW_COLUMN`) to the raw dataset. ``None``: draw from the global generators.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> row = prepare_dataset(ds["validation"], model.config, train=False)[0]
        >>> sorted(row), tuple(row["pixel_values"].shape)
        (['digit', 'pixel_values'], (3, 32, 32))
    """
    if isinstance(dataset, datasets.IterableDataset):
        return _prepare_stream(dataset, _as_config(config), train, image_column, labelled_tasks, transform, seed)
    dataset = _require_dataset(dataset, "prepare_dataset")
    config = _as_config(config)
    raw = _raw(dataset)
    if len(raw) == 0:
        raise ValueError(
            f"prepare_dataset got an empty {'training' if train else 'evaluation'} split (0 rows, columns "
            f"{raw.column_names}); check the split name, the filter or n_train / n_eval that emptied it."
        )
    _check_image_column(raw, image_column)
    labels = _plan_label_columns(raw, config.task_specs, labelled_tasks)
    image_transform = transform if transform is not None else build_transforms(config, train=train)
    if ROW_COLUMN in raw.column_names:
        raw = raw.remove_columns(ROW_COLUMN)
    if seed is not None:
        raw = raw.add_column(ROW_COLUMN, np.arange(len(raw), dtype=np.int64))
    return raw.with_transform(_BatchTransform(labels, image_column, image_transform, seed=seed))


# Rows per map call on a stream: one collator batch's worth of decoding at a time.
STREAM_MAP_BATCH = 16


def _prepare_stream(
    stream: datasets.IterableDataset,
    config: TimmMultiTaskConfig,
    train: bool,
    image_column: str,
    labelled_tasks: Iterable[str] | None,
    transform: Callable | None,
    seed: int | None,
) -> datasets.IterableDataset:
    """:func:`prepare_dataset` for a ``datasets.IterableDataset``: the same checks on its features, the
    transform applied with ``map`` as rows stream by (raw columns dropped)."""
    if seed is not None:
        raise ValueError(
            "prepare_dataset(seed=...) seeds augmentation by row index, which a stream does not have; pass seed=None "
            "(a stream's augmentation draws from the global generators, seeded by the Trainer)."
        )
    if stream.features is None:
        raise ValueError(
            "The stream's features are unknown (datasets could not read them from the files); write the data with "
            "datasets (Dataset.to_parquet keeps features) or pass features=... to load_dataset."
        )
    schema = Dataset.from_dict({name: [] for name in stream.features}, features=stream.features)
    _check_image_column(schema, image_column)
    labels = _plan_label_columns(schema, config.task_specs, labelled_tasks)
    image_transform = transform if transform is not None else build_transforms(config, train=train)
    return stream.map(
        _BatchTransform(labels, image_column, image_transform), batched=True, batch_size=STREAM_MAP_BATCH,
        remove_columns=list(stream.features),
    )


def check_worker_picklable(dataset: Any, what: str = "the dataset", workers: int = 1) -> None:
    """``ValueError`` unless ``dataset``'s transform can be sent to DataLoader worker processes.

    With ``dataloader_num_workers > 0`` a worker started by ``spawn`` or ``forkserver`` (the default on
    macOS and Windows, and on Linux from Python 3.14) receives the dataset pickled, transform included: a
    lambda or a function defined inside another one fails there, after training has started. Checked
    here on the transform of a prepared ``Dataset`` (``with_transform``) or on the whole ``IterableDataset``
    (a description of files and ``map`` functions).

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"x": [1, 2]}).with_transform(lambda batch: batch)
        >>> try:
        ...     check_worker_picklable(ds, "train_dataset", workers=2)
        ... except ValueError as e:
        ...     print(str(e).split(", which")[0])
        dataloader_num_workers=2 sends train_dataset's transform to worker processes
    """
    import pickle

    if isinstance(dataset, Dataset):
        target = (dataset.format.get("format_kwargs") or {}).get("transform") if dataset.format["type"] == "custom" else None
    elif isinstance(dataset, datasets.IterableDataset):
        target = dataset
    else:
        return
    if target is None:
        return
    try:
        pickle.dumps(target)
    except Exception as e:  # noqa: BLE001 - pickle raises PicklingError, AttributeError, TypeError ...
        raise ValueError(
            f"dataloader_num_workers={workers} sends {what}'s transform to worker processes, which needs it to pickle, "
            f"and it does not ({type(e).__name__}: {e}). Define the transform at module level (not a lambda or a "
            "function inside another function), or set dataloader_num_workers=0."
        ) from None


def _raw(dataset: Dataset) -> Dataset:
    """The dataset without any format or transform (a prepared dataset's raw columns)."""
    return dataset if dataset.format["type"] is None else dataset.with_format(None)


def _check_image_column(dataset: Dataset, image_column: str) -> None:
    if image_column not in dataset.column_names:
        raise ValueError(
            f"Image column {image_column!r} not in the dataset (columns: {dataset.column_names}); "
            "pass image_column=<the column with the images>."
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"Column {image_column!r} has feature {dataset.features[image_column]}, not images; "
            f"cast it with dataset.cast_column({image_column!r}, datasets.Image()) (works for file paths and bytes)."
        )


# --------------------------------------------------------------------------------- collator
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
            tasks = _as_config(tasks).task_specs
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
            labels = torch.tensor([_float_row(v, width, task) for v in values], dtype=torch.float32)
        return labels.reshape(-1) if task.type == "regression" and width == 1 else labels


# ---------------------------------------------------------------------------- feature cache
def backbone_fingerprint(model: Any) -> str:
    """Hash of the backbone's architecture settings and every weight/buffer byte.

    BatchNorm's ``num_batches_tracked`` counter is left out: it does not change the features
    and disappears when timm freezes BatchNorm.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> before = backbone_fingerprint(m)
        >>> with torch.no_grad():
        ...     _ = next(m.backbone.parameters()).add_(1e-3)
        >>> before == backbone_fingerprint(m)
        False
    """
    config = _as_config(model)
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(repr((config.backbone, sorted(config.timm_kwargs.items()), config.truncate_stage)).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_tlmtl_features"


def cache_features(
    model: Any,
    dataset: Dataset,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    labelled_tasks: Iterable[str] | None = None,
    device: str | torch.device | None = None,
) -> Dataset:
    """Run the (frozen) backbone once over ``dataset``; return pooled features + labels, ready to train heads.

    Features come from ``model.forward_features`` in eval mode under ``torch.no_grad`` with the
    deterministic eval transform (:func:`build_transforms` ``train=False``): un-augmented. They are
    stored by ``datasets.Dataset.map`` in an Arrow file whose fingerprint hashes the backbone
    weights (:func:`backbone_fingerprint`), the dataset's own ``_fingerprint``, the transform
    and the columns. Same model + same data -> the file on disk is reused without running the
    backbone; changed weights -> a new file. (With ``datasets.disable_caching()`` the file is
    rebuilt on every call, as for any ``map``.)

    The result is prepared like :func:`prepare_dataset` output, with ``features`` in place of
    ``pixel_values``: feed it through :class:`MultiTaskCollator` to ``model(features=..., ...)``.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel` (its training mode is restored afterwards).
        dataset: A raw split, or one returned by :func:`prepare_dataset` (its image column and
            labelled tasks are reused; its augmentation is not).
        batch_size: Images per backbone forward.
        cache_dir: Folder for the cache file. Default: next to the dataset's own cache files, or
            ``<HF_DATASETS_CACHE>/hf_tlmtl_features`` for an in-memory dataset.
        image_column: Defaults to the prepared dataset's, else ``"image"``.
        labelled_tasks: As in :func:`prepare_dataset`.
        device: Where the backbone runs (default: where the model is); the model is moved back after.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> cached = cache_features(model, ds["train"], cache_dir=tempfile.mkdtemp())
        >>> batch = MultiTaskCollator(model.tasks)([cached[i] for i in range(4)])
        >>> batch["features"].shape
        torch.Size([4, 96])
        >>> model(**batch).logits["digit"].shape
        torch.Size([4, 10])
    """
    dataset = _require_dataset(dataset, "cache_features")
    config = _as_config(model)
    prepared = dataset.format["format_kwargs"].get("transform") if dataset.format["type"] == "custom" else None
    if isinstance(prepared, _BatchTransform):
        image_column = image_column or prepared.image_column
        labelled_tasks = prepared.labelled_tasks if labelled_tasks is None else labelled_tasks
    image_column = image_column or "image"
    raw = _raw(dataset)
    _check_image_column(raw, image_column)
    if FEATURES_COLUMN in raw.column_names:
        raise ValueError(
            f"The dataset already has a {FEATURES_COLUMN!r} column; rename it "
            f"(dataset.rename_column({FEATURES_COLUMN!r}, ...)) before caching features."
        )
    labels = _plan_label_columns(raw, config.task_specs, labelled_tasks)
    label_columns = list(dict.fromkeys(label.column for label in labels))
    transform = build_transforms(config, train=False)

    fingerprint = hashlib.blake2b(
        repr(
            (_FEATURE_CACHE_VERSION, raw._fingerprint, backbone_fingerprint(model), repr(transform), image_column, label_columns)
        ).encode(),
        digest_size=16,
    ).hexdigest()
    cache_file_name = None
    if cache_dir is not None or not raw.cache_files:
        folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        cache_file_name = str(folder / f"features-{fingerprint}.arrow")

    width = int(model.head_in_features)
    features = Features({**{c: raw.features[c] for c in label_columns}, FEATURES_COLUMN: List(Value("float32"), length=width)})
    run_device = torch.device(device) if device is not None else next(model.parameters()).device
    original_device = next(model.parameters()).device
    was_training = model.training

    def extract(batch: dict[str, list]) -> dict[str, Any]:
        pixels = torch.stack([transform(_to_rgb(image, image_column)) for image in batch[image_column]])
        pooled = model.forward_features(pixels.to(run_device)).float().cpu().numpy()
        return {FEATURES_COLUMN: pooled}

    model.eval().to(run_device)
    try:
        with torch.no_grad():
            cached = raw.map(
                extract,
                batched=True,
                batch_size=batch_size,
                remove_columns=[c for c in raw.column_names if c not in label_columns],
                features=features,
                new_fingerprint=fingerprint,
                cache_file_name=cache_file_name,
                desc="Caching backbone features",
            )
    finally:
        model.train(was_training).to(original_device)
    return cached.with_transform(_BatchTransform(labels, image_column=None, image_transform=None))
