"""The transfer study's vocabulary and command line: its contenders, targets and sources' declared similarity,
the ``--full`` setting, :class:`StudyArguments`, and how the study's arguments are parsed (YAML, then ``--full``,
then ``--key value``; every ``MultiTaskTrainingArguments`` field but the per-contender ones) and checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_tlmtl.training import MultiTaskTrainingArguments
from hf_tlmtl.training.cli import YAML_SUFFIXES, UsageError, build_parser, parse_experiment_argv
from hf_tlmtl.transfer import LARGE_DIFFERENT_LAYER_DECAY, LARGE_SIMILAR_TRAINABLE_GROUPS, SMALL_DIFFERENT_LAYER_DECAY

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


def split_names(text: str) -> list[str]:
    """The non-empty names of a comma-separated list."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_arguments(study: StudyArguments, output_dir: Path) -> tuple[list[str], list[int], int, Path]:
    """Contenders, seeds, the small/large threshold and the results folder; ``UsageError`` on bad input.
    (Whether ``--workers`` processes can import the study is ``run.py``'s check, beside its worker pool.)"""
    contenders = split_names(study.contenders)
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        raise UsageError(f"--contenders: unknown {unknown}; valid: {list(CONTENDERS)}")
    contenders = [c for c in CONTENDERS if c in contenders]
    unknown_targets = sorted(set(split_names(study.targets)) - set(TARGETS))
    if unknown_targets or not split_names(study.targets):
        raise UsageError(f"--targets: unknown {unknown_targets}; valid: {list(TARGETS)}")
    sources = split_names(study.sources)
    if not sources or len(set(sources)) != len(sources):
        raise UsageError(f"--sources needs one or more distinct sources, got {study.sources!r}")
    if "lora" in contenders:
        try:
            from hf_tlmtl.adapters import apply_lora  # noqa: F401
        except ImportError as e:
            raise UsageError(f"contender 'lora' needs hf_tlmtl.adapters.apply_lora, not available here ({e}); drop it from --contenders")
    try:
        seeds = [int(s) for s in split_names(study.seeds)]
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
    results_dir = Path(study.results_dir) if study.results_dir else output_dir
    if study.report_only:
        if not (results_dir / "results.json").is_file():
            raise UsageError(f"--report_only true needs {results_dir}/results.json from an earlier run")
    elif (results_dir / "results.json").exists() and not study.overwrite_output_dir:
        raise UsageError(f"{results_dir}/results.json exists; pass --overwrite_output_dir true to replace it")
    return contenders, seeds, threshold, results_dir
