"""The transfer study: the four classic transfer-learning cases, measured instead of asserted.

    python recipes/transfer_study.py [recipes/configs/transfer_study.yaml] [--full] [--key value ...]

1. Source network: a ``--backbone`` trained here on the source task (by default scikit-learn's
   handwritten digits 0-4, offline) and cached under ``<output_dir>/source``: reused while its
   settings are unchanged. ``--source_model`` replaces it with a saved hf_tlmtl model folder or
   any timm source with weights (``resnet18.a1_in1k``, ``hf-hub:org/name``, ``local-dir:/path``).
2. Targets: a *similar* task (digits 5-9: same domain, new classes) and a *different* task
   (embedded ``shapes``: coloured geometric shapes), each at ``--small_size`` and ``--large_size``
   training images: the four cases of :func:`hf_tlmtl.transfer.recommend_strategy`.
3. Contenders, on every case with the same backbone, the same number of optimiser steps
   (``--small_steps`` / ``--large_steps``), batch size and learning rate, over ``--seeds``:
   ``scratch`` (random init, all trains), ``feature_extraction`` (frozen backbone, cached
   features), ``partial`` (top layer groups), ``truncate`` (top stage dropped, the rest
   fine-tuned with LLRD), ``fine_tune_llrd`` (all trains, layer-wise LR decay) and ``lora``.
   Each seed draws its own training subset (stratified for classification), head
   initialisation and batch order; the validation split is the same for every run.
4. Output in ``--results_dir``: ``results.md`` (tables: case x contender, mean ± std of the main
   metric, trainable parameters, wall time; and what ``recommend_strategy`` says next to the
   measured winner), ``results.png`` (one panel per case) and ``results.json`` (every run).

``recommend_strategy``'s "small" threshold (5,000 images by default) is far above the study's
sizes: the study passes ``small_dataset_max_samples`` = the midpoint of the two sizes (or
``--small_dataset_max_samples``) and says so in the outputs.

``--full`` switches to a longer, more convincing setting (:data:`FULL_SETTING`: more seeds,
steps and images); later ``--key value`` pairs still override it. Every
``MultiTaskTrainingArguments`` field is accepted (learning rate, batch size, ``lora_r`` ...),
except the per-contender ones the study sets itself (see :data:`PER_CONTENDER_ARGUMENTS`).
Bad input stops with exit code 2 and a one-line reason before anything is trained.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from transformers import set_seed

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.cli import YAML_SUFFIXES, UsageError, build_parser, parse_experiment_argv, run_or_exit
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.metrics import LOWER_IS_BETTER, MAIN_METRIC
from hf_tlmtl.sources import infer_tasks, load_image_dataset
from hf_tlmtl.trainer import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transfer import (
    LARGE_DIFFERENT_LAYER_DECAY,
    LARGE_SIMILAR_TRAINABLE_GROUPS,
    SMALL_DIFFERENT_LAYER_DECAY,
    recommend_strategy,
)

CONTENDERS: dict[str, str] = {
    "scratch": "random initialisation, everything trains",
    "feature_extraction": "source backbone frozen (features cached once), heads train",
    "partial": "source backbone, top layer groups + heads train",
    "truncate": "source backbone without its top stage, the rest fine-tuned with LLRD",
    "fine_tune_llrd": "source backbone, everything trains with layer-wise LR decay",
    "lora": "source backbone frozen with LoRA adapters, adapters + heads train",
}
"""The contenders, in table and plot order."""

RECOMMENDED_CONTENDER: dict[str, str] = {
    "feature_extraction": "feature_extraction",
    "truncate": "truncate",
    "partial": "partial",
    "fine_tune": "fine_tune_llrd",
    "lora": "lora",
}
"""The contender that carries out each strategy ``recommend_strategy`` can return."""

PER_CONTENDER_ARGUMENTS = ("transfer_strategy", "trainable_groups", "truncate_stage", "layer_decay", "cache_features", "max_steps")
"""Training arguments the study sets per contender / case; not accepted on the command line."""

FULL_SETTING: dict[str, Any] = {
    "seeds": "0,1,2,3,4",
    "small_size": 100,
    "large_size": 700,
    "small_steps": 80,
    "large_steps": 400,
    "n_eval": 500,
    "image_size": 48,
    "source_epochs": 20,
    "output_dir": "outputs/transfer_study_full",
    "results_dir": "outputs/transfer_study_full",
}
"""What ``--full`` changes: 5 seeds, a bigger gap between small and large, longer training, larger images."""


@dataclass
class StudyArguments:
    backbone: str = field(default="test_resnet", metadata={"help": "timm architecture of the source network trained here (random init)."})
    source_model: str = field(
        default="",
        metadata={
            "help": "Empty: train the source here. Else a saved hf_tlmtl model folder, or a timm source with weights "
            "(a timm name, hf-hub:org/name, local-dir:/path); --backbone is then ignored."
        },
    )
    image_size: int = field(default=32, metadata={"help": "Input side in pixels (also the side of generated embedded images)."})
    image_column: str = field(default="image", metadata={"help": "Image column of the datasets."})
    source_dataset: str = field(default="digits", metadata={"help": "Source data: embedded name, image folder, table or Hub id."})
    source_task: str = field(default="digit", metadata={"help": "Label column of the source task."})
    source_classes: str = field(default="0,1,2,3,4", metadata={"help": "Class names kept for the source task (empty: all)."})
    source_epochs: int = field(default=10, metadata={"help": "Epochs of source training."})
    similar_dataset: str = field(default="digits", metadata={"help": "Data of the similar target."})
    similar_task: str = field(default="digit", metadata={"help": "Label column of the similar target."})
    similar_classes: str = field(default="5,6,7,8,9", metadata={"help": "Class names kept for the similar target (empty: all)."})
    different_dataset: str = field(default="shapes", metadata={"help": "Data of the different target."})
    different_task: str = field(default="shape", metadata={"help": "Label column of the different target."})
    different_classes: str = field(default="", metadata={"help": "Class names kept for the different target (empty: all)."})
    small_size: int = field(default=100, metadata={"help": "Training images of the small cases (1 and 2)."})
    large_size: int = field(default=600, metadata={"help": "Training images of the large cases (3 and 4)."})
    n_eval: int = field(default=400, metadata={"help": "At most this many validation images per target (seeded subset)."})
    small_steps: int = field(default=40, metadata={"help": "Optimiser steps of every run on a small case."})
    large_steps: int = field(default=120, metadata={"help": "Optimiser steps of every run on a large case."})
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
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (None: torch's default)."})
    results_dir: str | None = field(default=None, metadata={"help": "Where results.md/png/json go (None: --output_dir)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})


@dataclass
class FullFlag:
    full: bool = field(default=False, metadata={"help": "The longer setting of FULL_SETTING (later --key value still win)."})


@dataclass
class Target:
    """One target task: its role (``similar`` / ``different``), task spec and prepared splits."""

    role: str
    dataset: str
    task: TaskSpec
    train: Dataset
    validation: Dataset


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
    training_argv: list[str], output_dir: Path, seed: int, max_steps: int, contender: str, study: StudyArguments
) -> MultiTaskTrainingArguments:
    """The shared training argv plus this run's contender settings, step budget, seed and output folder."""
    per_run = {**contender_arguments(contender, study), "max_steps": max_steps, "seed": seed}
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
    if min(study.small_steps, study.large_steps, study.n_eval, study.source_epochs) < 1:
        raise UsageError("--small_steps, --large_steps, --n_eval and --source_epochs must be >= 1")
    threshold = study.small_dataset_max_samples or (study.small_size + study.large_size + 1) // 2
    if not study.small_size < threshold <= study.large_size:
        raise UsageError(
            f"--small_dataset_max_samples={threshold} must lie in ({study.small_size}, {study.large_size}] so that "
            "the small size counts as small and the large one as large"
        )
    results_dir = Path(study.results_dir) if study.results_dir else output_dir
    if (results_dir / "results.json").exists() and not study.overwrite_output_dir:
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
    """The similar and the different target, validation capped at ``n_eval`` rows, saved under ``output_dir/data``."""
    targets = []
    for role in ("similar", "different"):
        source, column, classes = (getattr(study, f"{role}_{key}") for key in ("dataset", "task", "classes"))
        task, data = load_task_data(study, source, column, classes, "target", cache)
        validation = data["validation"]
        if validation.num_rows > study.n_eval:
            validation = validation.shuffle(seed=study.data_seed).select(range(study.n_eval))
        targets.append(
            Target(
                role=role,
                dataset=f"{source}:{column}" + (f"[{classes}]" if _names(classes) else ""),
                task=task,
                train=on_disk(data["train"], output_dir / "data" / role / "train"),
                validation=on_disk(validation, output_dir / "data" / role / "validation"),
            )
        )
    return targets


