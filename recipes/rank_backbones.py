"""Rank candidate backbones on your data before training any: transferability scores of their frozen features.

    python recipes/rank_backbones.py --backbones resnet50.a1_in1k,convnext_tiny,local-dir:DIR --dataset DATA [--tasks a,b]

Each backbone (a timm name with weights, ``hf-hub:org/name``, ``local-dir:/path``, a saved hf_tlmtl folder,
or ``imagenet-efficientnet-lite0``, the offline ImageNet source of the ``[study]`` extra) runs once over the
labelled images, every split (nothing is held out: nothing trains; at most ``--n_train`` of them, a seeded subset); its pooled features are scored against every
task's labels with ``--method`` (LogME by default, see :mod:`hf_tlmtl.transferability`). Nothing trains.
The table (best first: mean over tasks of the scores min-max normalised across backbones) is printed and
written to ``--output_dir`` as ``ranking.json`` and ``ranking.md``; an existing ranking is only replaced
with ``--overwrite true``. Bad input exits with code 2 and one ``error:`` line before any backbone runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import concatenate_datasets

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl.training.cli import UsageError, build_parser, run_or_exit
from hf_tlmtl.data import load_image_dataset, resolve_tasks
from hf_tlmtl.transferability import METHODS, check_labels, rank_backbones, ranking_markdown

IMAGENET_SOURCE = "imagenet-efficientnet-lite0"
"""``--backbones`` name of EfficientNet-Lite0 with ImageNet weights, converted offline (``[study]`` extra)."""


@dataclass
class RankArguments:
    backbones: str = field(metadata={"help": f"Comma-separated backbones: timm names with weights, hf-hub:, local-dir:, saved hf_tlmtl folders, {IMAGENET_SOURCE}."})
    dataset: str = field(metadata={"help": "Embedded name, image folder, .csv/.parquet/.jsonl table or Hub id (its train split is scored)."})
    tasks: str | None = field(default=None, metadata={"help": "Task columns (name[:type[:labels]],...); default: inferred from the columns."})
    method: str = field(default="logme", metadata={"help": f"One of {list(METHODS)}."})
    image_column: str = field(default="image", metadata={"help": "Column with the images."})
    image_size: int | None = field(default=None, metadata={"help": "Input side for every backbone (default: each one's own)."})
    n_train: int | None = field(default=1000, metadata={"help": "Score at most this many images, from every split (seeded subset)."})
    embedded_image_size: int = field(default=64, metadata={"help": "Side of generated embedded images."})
    batch_size: int = field(default=64, metadata={"help": "Images per backbone forward."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset."})
    output_dir: str = field(default="outputs/rank_backbones", metadata={"help": "Where ranking.json / ranking.md go."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing ranking in --output_dir."})


def parse_arguments(argv: list[str]) -> RankArguments:
    (args,) = build_parser(RankArguments).parse_args_into_dataclasses(args=argv)
    if args.method not in METHODS:
        raise UsageError(f"--method {args.method!r} is not one of {list(METHODS)}")
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not names or len(set(names)) != len(names):
        raise UsageError(f"--backbones needs one or more distinct names, got {args.backbones!r}")
    if args.batch_size < 1 or (args.n_train is not None and args.n_train < 1):
        raise UsageError("--batch_size and --n_train must be >= 1")
    if (Path(args.output_dir) / "ranking.json").exists() and not args.overwrite:
        raise UsageError(f"{args.output_dir}/ranking.json exists; pass --overwrite true to replace it")
    return args


def resolve_backbone(name: str) -> str:
    """The offline ImageNet source's ``local-dir:`` path for its alias; every other name as given."""
    if name != IMAGENET_SOURCE:
        return name
    from hf_tlmtl.backbone.imagenet import efficientnet_lite0_imagenet

    return efficientnet_lite0_imagenet()


def main(argv: list[str]) -> list[dict]:
    args = parse_arguments(argv)
    data = load_image_dataset(
        args.dataset, image_column=args.image_column, n_train=args.n_train, image_size=args.embedded_image_size, seed=args.seed
    )
    data, tasks = resolve_tasks(data, args.tasks, args.image_column)
    # Nothing trains here: every labelled row is scored, the validation split (the source's own or the held-out one) too.
    train = concatenate_datasets([data["train"], data["validation"]])
    if args.n_train is not None and train.num_rows > args.n_train:
        train = train.shuffle(seed=args.seed).select(range(args.n_train))
    check_labels(train, tasks)  # every task scorable: fail before the first backbone runs
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    resolved = [resolve_backbone(n) for n in names]
    ranked = rank_backbones(
        resolved, train, tasks, method=args.method, image_size=args.image_size, batch_size=args.batch_size,
        image_column=args.image_column,
    )
    alias = dict(zip(resolved, names))
    for r in ranked:
        r.name = alias[r.name]
    rows = [asdict(r) for r in ranked]
    table = ranking_markdown(ranked, args.method)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"method": args.method, "dataset": args.dataset, "n_images": train.num_rows, "tasks": [t.to_dict() for t in tasks], "ranking": rows}
    (out / "ranking.json").write_text(json.dumps(record, indent=2))
    (out / "ranking.md").write_text(f"# Backbones ranked by {args.method} on {args.dataset} ({train.num_rows} images)\n\n{table}\n")
    print(table)
    print(f"Wrote {out}/ranking.json and ranking.md.")
    return rows


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
