"""Training from a stream: ``datasets.load_dataset(..., streaming=True)`` for data that does not fit on disk.

:func:`load_streaming_dataset` opens a Hub id, a folder of Parquet / CSV / JSON-lines files or of images
(``imagefolder``), or one table file as a ``datasets.IterableDataset`` for training, and reads the
validation split (small, it is evaluated every time) into memory. Tasks come from the column features,
as for in-memory data (:func:`hf_tlmtl.data.resolve_tasks`), but nothing can be re-encoded on the fly:
class columns must already be ``ClassLabel`` or class indices (``Dataset.to_parquet`` keeps the features).
:func:`hf_tlmtl.data.prepare_dataset` attaches the timm transform to a stream with ``map``.

Across processes a stream is split by its files: with a file count that the process count divides, each
process reads its own files (accelerate's ``IterableDataset.shard``, the file split that
``datasets.distributed.split_dataset_by_node`` makes); otherwise the main process reads and hands each
process its part of every batch (:func:`read_per_process`). Either way every row is read once per pass
(equal-size files keep the processes' passes in step).

Example:
    >>> import tempfile
    >>> from hf_tlmtl.data.embedded import load_embedded_dataset
    >>> folder = tempfile.mkdtemp()
    >>> ds = load_embedded_dataset("shapes", n_train=8, n_eval=4, image_size=32)
    >>> for i in range(2):
    ...     _ = ds["train"].shard(2, i, contiguous=True).to_parquet(f"{folder}/train-{i:05d}-of-00002.parquet")
    >>> _ = ds["validation"].to_parquet(f"{folder}/validation-00000-of-00001.parquet")
    >>> data, tasks = load_streaming_dataset(folder, tasks="shape,scale")
    >>> type(data["train"]).__name__, data["train"].n_shards, data["validation"].num_rows, [t.name for t in tasks]
    ('IterableDataset', 2, 4, ['shape', 'scale'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import datasets
from datasets import Dataset, DatasetDict, IterableDataset

from ..tasks import TaskSpec
from .sources import TABLE_FORMATS, looks_like_local_path
from .task_columns import resolve_tasks

VALIDATION_SPLITS = ("validation", "valid", "val", "test")


def _open_stream(source: str) -> Any:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in TABLE_FORMATS:
        return datasets.load_dataset(TABLE_FORMATS[path.suffix.lower()], data_files={"train": str(path)}, streaming=True)
    if path.is_dir():
        tables = sorted({TABLE_FORMATS[p.suffix.lower()] for p in path.rglob("*") if p.suffix.lower() in TABLE_FORMATS})
        if len(tables) > 1:
            raise ValueError(f"--streaming: {str(path)!r} mixes table formats ({tables}); keep one format per folder.")
        return datasets.load_dataset(tables[0] if tables else "imagefolder", data_dir=str(path), streaming=True)
    if looks_like_local_path(source):
        raise ValueError(f"--streaming: dataset {source!r} not found; pass a folder, a table file or a Hub id org/name.")
    return datasets.load_dataset(source, streaming=True)


def load_streaming_dataset(
    source: str,
    image_column: str = "image",
    tasks: str | Sequence[str | dict[str, Any]] | None = None,
    n_eval: int | None = None,
) -> tuple[dict[str, Any], list[TaskSpec]]:
    """``{"train": IterableDataset, "validation": Dataset}`` and the tasks, for ``--streaming true``.

    The source needs a validation split: a Hub dataset's, or files named by ``datasets``' split convention
    (``validation-*.parquet``, ``validation/`` sub-folder of an image folder ...); ``n_eval`` keeps its
    first rows. A ``ValueError`` names what is missing: the split, the image column, known features, or
    class columns that would need encoding.
    """
    try:
        data = _open_stream(source)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"--streaming: could not open {source!r} as a stream ({type(e).__name__}: {first}).") from None
    if "train" not in data:
        raise ValueError(f"--streaming: {source!r} has no 'train' split (splits: {list(data)}); name the files train-*.")
    split = next((name for name in VALIDATION_SPLITS if name in data), None)
    if split is None:
        raise ValueError(
            f"--streaming: {source!r} has no validation split (splits: {list(data)}), and a stream cannot be split "
            "by a fraction: add validation files (validation-*.parquet, or a validation/ folder of images) or use the "
            "Hub dataset's own split."
        )
    train = data["train"]
    if train.features is None:
        raise ValueError(
            f"--streaming: the features of {source!r} are unknown before reading it; write it with datasets "
            "(Dataset.to_parquet keeps them) or load it without --streaming."
        )
    if image_column not in train.features or not isinstance(train.features[image_column], datasets.Image):
        raise ValueError(
            f"--streaming: column {image_column!r} is not an image column of {source!r} (features: {dict(train.features)}); "
            "pass --image_column NAME (a column of images as bytes or absolute paths)."
        )
    stream = data[split].take(n_eval) if n_eval else data[split]
    validation = Dataset.from_list(list(stream), features=data[split].features)
    resolved, specs = resolve_tasks(DatasetDict({"train": validation, "validation": validation}), tasks, image_column)
    for spec in specs:
        column = spec.source_column
        if resolved["validation"].features[column] != train.features[column]:
            raise ValueError(
                f"--streaming: column {column!r} holds {train.features[column]}, which task {spec.name!r} needs encoded "
                f"as {resolved['validation'].features[column]}; a stream is not re-encoded: write the column as "
                "ClassLabel (dataset.class_encode_column) or class indices, or load without --streaming."
            )
    return {"train": train, "validation": resolved["validation"]}, specs


def read_per_process(stream: IterableDataset, num_processes: int) -> bool:
    """Whether each of ``num_processes`` processes can read its own files of ``stream`` (file count divisible).

    False: the main process reads the stream and dispatches each process its share of every batch
    (accelerate's ``dispatch_batches``), so that no row is read twice or left out.

    Example:
        >>> from datasets import Dataset
        >>> stream = Dataset.from_dict({"x": list(range(8))}).to_iterable_dataset(num_shards=4)
        >>> read_per_process(stream, 2), read_per_process(stream, 3), read_per_process(stream, 1)
        (True, False, True)
    """
    return num_processes == 1 or stream.n_shards % num_processes == 0


__all__ = ["VALIDATION_SPLITS", "load_streaming_dataset", "read_per_process"]
