"""Where training images come from: embedded sets, image folders, CSV/Parquet tables, Hub datasets.

:func:`load_image_dataset` turns any of them into a ``datasets.DatasetDict`` with ``train`` and
``validation`` splits and a decoded image column; :func:`~hf_tlmtl.data.task_columns.resolve_tasks` then finds the tasks
(stated, or inferred from the column features) and encodes the label columns to match them:

- ``ClassLabel`` -> classification, float -> regression, list of ``ClassLabel`` -> multilabel;
- string columns (CSV/Parquet class names) become ``ClassLabel`` (sorted names, or the task's
  stated labels, in that order); lists of strings become lists of ``ClassLabel``;
- int columns are class indices only when the task is stated (``digit:classification:10``).

Every problem is a ``ValueError`` that names the column, value, row or file and the fix, raised
before anything trains.

Example:
    >>> from hf_tlmtl.data import load_image_dataset, resolve_tasks
    >>> ds = load_image_dataset("shapes", n_train=8, n_eval=4, image_size=32)
    >>> sorted(ds), ds["train"].num_rows
    (['train', 'validation'], 8)
    >>> ds, tasks = resolve_tasks(ds, "shape,scale,marks")
    >>> [(t.name, t.type, t.num_outputs) for t in tasks]
    [('shape', 'classification', 4), ('scale', 'regression', 1), ('marks', 'multilabel', 3)]
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Value
from PIL import Image as PILImage

from . import embedded
from .embedded import load_embedded_dataset
from .labels import STRING_DTYPES
from .preparation import check_image_column

TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "json"}
"""File suffixes read as tables (one row per image), and the ``datasets`` builder for each."""



def embedded_dataset_names() -> list[str]:
    """Names accepted by :func:`hf_tlmtl.data.embedded.load_embedded_dataset`.

    Example:
        >>> embedded_dataset_names()
        ['digits', 'photos', 'shapes', 'shapes_affinity']
    """
    names = getattr(embedded, "EMBEDDED_DATASETS", None) or getattr(embedded, "_BUILDERS", {})
    return sorted(names)


# ------------------------------------------------------------------------------------ loading
def load_image_dataset(
    source: str,
    image_column: str = "image",
    n_train: int | None = None,
    n_eval: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    validation_fraction: float = 0.2,
    verify_images: bool = True,
) -> DatasetDict:
    """Load ``source`` as a DatasetDict with ``train`` / ``validation`` splits and decoded images.

    Args:
        source: An embedded name (``"shapes"``, ``"digits"``); a folder of class sub-folders
            (``datasets``' ``imagefolder``: column ``image``, ClassLabel ``label`` from the folder
            names); a ``.csv`` / ``.tsv`` / ``.parquet`` / ``.jsonl`` table with an image column (file
            paths, relative to the table's folder, or image bytes) and one column per task; or a
            ``datasets`` Hub id (``"org/name"``, online only).
        image_column: Column holding the images or their paths.
        n_train, n_eval: Keep at most this many rows (a seeded random subset).
        image_size: Side of the embedded datasets' images (ignored for other sources).
        seed: Seeds the subsets, the validation split and the embedded data.
        validation_fraction: Held-out fraction when the data has no validation split.
        verify_images: Open every local image file once, so a missing or corrupt file fails
            here (named, with its row) instead of mid-training.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for label in ("cat", "dog"):
        ...     (root / label).mkdir()
        ...     for i in range(5):
        ...         Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / label / f"{i}.png")
        >>> ds = load_image_dataset(str(root), validation_fraction=0.2)
        >>> ds["train"].num_rows, ds["validation"].num_rows, ds["train"].features["label"].names
        (8, 2, ['cat', 'dog'])
    """
    embedded = embedded_dataset_names()
    if source in embedded:
        sizes = {k: v for k, v in {"n_train": n_train, "n_eval": n_eval}.items() if v is not None}
        return load_embedded_dataset(source, image_size=image_size, seed=seed, **sizes)
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    path = Path(source).expanduser()
    if path.suffix.lower() in TABLE_FORMATS and not path.is_dir():
        if not path.is_file():
            raise ValueError(f"Dataset file {str(path)!r} does not exist; pass the path of an existing table.")
        data = DatasetDict({"train": load_table(path, image_column, verify_images)})
    elif path.is_dir():
        data = _load_image_folder(path, image_column, verify_images)
    elif looks_like_local_path(source):
        raise ValueError(
            f"Dataset {source!r} not found: it is not an embedded dataset ({embedded}), an existing folder or a "
            f"table file ({', '.join(sorted(TABLE_FORMATS))}). Check the path."
        )
    else:
        data = _load_hub_dataset(source)
    data = _with_validation_split(data, validation_fraction, seed)
    check_image_column(data["train"], image_column)
    limits = {"train": n_train, "validation": n_eval}
    return DatasetDict(
        {
            split: ds.shuffle(seed=seed).select(range(limits[split])) if limits[split] and limits[split] < len(ds) else ds
            for split, ds in data.items()
        }
    )


def looks_like_local_path(source: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    return (
        Path(source).is_absolute()
        or source.startswith((".", "~"))
        or source.count("/") != 1
        or Path(source).suffix.lower() in TABLE_FORMATS
    )


def _load_hub_dataset(source: str) -> DatasetDict:
    try:
        data = datasets.load_dataset(source)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"Could not load dataset {source!r} from the Hugging Face Hub ({type(e).__name__}: {first}). Check the id, "
            "your network and HF_HUB_OFFLINE, or pass a local folder / .csv / .parquet file."
        ) from None
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    return data


# datasets labels its pass over local data files "Downloading data": nothing is downloaded from a local folder.
_LOCAL_FILES = datasets.DownloadConfig(download_desc="Reading local files")


def _load_image_folder(path: Path, image_column: str, verify_images: bool) -> DatasetDict:
    try:
        data = datasets.load_dataset("imagefolder", data_dir=str(path), download_config=_LOCAL_FILES)
    except Exception as e:  # noqa: BLE001 - an empty folder, unreadable metadata ...
        raise ValueError(
            f"Could not read {str(path)!r} as an image folder ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Lay it out as FOLDER/<class name>/<image file>."
        ) from None
    if verify_images:
        for split in data.values():
            _verify_images(split, "image", where="")
    if image_column != "image":
        data = data.rename_column("image", image_column)
    return data


def load_table(path: str | Path, image_column: str = "image", verify_images: bool = True) -> Dataset:
    """A CSV / TSV / Parquet / JSON-lines table as one ``Dataset`` with a decoded image column.

    Image paths are resolved relative to the table's folder; an image column of bytes (Parquet
    written by ``datasets``) is kept as it is. Rows keep their order, so errors name the row.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(root / "a.png")
        >>> _ = (root / "t.csv").write_text("file,size\\na.png,0.5\\n")
        >>> table = load_table(root / "t.csv", image_column="file")
        >>> table[0]["file"].size, table.features["size"].dtype
        ((8, 8), 'float64')
    """
    path = Path(path)
    builder = TABLE_FORMATS[path.suffix.lower()]
    kwargs = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    if builder == "csv":
        _check_csv(path, kwargs.get("sep", ","))
    try:
        table = datasets.load_dataset(builder, data_files={"train": str(path)}, download_config=_LOCAL_FILES, **kwargs)["train"]
    except Exception as e:  # noqa: BLE001 - parse errors of the file
        raise ValueError(f"Could not read {path.name} as {builder} ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
    if image_column not in table.column_names:
        raise ValueError(
            f"Image column {image_column!r} not in {path.name}; its columns are {table.column_names}. "
            "Pass --image_column NAME."
        )
    feature = table.features[image_column]
    if isinstance(feature, Value) and feature.dtype in STRING_DTYPES:
        base = path.parent.resolve()

        def absolute(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            batch[image_column] = [None if p is None else str(base / p) for p in batch[image_column]]
            return batch

        table = table.map(absolute, batched=True, desc="Resolving image paths")
    elif not isinstance(feature, datasets.Image) and not (isinstance(feature, dict) and {"bytes", "path"} <= set(feature)):
        raise ValueError(
            f"Image column {image_column!r} of {path.name} holds {feature}, not image paths or image bytes; "
            "pass --image_column with the column of file paths."
        )
    if not isinstance(feature, datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    if verify_images:
        _verify_images(table, image_column, where=f" of {path.name}")
    return table.cast_column(image_column, datasets.Image())


def _check_csv(path: Path, separator: str) -> None:
    """What datasets' CSV reader would report as a generation error, or read wrongly: said with the file's name."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path.name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8 "
            "(spreadsheet programs: CSV UTF-8)."
        ) from None
    rows = [row for row in csv.reader(text.splitlines(), delimiter=separator) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path.name} is empty; it needs a header line and one row per image.")
    if len(rows) == 1:
        raise ValueError(f"{path.name} has a header ({separator.join(rows[0])}) but no rows; add one row per image.")
    seen: dict[str, int] = {}
    for position, name in enumerate(rows[0], start=1):
        if name in seen:
            # pandas would rename the second one (color.1) and it would be trained as a task of its own
            raise ValueError(
                f"{path.name}: column {name!r} appears twice in the header (columns {seen[name]} and {position}); "
                "give each column its own name."
            )
        seen[name] = position


