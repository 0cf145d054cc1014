"""Dataset preparation: a ``datasets.Dataset`` checked against the tasks, with a lazy batch transform.

:func:`prepare_dataset` checks the image and label columns against the model's tasks before anything
runs, and attaches (``with_transform``) the function that turns a batch of rows into ``pixel_values``
(timm's transform, optionally seeded per row for exactly resumable augmentation) and targets by task.
Streams (``IterableDataset``) get the same function through ``map``.
"""

from __future__ import annotations

import difflib
import hashlib
import pickle
import random
import struct
from typing import Any, Callable, Iterable

import datasets
import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage

from ..configuration import TimmMultiTaskConfig
from ..image_processing import rgb_image
from .labels import LabelColumn, check_finite_labels, encode_labels, plan_label_columns, require_dataset
from .transforms import as_config, build_transforms

FEATURES_COLUMN = "features"
"""Column (and model keyword) holding pooled backbone features in a feature cache."""
ROW_COLUMN = "__hf_tlmtl_row__"
"""Column :func:`prepare_dataset` adds (with ``seed=``) so the transform knows which row it augments."""





# ----------------------------------------------------------------------------------- transforms


# ------------------------------------------------------------------------------ label columns


# ---------------------------------------------------------------------------- label encoding


class BatchTransform:
    """The ``with_transform`` function: images -> ``pixel_values`` (or cached ``features``), labels by task.

    With ``seed``, each image is transformed under random generators (Python's, NumPy's and torch's)
    seeded from ``(seed, epoch, row)`` and put back afterwards: the same row in the same epoch gets
    the same augmentation whichever process, worker or resumed run reads it, and reading it does not
    move the generators that the training step uses (dropout, the sampler's shuffle). The Trainer
    sets the epoch (:meth:`set_epoch`, by ``MultiTaskTrainer``).
    """

    def __init__(
        self,
        labels: list[LabelColumn],
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
            return torch.stack([self.image_transform(to_rgb(image, self.image_column)) for image in images])
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
                    out.append(self.image_transform(to_rgb(image, self.image_column)))
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
            out[label.task.name] = encode_labels(label, batch[label.column])
        return out


def to_rgb(image: Any, column: str | None) -> PILImage.Image:
    if not isinstance(image, PILImage.Image):
        raise ValueError(
            f"Column {column!r} holds {type(image).__name__}, not decoded images; "
            f"use dataset.cast_column({column!r}, datasets.Image())."
        )
    return rgb_image(image)


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
            does. :class:`~hf_tlmtl.training.MultiTaskTrainer` advances the epoch. Adds a row-index
            column (:data:`ROW_COLUMN`) to the raw dataset. ``None``: draw from the global generators.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> row = prepare_dataset(ds["validation"], model.config, train=False)[0]
        >>> sorted(row), tuple(row["pixel_values"].shape)
        (['digit', 'pixel_values'], (3, 32, 32))
    """
    if isinstance(dataset, datasets.IterableDataset):
        return _prepare_stream(dataset, as_config(config), train, image_column, labelled_tasks, transform, seed)
    dataset = require_dataset(dataset, "prepare_dataset")
    config = as_config(config)
    raw = raw_dataset(dataset)
    if len(raw) == 0:
        raise ValueError(
            f"prepare_dataset got an empty {'training' if train else 'evaluation'} split (0 rows, columns "
            f"{raw.column_names}); check the split name, the filter or n_train / n_eval that emptied it."
        )
    check_image_column(raw, image_column)
    labels = plan_label_columns(raw, config.task_specs, labelled_tasks)
    check_finite_labels(raw, labels)
    image_transform = transform if transform is not None else build_transforms(config, train=train)
    if ROW_COLUMN in raw.column_names:
        raw = raw.remove_columns(ROW_COLUMN)
    if seed is not None:
        raw = raw.add_column(ROW_COLUMN, np.arange(len(raw), dtype=np.int64))
    return raw.with_transform(BatchTransform(labels, image_column, image_transform, seed=seed))


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
    check_image_column(schema, image_column)
    labels = plan_label_columns(schema, config.task_specs, labelled_tasks)
    image_transform = transform if transform is not None else build_transforms(config, train=train)
    return stream.map(
        BatchTransform(labels, image_column, image_transform), batched=True, batch_size=STREAM_MAP_BATCH,
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


def raw_dataset(dataset: Dataset) -> Dataset:
    """The dataset without any format or transform (a prepared dataset's raw columns)."""
    return dataset if dataset.format["type"] is None else dataset.with_format(None)


def check_image_column(dataset: Dataset, image_column: str) -> None:
    """The image column exists (else the columns are listed, with the closest name) and holds ``datasets.Image``.

    Example:
        >>> from datasets import Dataset
        >>> check_image_column(Dataset.from_dict({"picture": ["a.png"]}), "image")
        Traceback (most recent call last):
        ...
        ValueError: Image column 'image' not in the dataset (columns: ['picture']); pass image_column=<the column with the images> (--image_column in the recipes).
    """
    if image_column not in dataset.column_names:
        close = difflib.get_close_matches(image_column, dataset.column_names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"Image column {image_column!r} not in the dataset (columns: {dataset.column_names}); {hint}"
            "pass image_column=<the column with the images> (--image_column in the recipes)."
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"Column {image_column!r} has feature {dataset.features[image_column]}, not images; pass the column of "
            f"images, or cast it with dataset.cast_column({image_column!r}, datasets.Image()) (works for file paths and bytes)."
        )


# --------------------------------------------------------------------------------- collator


# ---------------------------------------------------------------------------- feature cache
