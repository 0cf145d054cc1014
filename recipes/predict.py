"""Predict every task of a saved hf_tlmtl model for a folder of images, a table or a dataset.

    python recipes/predict.py --model outputs/demo --data IMAGES_OR_TABLE --output predictions.csv

``--data`` is a folder (every image file under it, recursively), one image file, a
``.csv`` / ``.parquet`` / ``.jsonl`` table with an image-path column (``--image_column``), an
embedded dataset name or a ``datasets`` Hub id (``--split``, default ``validation``). Predictions
come from the ``multitask-image-classification`` pipeline (the model's own preprocessing).

``--output`` ending in ``.csv``: one row per image, columns ``image``, then per task
classification ``<task>`` (top label) and ``<task>_score``; multilabel ``<task>`` (labels with
probability >= ``--threshold``, joined by ``|``) and ``<task>_<label>`` probabilities; regression
``<task>`` (or ``<task>_<output>`` for several outputs). ``.json`` / ``.jsonl``: the same per
image as nested records, classification with the probability of every class (or of the
``--top_k`` most probable). Images go through the pipeline in batches of its default size
(``hf_tlmtl.hub.pipeline.DEFAULT_BATCH_SIZE``) unless ``--batch_size`` says otherwise. An existing output
file is only replaced with ``--overwrite true``. Bad input exits with code 2 and one ``error:`` line.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch
import transformers
from PIL import Image
from transformers import HfArgumentParser

import hf_tlmtl  # noqa: F401  (registers AutoModel and the pipeline)
from hf_tlmtl.checkpoints import check_model_folder
from hf_tlmtl.hub.pipeline import DEFAULT_BATCH_SIZE, PIPELINE_TASK
from hf_tlmtl.data import TABLE_FORMATS, embedded_dataset_names, load_image_dataset, load_table
from hf_tlmtl.tasks import TaskSpec
from hf_tlmtl.training.output_dir import unwritable

OUTPUT_FORMATS = (".csv", ".json", ".jsonl")


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "Folder written by recipes/finetune.py (or a Hub id of an hf_tlmtl model)."})
    data: str = field(metadata={"help": "Image folder, image file, .csv/.parquet/.jsonl table, embedded name or Hub id."})
    output: str = field(default="predictions.csv", metadata={"help": "Where to write: .csv, .json or .jsonl."})
    image_column: str = field(default="image", metadata={"help": "Tables and datasets: the column with images / paths."})
    split: str = field(default="validation", metadata={"help": "Embedded / Hub datasets: the split to predict."})
    batch_size: int | None = field(
        default=None, metadata={"help": f"Images per forward pass (default: the pipeline's, {DEFAULT_BATCH_SIZE})."}
    )
    threshold: float = field(
        default=0.5, metadata={"help": "Multilabel: a label is predicted at probability >= this (strictly between 0 and 1)."}
    )
    top_k: int | None = field(
        default=None, metadata={"help": "Classification, JSON output: scores of the k most probable classes (default: all)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Predict at most this many images."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda when available)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})


class UsageError(ValueError):
    """Bad input: one line on stderr, exit code 2."""


def _raise_usage(message: str) -> None:
    raise UsageError(message)


# ------------------------------------------------------------------------------------- inputs
def image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` that PIL can open by its extension, sorted."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def iter_inputs(args: PredictArguments) -> tuple[list[str], Any]:
    """(names, images): a name per image (path or ``split[row]``) and what the pipeline reads (paths or PIL images)."""
    path = Path(args.data).expanduser()
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise UsageError(f"no image files under {str(path)!r}")
        files = files[: args.limit] if args.limit else files
        return [str(p) for p in files], [str(p) for p in files]
    if path.is_file() and path.suffix.lower() not in TABLE_FORMATS:
        return [str(path)], [str(path)]
    if path.suffix.lower() in TABLE_FORMATS:
        if not path.is_file():
            raise UsageError(f"table {str(path)!r} does not exist")
        table = load_table(path, image_column=args.image_column)
        table = table.select(range(min(args.limit, len(table)))) if args.limit else table
        names = [item["path"] for item in table.cast_column(args.image_column, datasets.Image(decode=False))[args.image_column]]
        return names, _images(table, args.image_column)
    if args.data not in embedded_dataset_names() and (path.is_absolute() or args.data.startswith((".", "~")) or "/" not in args.data):
        raise UsageError(
            f"--data {args.data!r} not found: not an image folder or file, a table, an embedded dataset "
            f"({embedded_dataset_names()}) or a Hub id"
        )
    data = load_image_dataset(args.data, image_column=args.image_column, n_eval=args.limit, n_train=args.limit)
    if args.split not in data:
        raise UsageError(f"--split {args.split!r} not in {args.data}; splits are {list(data)}")
    split = data[args.split]
    return [f"{args.split}[{i}]" for i in range(len(split))], _images(split, args.image_column)


def _images(dataset: datasets.Dataset, column: str) -> Iterator[Image.Image]:
    for row in dataset.select_columns([column]):
        yield row[column]


# ------------------------------------------------------------------------------------ outputs
def record(result: dict[str, Any], tasks: list[TaskSpec], threshold: float, top_k: int | None = None) -> dict[str, Any]:
    """One image's pipeline output (every class scored, most probable first) -> a nested record per task."""
    out: dict[str, Any] = {}
    for task in tasks:
        value = result[task.name]
        if task.type == "regression":
            values = value["value"]
            out[task.name] = values[0] if len(values) == 1 else dict(zip(task.id2label.values(), values))
        elif task.type == "classification":
            scores = {item["label"]: item["score"] for item in value[:top_k]}
            out[task.name] = {"label": value[0]["label"], "score": value[0]["score"], "scores": scores}
        else:
            scores = {item["label"]: item["score"] for item in value}
            scores = {label: scores.get(label, 0.0) for label in task.id2label.values()}
            out[task.name] = {"labels": [label for label, s in scores.items() if s >= threshold], "scores": scores}
    return out