def _verify_images(dataset: Dataset, image_column: str, where: str) -> None:
    """Open every image once (headers and data): a missing or corrupt one fails now, named with its row."""
    encoded = dataset.cast_column(image_column, datasets.Image(decode=False))
    for row, item in enumerate(encoded[image_column]):
        if item is None:
            raise ValueError(f"Row {row}{where} has no image (empty {image_column!r}); drop the row or fill it in.")
        path, data = item.get("path"), item.get("bytes")
        name = repr(path) if path else "<image bytes>"
        try:
            with PILImage.open(io.BytesIO(data) if data else path) as image:
                image.load()
        except FileNotFoundError:
            raise ValueError(f"Image file {name} (row {row}{where}) does not exist; fix the path or drop the row.") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
            raise ValueError(
                f"Unreadable image file {name} (row {row}{where}): {type(e).__name__}: {e}; replace or drop it."
            ) from None


def _with_validation_split(data: DatasetDict, fraction: float, seed: int) -> DatasetDict:
    if "train" not in data:
        raise ValueError(f"The dataset has no 'train' split (splits: {list(data)}).")
    for name in ("validation", "valid", "val", "test"):
        if name in data:
            return DatasetDict({"train": data["train"], "validation": data[name]})
    if len(data["train"]) < 2:
        raise ValueError(f"The dataset has {len(data['train'])} row(s); at least 2 are needed for a train/validation split.")
    split = data["train"].train_test_split(test_size=fraction, seed=seed)
    return DatasetDict({"train": split["train"], "validation": split["test"]})


# --------------------------------------------------------------------------------- task specs


# ------------------------------------------------------------------------------ label columns


__all__ = [
    "TABLE_FORMATS",
    "embedded_dataset_names",
    "load_image_dataset",
    "load_table",
]