# ---------------------------------------------------------------------------------- source
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


def transfer_model(study: StudyArguments, source_path: str | None, task: TaskSpec) -> TimmMultiTaskModel:
    """The source network with a fresh head for ``task``: re-headed saved model, or timm weights."""
    if source_path is not None:
        return TimmMultiTaskModel.from_pretrained(source_path, tasks=[task])
    return TimmMultiTaskModel.from_backbone(study.source_model, [task], pretrained=True, image_size=study.image_size)


def is_hf_tlmtl_folder(path: str) -> bool:
    """Whether ``path`` is a folder saved by ``TimmMultiTaskModel.save_pretrained``."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "timm_multitask"


# -------------------------------------------------------------------------------------- runs
def run_once(
    study: StudyArguments,
    contender: str,
    target: Target,
    train: Dataset,
    steps: int,
    seed: int,
    source_path: str | None,
    architecture: tuple[str, dict[str, Any]],
    training_argv: list[str],
    output_dir: Path,
) -> dict[str, Any]:
    """Train one contender on one training subset; evaluate on the target's validation split.

    ``wall_seconds`` covers building the model, applying the strategy (feature caching
    included) and training; evaluation is left out.
    """
    args = training_arguments(training_argv, output_dir, seed, steps, contender, study)
    start = time.perf_counter()
    set_seed(seed)
    if contender == "scratch":
        name, timm_kwargs = architecture
        model = TimmMultiTaskModel.from_backbone(name, [target.task], pretrained=False, image_size=study.image_size, **timm_kwargs)
    else:
        model = transfer_model(study, source_path, target.task)
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=prepare_dataset(train, model.config, train=False, image_column=study.image_column),
        data_collator=MultiTaskCollator(model.tasks),
    )
    trainer.train()
    wall_seconds = time.perf_counter() - start
    # The images go through the (frozen, for feature_extraction) backbone: the same features the cache holds.
    evaluation = prepare_dataset(target.validation, model.config, train=False, image_column=study.image_column)
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_case(case: dict[str, Any], lower_is_better: bool) -> None:
    """Adds per-contender mean/std, the measured winner and how the recommendation compares (in place).

    ``agreement``: ``agrees`` (the recommended contender won), ``within noise`` (its mean is within
    the larger of the two standard deviations of the winner's) or ``disagrees``.
    """
    for result in case["contenders"].values():
        result["mean"], result["std"] = _mean_std([r["metric"] for r in result["runs"]])
        result["wall_seconds_mean"] = statistics.fmean(r["wall_seconds"] for r in result["runs"])
        result["trainable_params"] = result["runs"][0]["trainable_params"]
        result["total_params"] = result["runs"][0]["total_params"]
    sign = -1.0 if lower_is_better else 1.0
    winner = max(case["contenders"], key=lambda c: sign * case["contenders"][c]["mean"])
    case["winner"] = winner
    recommended = case["recommendation"]["contender"]
    if recommended not in case["contenders"]:
        case["agreement"] = "not measured"
        return
    best, rec = case["contenders"][winner], case["contenders"][recommended]
    case["recommended_gap"] = sign * (best["mean"] - rec["mean"])
    if recommended == winner:
        case["agreement"] = "agrees"
    elif case["recommended_gap"] <= max(best["std"], rec["std"]) and len(rec["runs"]) > 1:
        case["agreement"] = "within noise"
    else:
        case["agreement"] = "disagrees"


# ---------------------------------------------------------------------------------- output
def _params(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if n >= 1_000 else str(n)


def markdown_report(results: dict[str, Any]) -> str:
    """The Markdown tables: metric matrix, every case x contender, and recommendation vs measurement."""
    cases, contenders = results["cases"], results["contenders"]
    metric = results["metric"]
    arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
    study = results["study"]
    source = results["source"]
    source_metric = source.get("metrics", {}).get(f"source_{MAIN_METRIC.get(source.get('task_type') or '', '')}")
    lines = [
        "# Transfer study: the four cases, measured",
        "",
        f"Source network: `{source['description']}`"
        + (f", validation {metric} {source_metric:.3f}" if isinstance(source_metric, float) else "")
        + ". Targets: "
        + "; ".join(f"**{t['role']}** = `{t['dataset']}` ({t['n_eval']} validation images)" for t in results["targets"])
        + ".",
        f"Same budget for every contender of a case: {study['small_steps']} optimiser steps on the small cases "
        f"({study['small_size']} images), {study['large_steps']} on the large ones ({study['large_size']} images); "
        f"batch {results['training']['per_device_train_batch_size']}, learning rate {results['training']['learning_rate']}, "
        f"{results['training']['optim']}; {len(results['seeds'])} seed(s) ({', '.join(map(str, results['seeds']))}: "
        "training subset, head init, batch order). Deterministic eval transform for training (no augmentation).",
        f"`recommend_strategy(n, similarity, small_dataset_max_samples={results['small_dataset_max_samples']})`: the threshold is "
        f"the midpoint of the two sizes{'' if study['small_dataset_max_samples'] is None else ' (set by --small_dataset_max_samples)'}, "
        "not the default 5,000, which would call both sizes small.",
        f"Wall time: build + transfer strategy (feature caching included) + training, evaluation excluded, on "
        f"{results['environment']['cpu_count']} CPU cores shared with other jobs (torch threads: "
        f"{results['environment']['torch_threads']}): compare within a table, not across machines. "
        f"Whole run: {results['total_wall_seconds'] / 60:.1f} min.",
        "",
        f"## {metric} {arrow} (mean ± std over seeds; **bold**: best of the case, † recommend_strategy's choice)",
        "",
    ]
    header = ["contender"] + [f"case {c['case']}: {c['size']} ({c['n_train']}), {c['similarity']}" for c in cases]
    rows = [header, ["---"] + ["---:"] * len(cases)]
    for contender in contenders:
        row = [contender]
        for case in cases:
            r = case["contenders"][contender]
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
            if contender == case["winner"]:
                cell = f"**{cell}**"
            if contender == case["recommendation"]["contender"]:
                cell += " †"
            row.append(cell)
        rows.append(row)
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Every case x contender", ""]
    header = ["case", "contender", f"{metric} {arrow}", "trainable params", "of total", "wall s (mean)"]
    rows = [header, ["---", "---", "---:", "---:", "---:", "---:"]]
    for case in cases:
        for contender in contenders:
            r = case["contenders"][contender]
            rows.append(
                [
                    f"{case['case']}: {case['size']}, {case['similarity']}",
                    contender + (" (best)" if contender == case["winner"] else ""),
                    f"{r['mean']:.3f} ± {r['std']:.3f}",
                    f"{r['trainable_params']:,}",
                    f"{100 * r['trainable_params'] / max(r['total_params'], 1):.1f}%",
                    f"{r['wall_seconds_mean']:.1f}",
                ]
            )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## recommend_strategy vs the measured winner", ""]
    header = ["case", "n train", "similarity", "recommend_strategy", "measured best", f"gap ({metric})", "verdict"]
    rows = [header, ["---", "---:", "---", "---", "---", "---:", "---"]]
    for case in cases:
        rec = case["recommendation"]
        rows.append(
            [
                str(case["case"]),
                str(case["n_train"]),
                case["similarity"],
                f"{rec['strategy']} → `{rec['contender']}`",
                f"`{case['winner']}` ({case['contenders'][case['winner']]['mean']:.3f})",
                f"{case.get('recommended_gap', float('nan')):.3f}",
                case["agreement"],
            ]
        )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "Verdict: *agrees* = the recommended contender measured best; *within noise* = its mean is within the larger "
        "standard deviation of the two; *disagrees* otherwise. Contenders: "
        + "; ".join(f"`{c}`: {CONTENDERS[c]}" for c in contenders)
        + ".",
        "",
    ]
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
    """One panel per case (rows: similar / different, columns: small / large): mean ± std per contender,
    each seed as a dot, the measured best outlined in black, recommend_strategy's choice hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cases = {(c["similarity"], c["size"]): c for c in results["cases"]}
    contenders = results["contenders"]
    metric = results["metric"]
    bounded = metric not in LOWER_IS_BETTER and metric != "r2"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharey=bounded, squeeze=False)
    for row, similarity in enumerate(("similar", "different")):
        for col, size in enumerate(("small", "large")):
            ax = axes[row][col]
            case = cases[(similarity, size)]
            x = np.arange(len(contenders))
            for i, contender in enumerate(contenders):
                r = case["contenders"][contender]
                winner = contender == case["winner"]
                recommended = contender == case["recommendation"]["contender"]
                ax.bar(
                    i, r["mean"], yerr=r["std"], capsize=4, color=_COLORS.get(contender, "#999999"), alpha=0.9,
                    edgecolor="black" if winner else "white", linewidth=2.5 if winner else 0.5,
                    hatch="//" if recommended else None,
                )
                seeds = [run["metric"] for run in r["runs"]]
                ax.scatter(np.full(len(seeds), i) + np.linspace(-0.15, 0.15, len(seeds)), seeds, s=10, color="black", zorder=3)
                ax.annotate(f"{r['mean']:.2f}", (i, r["mean"] + r["std"]), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=9, fontweight="bold" if winner else "normal")
            ax.set_xticks(x)
            ax.set_xticklabels(
                [f"{c}\n{_params(case['contenders'][c]['trainable_params'])} trained" for c in contenders], fontsize=8, rotation=20
            )
            rec = case["recommendation"]
            ax.set_title(
                f"Case {case['case']}: {size} (n={case['n_train']}) & {similarity}\n"
                f"recommended: {rec['contender']}  |  measured best: {case['winner']}",
                fontsize=10,
            )
            if case.get("chance") is not None and metric == "accuracy":
                ax.axhline(case["chance"], color="black", linestyle="--", linewidth=1, alpha=0.6)
            if bounded:
                ax.set_ylim(0, 1.08)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{similarity} target: {metric} {'↓' if metric in LOWER_IS_BETTER else '↑'}")
    handles = [
        Patch(facecolor="white", edgecolor="black", linewidth=2.5, label="measured best (mean)"),
        Patch(facecolor="white", edgecolor="grey", hatch="//", label="recommend_strategy's choice"),
        Line2D([0], [0], color="black", linestyle="--", linewidth=1, alpha=0.6, label="chance (1 / classes)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(
        f"Transfer study: {results['source']['description']} → similar / different targets; "
        f"mean ± std over {len(results['seeds'])} seed{'s' if len(results['seeds']) > 1 else ''}, dots = seeds",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> dict[str, Any]:
    """Run the study; returns the results written to ``results.json``."""
    study, training_argv, output_dir, full = parse_arguments(argv)
    contenders, seeds, threshold, results_dir = check_arguments(study, output_dir)
    if study.num_threads:
        torch.set_num_threads(study.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    cache: dict[str, DatasetDict] = {}
    targets = load_targets(study, output_dir, cache)
    for target in targets:
        if target.train.num_rows < study.large_size:
            raise UsageError(f"the {target.role} target has {target.train.num_rows} training rows, fewer than --large_size {study.large_size}")
    if MAIN_METRIC[targets[0].task.type] != MAIN_METRIC[targets[1].task.type]:
        raise UsageError("the similar and the different target need task types with the same main metric")
    metric = MAIN_METRIC[targets[0].task.type]

    if study.source_model and is_hf_tlmtl_folder(study.source_model):
        source_path = study.source_model
        source = {"description": f"saved model {study.source_model}", "path": source_path}
    elif study.source_model:
        source_path, source = None, {"description": f"{study.source_model} (timm weights)"}
    else:
        source = train_source(study, training_argv, output_dir, cache)
        source_path = source["path"]
        classes = f" [{study.source_classes}]" if _names(study.source_classes) else ""
        source["description"] = f"{study.backbone} trained on {study.source_dataset}:{study.source_task}{classes}"
    reference = transfer_model(study, source_path, targets[0].task).config  # scratch uses the same architecture
    architecture = (reference.backbone, dict(reference.timm_kwargs))

    cases = []
    for size_name, n_train, steps in (("small", study.small_size, study.small_steps), ("large", study.large_size, study.large_steps)):
        for target in targets:
            rec = recommend_strategy(n_train, target.role, small_dataset_max_samples=threshold)
            case = {
                "case": rec.case,
                "size": size_name,
                "similarity": target.role,
                "target": target.dataset,
                "n_train": n_train,
                "n_eval": target.validation.num_rows,
                "steps": steps,
                "chance": 1.0 / target.task.num_outputs if target.task.type == "classification" else None,
                "recommendation": {
                    "strategy": rec.strategy,
                    "contender": RECOMMENDED_CONTENDER[rec.strategy],
                    "trainable_groups": rec.trainable_groups,
                    "truncate_stage": rec.truncate_stage,
                    "layer_decay": rec.layer_decay,
                    "reason": rec.reason,
                },
                "contenders": {c: {"runs": []} for c in contenders},
            }
            for seed in seeds:
                train = training_subset(target.train, target.task, n_train, seed)
                for contender in contenders:
                    print(f"== case {rec.case} ({size_name}, {target.role}) seed {seed}: {contender}", flush=True)
                    run = run_once(
                        study, contender, target, train, steps, seed, source_path, architecture, training_argv,
                        output_dir / "runs" / f"case{rec.case}" / contender / f"seed{seed}",
                    )
                    if not math.isfinite(run["metric"]):
                        raise RuntimeError(f"case {rec.case} {contender} seed {seed}: non-finite {metric} {run['metric']}")
                    case["contenders"][contender]["runs"].append(run)
            summarize_case(case, metric in LOWER_IS_BETTER)
            cases.append(case)
    cases.sort(key=lambda c: c["case"])

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
        "source": source,
        "targets": [{"role": t.role, "dataset": t.dataset, "n_train_available": t.train.num_rows, "n_eval": t.validation.num_rows} for t in targets],
        "cases": cases,
        "environment": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    results["total_wall_seconds"] = time.perf_counter() - started
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = markdown_report(results)
    (results_dir / "results.md").write_text(report)
    plot_results(results, results_dir / "results.png")
    print(report)
    print(f"Wrote {results_dir}/results.md, results.png, results.json in {results['total_wall_seconds'] / 60:.1f} min.")
    return results


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