def flat_row(name: str, rec: dict[str, Any], tasks: list[TaskSpec]) -> dict[str, Any]:
    row: dict[str, Any] = {"image": name}
    for task in tasks:
        value = rec[task.name]
        if task.type == "regression":
            if isinstance(value, dict):
                row.update({f"{task.name}_{k}": v for k, v in value.items()})
            else:
                row[task.name] = value
        elif task.type == "classification":
            row[task.name], row[f"{task.name}_score"] = value["label"], value["score"]
        else:
            row[task.name] = "|".join(value["labels"])
            row.update({f"{task.name}_{label}": score for label, score in value["scores"].items()})
    return row


def predict(args: PredictArguments) -> list[dict[str, Any]]:
    """Run the pipeline over ``args.data``; returns one record per image (also written to ``args.output``)."""
    output = Path(args.output)
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError(f"--output {args.output!r} must end in {', '.join(OUTPUT_FORMATS)}")
    if output.is_dir():
        raise UsageError(f"--output {args.output!r} is a folder; pass a file path such as {str(output / 'predictions.csv')!r}")
    if output.exists() and not args.overwrite:
        raise UsageError(f"--output {args.output!r} exists; pass --overwrite true to replace it")
    reason = unwritable(output)
    if reason:
        raise UsageError(f"--output {args.output!r} cannot be written: {reason}; pass another path")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0.0 < args.threshold < 1.0:
        raise UsageError(f"--threshold is a probability strictly between 0 and 1, got {args.threshold:g}; e.g. 0.5")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top_k must be >= 1 (classes kept per classification task), got {args.top_k}")
    model_path = Path(args.model)
    if model_path.exists() and not (model_path / "config.json").is_file():
        raise UsageError(f"--model {args.model!r} has no config.json; pass a folder written by recipes/finetune.py")
    if not model_path.exists() and args.model.count("/") != 1:
        raise UsageError(f"--model {args.model!r} not found")
    check_model_folder(model_path, "--model")
    names, images = iter_inputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Never run code from a model folder (checked above too): transformers would ask on a terminal.
    pipe = transformers.pipeline(PIPELINE_TASK, model=args.model, device=device, trust_remote_code=False)
    tasks = list(pipe.model_tasks)
    widest = max([t.num_outputs for t in tasks if t.type == "classification"] + [1])
    records = []
    # threshold=0: every multilabel label comes back scored; ours is applied in record().
    batching = {"batch_size": args.batch_size} if args.batch_size is not None else {}  # else the pipeline's default
    for name, result in zip(names, pipe(images, top_k=widest, threshold=0.0, **batching)):
        records.append({"image": name, **record(result, tasks, args.threshold, args.top_k)})
    write(records, tasks, output)
    return records


def write(records: list[dict[str, Any]], tasks: list[TaskSpec], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    suffix = output.suffix.lower()
    if suffix == ".csv":
        rows = [flat_row(r["image"], r, tasks) for r in records]
        with output.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["image"])
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        output.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        output.write_text(json.dumps(records, indent=1))


def main(argv: list[str]) -> list[dict[str, Any]]:
    parser = HfArgumentParser(PredictArguments, allow_abbrev=False)
    parser.error = _raise_usage
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        records = predict(args)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"{len(records)} predictions written to {Path(args.output).resolve()}", flush=True)
    return records


if __name__ == "__main__":
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    main(sys.argv[1:])
