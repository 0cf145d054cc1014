"""Fine-tune a timm backbone on one or several image tasks with the transformers Trainer.

    accelerate launch recipes/finetune.py [CONFIG.yaml] [--key value ...]
    python recipes/finetune.py [CONFIG.yaml] [--key value ...]          # one process

Every ``MultiTaskTrainingArguments`` field is an argument, plus the model, data and run
arguments below (``--help`` lists them all). A YAML file gives values; ``--key value`` on the
command line wins over it. Bad input (unknown keys, missing data, columns, unreadable images,
labels outside a task's classes, an existing output folder ...) stops with exit code 2 and a
one-line ``error:`` on stderr before anything is trained or written.

Writes into ``output_dir``: the model (``config.json`` + ``model.safetensors``, loadable with
``transformers.AutoModel`` after ``import hf_tlmtl``), ``preprocessor_config.json``,
``training_summary.json`` (arguments, data, transfer plan, per-task metrics, baselines),
``training_curves.png``, ``trainer_state.json``, the model card ``README.md`` and
``checkpoint-*`` folders for ``--resume_from_checkpoint true``. ``--overwrite_output_dir true`` sets a
previous run aside (``output_dir/.previous-run``) until this run's first checkpoint or final model,
and puts it back if this run fails first (``hf_tlmtl.training.run_folder``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, set_seed  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

import hf_tlmtl  # noqa: E402,F401  (registers the Auto classes)
from hf_tlmtl import TaskSpec, TimmMultiTaskModel  # noqa: E402
from hf_tlmtl.checkpoints import check_model_folder, checkpoint_mismatch  # noqa: E402
from hf_tlmtl.training.cli import (  # noqa: E402
    YAML_SUFFIXES,
    UsageError,
    known_arguments,
    reject_unknown,
    run_or_exit,
    yaml_to_argv,
)
from hf_tlmtl.training.cli import build_parser as build_dataclass_parser  # noqa: E402
from hf_tlmtl.multitask.curves import plot_training_curves  # noqa: E402
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset  # noqa: E402
from hf_tlmtl.training.distributed import describe_sharding, full_state_dict  # noqa: E402
from hf_tlmtl.training.run_folder import SET_ASIDE_DIR, DropSetAsideOnSave, drop_set_aside, restore, set_aside  # noqa: E402
from hf_tlmtl.data import load_image_dataset, resolve_tasks  # noqa: E402
from hf_tlmtl.data.streaming import load_streaming_dataset, read_per_process  # noqa: E402
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments  # noqa: E402
from hf_tlmtl.transfer import (  # noqa: E402
    SMALL_DATASET_MAX_SAMPLES,
    is_peft_model,
    native_input_side,
    recommend_strategy,
    summarize_trainable,
)

SUMMARY_FILE = "training_summary.json"
CURVES_FILE = "training_curves.png"
CARD_FILE = "README.md"
# Files a run of this recipe writes at the top of output_dir (set aside, then replaced, by --overwrite_output_dir).
RUN_FILES = (
    SUMMARY_FILE, CURVES_FILE, CARD_FILE, "config.json", "model.safetensors", "preprocessor_config.json",
    "trainer_state.json", "training_args.bin", "train_results.json", "eval_results.json", "all_results.json",
)
RUN_DIRS = ("adapter",)


@dataclass
class ModelArguments:
    """What to train: the backbone, where its weights come from, the heads."""

    backbone: str = field(
        default="resnet18", metadata={"help": "timm model name, hf-hub:org/name or local-dir:/path of a timm checkpoint."}
    )
    pretrained: bool = field(default=False, metadata={"help": "Load the backbone's pretrained weights (timm's loaders)."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "A saved hf_tlmtl model (folder or Hub id) to transfer from: backbone kept, heads re-made "
                  "for this data's tasks (heads of same-named, same-size tasks kept). Replaces --backbone."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Input side in pixels (default: the backbone's own)."})
    channels_last: bool = field(
        default=False,
        metadata={"help": "Keep the model's 4-D weights (and so its convolution outputs) in channels_last memory format: "
                  "faster convolutions on GPUs with bf16/fp16 (tensor cores); no gain on CPU."},
    )
    head_hidden_size: int | None = field(default=None, metadata={"help": "2-layer MLP heads with this hidden width."})
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout before each head."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "timm stochastic depth rate."})
    task_similarity: str | None = field(
        default=None,
        metadata={"help": "How close this data is to the source model's: measured (scored on the training data with "
                  "LogME, see hf_tlmtl.transferability) | similar | different | a number in [0, 1]. "
                  "Prints hf_tlmtl.transfer.recommend_strategy's advice in the transfer plan."},
    )
    small_dataset_max_samples: int = field(
        default=SMALL_DATASET_MAX_SAMPLES,
        metadata={"help": "recommend_strategy: a training set with fewer rows than this is 'small' (cases 1 and 2)."},
    )
    mean: str | None = field(default=None, metadata={"help": "Normalisation mean per channel, e.g. 0.485,0.456,0.406 (default: the checkpoint's)."})
    std: str | None = field(default=None, metadata={"help": "Normalisation std per channel, e.g. 0.229,0.224,0.225 (default: the checkpoint's)."})
    crop_pct: float | None = field(
        default=None,
        metadata={"help": "Centre-crop fraction of the eval transform, in (0, 1]. Default: the checkpoint's (0.875 for most "
                  "ImageNet models), but 1.0 (the whole image) when --image_size is below the backbone's native size."},
    )


@dataclass
class DataArguments:
    """Where the images and labels come from."""

    dataset: str = field(
        default="shapes",
        metadata={"help": "Embedded name (shapes, digits), image folder (class sub-folders), .csv/.parquet/.jsonl "
                  "table with an image-path column, or a datasets Hub id."},
    )
    image_column: str = field(default="image", metadata={"help": "Column with the images (or image paths)."})
    tasks: str | None = field(
        default=None,
        metadata={"help": "Task columns: 'a,b' (types inferred), 'a:classification,b:regression', classes as "
                  "'a:classification:x|y|z' or a count 'a:classification:10', or a JSON list of TaskSpec dicts "
                  "(YAML: a list). Default: inferred from the column features."},
    )
    n_train: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    n_eval: int | None = field(default=None, metadata={"help": "Use at most this many validation rows."})
    embedded_image_size: int = field(default=64, metadata={"help": "Image side of the embedded datasets."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Held-out fraction when the data has no validation split."})
    augment: bool = field(
        default=True,
        metadata={"help": "timm's training augmentation (random resized crop, flip, colour jitter), seeded per image "
                  "from --seed, the epoch and the row (resumes stay exact). Turn it off when labels are geometric "
                  "(size, position, rotation)."},
    )
    verify_images: bool = field(default=True, metadata={"help": "Open every local image once before training."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream --dataset (Hub id, folder of Parquet/CSV/JSON-lines files or images, one table) with "
                  "datasets' streaming=True instead of loading it: needs --max_steps and a validation split (read "
                  "into memory; --n_eval keeps its first rows). Processes split the stream by its files "
                  "(hf_tlmtl.data.streaming)."},
    )


@dataclass
class RunArguments:
    """How this run treats its output folder."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a previous run in output_dir (its checkpoints and result files): it is set aside in "
                  "output_dir/.previous-run until the new run's first checkpoint or final model, and put back if the "
                  "new run fails before that."},
    )
    model_card: bool = field(default=True, metadata={"help": "Write the model card (README.md) into output_dir."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, RunArguments, MultiTaskTrainingArguments)


# --------------------------------------------------------------------------------- arguments
def build_parser() -> HfArgumentParser:
    """All of this recipe's arguments; bad ones raise ``UsageError`` (one line, exit code 2)."""
    return build_dataclass_parser(*ARGUMENT_CLASSES)


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, RunArguments, MultiTaskTrainingArguments]:
    """``[CONFIG.yaml] [--key value ...]`` -> the four argument dataclasses (command line over YAML over defaults)."""
    parser = build_parser()
    if argv and argv[0].endswith(YAML_SUFFIXES):
        argv = yaml_to_argv(Path(argv[0]), parser) + argv[1:]
    if not _accelerator_available():
        # Without it, TrainingArguments under `accelerate launch --multi_gpu --num_processes N` on a
        # CPU-only machine sets up DistributedType.NO: N processes that each train alone and all write.
        # use_cpu=True gives accelerate's MULTI_CPU (gloo) data parallelism. The YAML / command line win.
        argv = ["--use_cpu", "true", *argv]
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:  # raised by a dataclass's __post_init__
        raise UsageError(str(e)) from None
    reject_unknown(unknown, known_arguments(parser), fallback="; see --help for the arguments")
    model_args, data_args, run_args, training_args = parsed
    return model_args, data_args, run_args, training_args


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


# -------------------------------------------------------------------------------- output dir
def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (the Trainer writes trainer_state.json last), newest first."""
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def resolve_resume(training_args: MultiTaskTrainingArguments) -> str | None:
    """``--resume_from_checkpoint``: ``true`` -> the newest complete checkpoint in output_dir; a path -> checked."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "0", "none"):
        return None
    output_dir = Path(training_args.output_dir)
    if str(value).lower() in ("true", "yes", "1", "last", "latest"):
        found = _checkpoints(output_dir) if output_dir.is_dir() else []
        if not found:
            raise UsageError(
                f"--resume_from_checkpoint true but {str(output_dir)!r} holds no complete {PREFIX_CHECKPOINT_DIR}-* "
                "folder; start without it (checkpoints come from --save_strategy steps|epoch)"
            )
        return str(found[0])
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a complete Trainer checkpoint (no trainer_state.json)")
    return str(path)


def check_output_dir(training_args: MultiTaskTrainingArguments, run_args: RunArguments, resume: str | None) -> None:
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output_dir {str(out)!r} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not run_args.overwrite_output_dir and resume is None:
        raise UsageError(
            f"output_dir {str(out)!r} exists and is not empty; pass --overwrite_output_dir true to replace it, "
            "--resume_from_checkpoint true to continue it, or another --output_dir"
        )


def is_run_entry(path: Path) -> bool:
    """What a run of this recipe writes at the top of output_dir (checkpoints, result files); not the user's files."""
    if path.is_dir():
        return path.name in RUN_DIRS or path.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
    return path.name in RUN_FILES


def restore_interrupted_overwrite(training_args: MultiTaskTrainingArguments) -> list[str]:
    """A run killed while it was replacing a previous one (before its first checkpoint) left that
    previous run in output_dir/.previous-run: put it back before anything looks at the folder."""
    out = Path(training_args.output_dir)
    restored: list[str] = []
    with training_args.main_process_first(desc="restoring an interrupted overwrite"):
        if training_args.process_index == 0 and (out / SET_ASIDE_DIR).is_dir():
            restored = restore(out, is_run_entry)
            print(f"restored the previous run in {out} ({len(restored)} entries) that an interrupted "
                  "--overwrite_output_dir run had set aside", flush=True)
    return restored


# ------------------------------------------------------------------------------------- model
def _fixed_input_size(architecture: str) -> bool:
    """ViT-like timm models are built for one input size (``img_size=`` at creation)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(architecture.split(".")[0])
    except Exception:  # noqa: BLE001 - unknown names are reported by from_backbone
        return False
    return bool(getattr(cfg, "fixed_input_size", False))


def build_model(model_args: ModelArguments, tasks: list[TaskSpec]) -> TimmMultiTaskModel:
    if model_args.init_from:
        source = Path(model_args.init_from)
        if source.exists() and not (source / "config.json").is_file():
            raise UsageError(f"--init_from {str(source)!r} has no config.json; pass a folder written by this recipe")
        if not source.exists() and (source.is_absolute() or model_args.init_from.startswith((".", "~"))
                                    or model_args.init_from.count("/") != 1):
            raise UsageError(
                f"--init_from {model_args.init_from!r} not found; produce it first (e.g. run recipes/configs/default.yaml) "
                "or pass a Hub id org/name"
            )
        check_model_folder(source, "--init_from")
        model = TimmMultiTaskModel.from_pretrained(model_args.init_from, tasks=tasks)
        if model_args.image_size and not _fixed_input_size(model.config.backbone):
            model.config.data_config["input_size"] = [model.config.in_chans, model_args.image_size, model_args.image_size]
        return model
    timm_kwargs: dict[str, Any] = {}
    if model_args.drop_path_rate is not None:
        timm_kwargs["drop_path_rate"] = model_args.drop_path_rate
    if model_args.image_size and _fixed_input_size(model_args.backbone.split(":")[-1]):
        timm_kwargs["img_size"] = model_args.image_size
    return TimmMultiTaskModel.from_backbone(
        model_args.backbone,
        tasks=tasks,
        pretrained=model_args.pretrained,
        head_hidden_size=model_args.head_hidden_size,
        head_dropout=model_args.head_dropout,
        image_size=model_args.image_size,
        **timm_kwargs,
    )


def _channel_values(text: str, flag: str, channels: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes {channels} comma-separated numbers (one per channel), got {text!r}") from None
    if len(values) != channels or (flag == "--std" and min(values) <= 0):
        raise UsageError(f"{flag} needs {channels} {'positive ' if flag == '--std' else ''}numbers (one per input channel), got {text!r}")
    return values


def apply_preprocessing(model_args: ModelArguments, model: TimmMultiTaskModel) -> str | None:
    """``--mean`` / ``--std`` / ``--crop_pct`` into the model's data config (saved with it); a note on the crop.

    timm's 0.875 centre crop is an ImageNet-at-224-px convention: below the backbone's native input size
    (small images, or images generated at the input size) it would cut an eighth of the border, so the
    default there is the whole image (crop_pct 1.0).
    """
    data_config = model.config.data_config
    channels = model.config.in_chans
    for flag, key in (("--mean", "mean"), ("--std", "std")):
        text = getattr(model_args, key)
        if text is not None:
            data_config[key] = _channel_values(text, flag, channels)
    if model_args.crop_pct is not None:
        if not 0.0 < model_args.crop_pct <= 1.0:
            raise UsageError(f"--crop_pct must be in (0, 1] (the centre-crop fraction), got {model_args.crop_pct}")
        data_config["crop_pct"] = model_args.crop_pct
        return None
    native = native_input_side(model)
    side = min(data_config["input_size"][1:])
    if model_args.image_size and native and side < native and data_config.get("crop_pct", 1.0) < 1.0:
        note = (f"crop_pct {data_config['crop_pct']} -> 1.0: input {side} px is below the backbone's native "
                f"{native} px, so the whole image is kept (pass --crop_pct to choose)")
        data_config["crop_pct"] = 1.0
        return note
    return None


def _similarity(value: str) -> str | float:
    try:
        return float(value)
    except ValueError:
        return value


# --------------------------------------------------------------------------------- baselines
def baseline_metrics(train: datasets.Dataset, validation: datasets.Dataset, tasks: list[TaskSpec]) -> dict[str, dict[str, float]]:
    """What a model that ignores the image scores: the majority class (accuracy), the training mean
    (MAE), each label's training frequency as a constant score (mAP = label prevalence)."""
    baselines: dict[str, dict[str, float]] = {}
    for task in tasks:
        column = task.source_column
        y_train, y_eval = list(train[column]), list(validation[column])
        if task.type == "classification":
            known = [int(v) for v in y_train if v is not None and int(v) >= 0]
            labelled = [int(v) for v in y_eval if v is not None and int(v) >= 0]
            if known and labelled:
                majority = max(set(known), key=known.count)
                baselines[task.name] = {"accuracy": sum(v == majority for v in labelled) / len(labelled)}
        elif task.type == "regression" and task.num_outputs == 1:
            known = np.asarray([v for v in y_train if v is not None], dtype=float)
            labelled = np.asarray([v for v in y_eval if v is not None], dtype=float)
            known, labelled = known[~np.isnan(known)], labelled[~np.isnan(labelled)]
            if known.size and labelled.size:
                baselines[task.name] = {"mae": float(np.abs(labelled - known.mean()).mean()), "r2": 0.0}
        elif task.type == "multilabel":
            rows = [row for row in y_eval if row is not None]
            if rows and all(isinstance(v, (int, np.integer)) for row in rows for v in row):
                prevalence = [sum(i in row for row in rows) / len(rows) for i in range(task.num_outputs)]
                present = [p for p in prevalence if p > 0]
                if present:
                    baselines[task.name] = {"map": float(np.mean(present))}
    return baselines


# ------------------------------------------------------------------------------------- run
@dataclass
class Run:
    model_args: ModelArguments
    data_args: DataArguments
    run_args: RunArguments
    training_args: MultiTaskTrainingArguments
    raw: Any  # DatasetDict; with --streaming {"train": IterableDataset, "validation": Dataset}
    model: TimmMultiTaskModel
    trainer: MultiTaskTrainer
    resume: str | None
    recommendation: Any
    baselines: dict[str, dict[str, float]]
    push_repo: str | None = None
    batch_note: str | None = None
    crop_note: str | None = None


def check_push_to_hub(training_args: MultiTaskTrainingArguments) -> str | None:
    """--push_to_hub: the target repo id, after checking now (not after training) that an upload can work."""
    if not training_args.push_to_hub:
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"--push_to_hub: {repo_id!r} is not a Hub repo id ({e}); pass --hub_model_id org/name") from None
    if constants.HF_HUB_OFFLINE:
        raise UsageError("--push_to_hub but HF_HUB_OFFLINE is set: unset it to upload, or drop --push_to_hub")
    if not (training_args.hub_token or get_token()):
        raise UsageError("--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN or pass --hub_token")
    return repo_id


def setup(argv: list[str]) -> Run:
    """Everything that can fail on bad input, in the order users fix it; nothing is written yet."""
    model_args, data_args, run_args, training_args = parse_arguments(argv)
    restore_interrupted_overwrite(training_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, run_args, resume)
    set_seed(training_args.seed)
    if data_args.streaming:
        check_streaming_arguments(data_args, model_args, training_args)
    with training_args.main_process_first(desc="loading the dataset"):
        if data_args.streaming:
            raw, tasks = load_streaming_dataset(data_args.dataset, data_args.image_column, data_args.tasks, data_args.n_eval)
        else:
            raw = load_image_dataset(
                data_args.dataset,
                image_column=data_args.image_column,
                n_train=data_args.n_train,
                n_eval=data_args.n_eval,
                image_size=data_args.embedded_image_size,
                seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
                validation_fraction=data_args.validation_fraction,
                verify_images=data_args.verify_images,
            )
            raw, tasks = resolve_tasks(raw, data_args.tasks, data_args.image_column)
    model = build_model(model_args, tasks)
    crop_note = apply_preprocessing(model_args, model)
    if model_args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_transform = None if data_args.augment else build_transforms(model.config, train=False)
    # Augmentation seeded per row (run seed, epoch, row): a resumed run draws the crops an uninterrupted one does.
    # A stream has no row index: its augmentation draws from the generators the Trainer seeds.
    row_seed = training_args.seed if data_args.augment and not data_args.streaming else None
    train_ds = prepare_dataset(raw["train"], model.config, train=True, image_column=data_args.image_column,
                               transform=train_transform, seed=row_seed)
    eval_ds = prepare_dataset(raw["validation"], model.config, train=False, image_column=data_args.image_column)
    collator = MultiTaskCollator(model.tasks)
    first = [train_ds[i] for i in range(min(2, len(train_ds)))] if hasattr(train_ds, "__len__") else list(
        itertools.islice(iter(train_ds), 2))
    collator(first)  # a first batch, so data errors surface now
    recommendation = None
    if model_args.task_similarity is not None:
        recommendation = recommend_strategy(
            len(raw["train"]), _similarity(model_args.task_similarity), model=model,
            small_dataset_max_samples=model_args.small_dataset_max_samples,
            dataset=raw["train"], tasks=model.tasks, image_column=data_args.image_column,
        )
    # Baselines need the training labels' statistics: a stream is not read ahead for them.
    baselines = {} if data_args.streaming else baseline_metrics(raw["train"], raw["validation"], model.tasks)
    if data_args.streaming:
        # Each process reads its own files when their count divides the processes; else the main one dispatches.
        training_args.accelerator_config.dispatch_batches = not read_per_process(raw["train"], training_args.world_size)
    push_repo = check_push_to_hub(training_args)
    # The upload happens once, at the end, with hf_tlmtl's card (hf_tlmtl.hub), not at every Trainer save.
    training_args.push_to_hub = False
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; silences torch's warning
    out = Path(training_args.output_dir)
    existed = out.exists()
    try:
        trainer = MultiTaskTrainer(
            model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator
        )
        # Optimizer and scheduler settings, BatchNorm on batches of one: what would fail in train().
        batch_note = trainer.check_can_train()
        if resume is not None:
            mismatch = checkpoint_mismatch(trainer.model, resume)
            if mismatch:
                raise UsageError(
                    f"--resume_from_checkpoint: {resume} does not fit this run's model: {mismatch}. Pass the arguments "
                    "of the run that wrote it (--backbone, --tasks, --transfer_strategy ...) to continue it, or start "
                    "a new run with --overwrite_output_dir true or another --output_dir"
                )
    except ValueError:
        # The Trainer creates output_dir before some of its checks: bad input leaves nothing behind.
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return Run(model_args, data_args, run_args, training_args, raw, model, trainer, resume, recommendation, baselines,
               push_repo, batch_note, crop_note)


def _rows(split: Any) -> str:
    if hasattr(split, "__len__"):
        return str(len(split))
    return f"streamed ({split.n_shards} file(s))"


def check_streaming_arguments(
    data_args: DataArguments, model_args: ModelArguments, training_args: MultiTaskTrainingArguments
) -> None:
    """--streaming: what a stream cannot do, refused before anything is read."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise UsageError(
            "--streaming true needs --max_steps N: a stream has no length, so the Trainer cannot count epochs "
            "(steps = rows you want to train on / global batch size)"
        )
    if data_args.n_train is not None:
        raise UsageError("--n_train does not apply to --streaming true (a stream is not subset); bound the run with --max_steps")
    if model_args.task_similarity is not None:
        raise UsageError("--task_similarity scores the whole training set, which a stream does not hold; drop it with --streaming true")
    if training_args.cache_features:
        raise UsageError("--cache_features stores features for a dataset in memory/disk; it does not apply to --streaming true")


def describe_plan(run: Run) -> str:
    model, args, raw = run.model, run.training_args, run.raw
    config = model.config
    if run.model_args.init_from:
        weights = f"transferred from {run.model_args.init_from}"
        reused = getattr(model, "reused_heads", [])
        if reused:
            weights += f" (heads kept: {', '.join(reused)})"
    elif config.backbone_source:
        weights = f"weights from {config.backbone_source}"
    else:
        weights = "random init"
    _, height, width = config.data_config["input_size"]
    if args.cache_features:
        augmentation = "off (--cache_features trains on features of the eval transform)"
    else:
        augmentation = "timm" if run.data_args.augment else "off"
    crop = config.data_config.get("crop_pct")
    lines = [
        "== hf_tlmtl finetune ==",
        f"model    : {config.backbone}, {weights}; input {width}x{height}"
        + (f" (crop_pct {crop:g})" if crop is not None else "") + f", augmentation {augmentation}",
        f"data     : {run.data_args.dataset}: {_rows(raw['train'])} train / {len(raw['validation'])} validation rows",
        "tasks    : " + "; ".join(_describe_task(t) for t in model.tasks),
    ]
    if run.crop_note:
        lines.insert(2, f"           note: {run.crop_note}")
    summary = run.trainer.transfer_summary or summarize_trainable(run.trainer.model, args.transfer_strategy)
    lines.append(
        f"transfer : strategy {args.transfer_strategy or 'none (all parameters train)'}; trainable "
        f"{summary.trainable_params:,} of {summary.total_params:,} parameters ({100 * summary.trainable_fraction:.1f}%)"
    )
    lines += ["           " + line for line in str(summary).splitlines()[2:]]
    if run.recommendation is not None:
        rec = run.recommendation
        advice = {k: v for k, v in rec.training_kwargs(learning_rate=args.learning_rate).items() if v is not None}
        lines.append(f"advice   : {rec.reason}")
        lines.append("           to follow it: " + " ".join(f"--{k} {v}" for k, v in advice.items()))
    elif run.model_args.init_from or config.backbone_source:
        lines.append("advice   : pass --task_similarity measured (or similar|different|0..1) for recommend_strategy's transfer advice")
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.max_steps > 0:  # max_steps wins over num_train_epochs in the Trainer
        length = f"{args.max_steps} steps (max_steps"
        if hasattr(raw["train"], "__len__"):  # a stream has no length
            length += f"; {args.max_steps * global_batch / max(len(raw['train']), 1):.1f} epochs"
        length += ")"
    else:
        length = f"{args.num_train_epochs:g} epochs"
    lines.append(
        f"training : {length}, global batch {global_batch} ({args.world_size} process(es) x "
        f"{args.per_device_train_batch_size}), lr {args.learning_rate:g}, loss balancing {args.loss_balancing}, "
        f"BatchNorm {args.bn}, device {args.device}"
    )
    if run.batch_note:
        lines.append(f"           note: {run.batch_note}")
    sharding = describe_sharding(run.trainer)
    if sharding:
        lines.append(f"sharding : {sharding}")
    if run.resume:
        lines.append(f"resume   : from {run.resume}")
    lines.append(f"output   : {Path(args.output_dir).resolve()}")
    return "\n".join(lines)


def _describe_task(task: TaskSpec) -> str:
    if task.type == "regression":
        return f"{task.name} (regression)"
    labels = ", ".join(task.labels[:6]) + (", ..." if len(task.labels or []) > 6 else "") if task.labels else ""
    return f"{task.name} ({task.type}, {task.num_outputs} classes{': ' + labels if labels else ''})"


def per_task_metrics(metrics: dict[str, float], tasks: list[TaskSpec]) -> dict[str, dict[str, float]]:
    """``eval_<task>_<metric>`` -> ``{task: {metric: value}}`` (longest task names matched first)."""
    names = sorted((t.name for t in tasks), key=len, reverse=True)
    grouped: dict[str, dict[str, float]] = {t.name: {} for t in tasks}
    for key, value in metrics.items():
        task = next((n for n in names if key.startswith(f"eval_{n}_")), None)
        if task is not None:
            grouped[task][key[len(f"eval_{task}_"):]] = value
    return grouped


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through train_and_save's restore of a set-aside run


def train_and_save(run: Run) -> dict[str, Any]:
    trainer, args = run.trainer, run.training_args
    out = Path(args.output_dir)
    main = args.process_index == 0
    set_aside_run = False
    if run.run_args.overwrite_output_dir and run.resume is None:
        # The previous run is moved aside, not deleted: it is given up at the new run's first checkpoint
        # or final model, and moved back if the new run fails before that.
        with args.main_process_first(desc="setting the previous run aside"):
            if main and out.is_dir():
                set_aside_run = bool(set_aside(out, is_run_entry))
        if set_aside_run:
            trainer.add_callback(DropSetAsideOnSave(out))
            signal.signal(signal.SIGTERM, _raise_on_sigterm)
    if main:
        print(describe_plan(run), flush=True)
    try:
        train_result = trainer.train(resume_from_checkpoint=run.resume)
        metrics = trainer.evaluate()
        final_model = save_final_model(trainer, out)
    except BaseException:
        if set_aside_run and (out / SET_ASIDE_DIR).is_dir():
            restore(out, is_run_entry)
            print(f"the run failed before its first checkpoint; the previous run in {out} is back as it was",
                  file=sys.stderr, flush=True)
        raise
    if set_aside_run:
        drop_set_aside(out)
    trainer.save_state()
    summary = {
        "tasks": [t.to_dict() for t in run.model.tasks],
        "per_task": per_task_metrics(metrics, run.model.tasks),
        "baselines": run.baselines,
        "eval": metrics,
        "train": train_result.metrics,
        "data": {
            "source": run.data_args.dataset,
            "train_rows": len(run.raw["train"]) if hasattr(run.raw["train"], "__len__") else None,
            "streaming": run.data_args.streaming,
            "validation_rows": len(run.raw["validation"]),
        },
        "transfer": {
            "strategy": args.transfer_strategy,
            "recommendation": dataclasses.asdict(run.recommendation) if run.recommendation else None,
            **_trainable_counts(trainer),
        },
        "resumed_from": run.resume,
        "world_size": args.world_size,
        "written_by_process": args.process_index,
        "arguments": {
            "model": dataclasses.asdict(run.model_args),
            "data": dataclasses.asdict(run.data_args),
            "run": dataclasses.asdict(run.run_args),
            "training": args.to_dict(),
        },
    }
    if main:  # the other processes wrote nothing above (the Trainer saves on process 0 only) and write nothing here
        plot_training_curves(trainer.state.log_history, run.model.task_names, out / CURVES_FILE,
                             title=f"{run.model.config.backbone} on {run.data_args.dataset}")
        summary["model_card"] = (
            write_model_card(run, final_model, metrics, out) if run.run_args.model_card else "off (--model_card false)"
        )
        summary["push_to_hub"] = run.push_repo
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_jsonable))
        print(describe_results(run, summary, out), flush=True)
    if run.push_repo and main:
        try:
            push_to_hub(run, out)
        except (ValueError, ConnectionError) as e:  # hf_tlmtl.hub.PushToHubError is a ConnectionError
            print(f"error: push to the Hub failed, the local folder is complete: {' '.join(str(e).split())}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
    return summary


def _trainable_counts(trainer: MultiTaskTrainer) -> dict[str, int]:
    summary = trainer.transfer_summary or summarize_trainable(trainer.model)
    return {"trainable_params": summary.trainable_params, "total_params": summary.total_params}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def save_final_model(trainer: MultiTaskTrainer, out: Path) -> TimmMultiTaskModel | None:
    """The trained model into ``out`` (AutoModel-loadable). A peft model is saved merged, its adapter in ``out/adapter``.

    Under FSDP a peft model is gathered from the shards (every process takes part) and saved from a one-process
    copy on the process that saves; the others get None.
    """
    model = trainer.model
    if not is_peft_model(model):
        trainer.save_model()
        return model
    if trainer.is_fsdp_enabled:
        # peft's save and the merge read the weights' storage, which FSDP2 frees: work on a whole copy instead.
        state_dict = full_state_dict(trainer.accelerator, model)  # a collective: every process gathers
        if not trainer.args.should_save:
            return None
        from hf_tlmtl.adapters import unsharded_copy

        model = unsharded_copy(model, state_dict)
    if trainer.args.should_save:
        model.save_pretrained(out / "adapter")
    from hf_tlmtl.adapters import merge_adapter  # peft's merge_and_unload alone fails on loha / lokr / ia3 heads

    merged = merge_adapter(model)
    if trainer.args.should_save:
        merged.save_pretrained(out)
    return merged


def write_model_card(run: Run, model: TimmMultiTaskModel, metrics: dict[str, float], out: Path) -> str:
    """``hf_tlmtl.hub.create_model_card`` -> ``README.md``; says why when it cannot."""
    try:
        from hf_tlmtl.hub import create_model_card
    except ImportError:
        print("model card: skipped (hf_tlmtl.hub is not available in this version)", flush=True)
        return "skipped: hf_tlmtl.hub not available"
    card = create_model_card(
        model,
        metrics=metrics,
        dataset=run.data_args.dataset,
        training_args=run.training_args,
        transfer_summary=run.trainer.transfer_summary,
        curves_image=out / CURVES_FILE if (out / CURVES_FILE).is_file() else None,
        recommendation=run.recommendation,
        repo_id=run.push_repo,
    )
    card.save(out / CARD_FILE)
    return "written"


def push_to_hub(run: Run, out: Path) -> None:
    """--push_to_hub: the output folder (model, card, summary, curves, adapter) to the Hub in one commit."""
    from hf_tlmtl.hub import push_model_to_hub

    args = run.training_args
    commit = push_model_to_hub(
        out, run.push_repo, token=args.hub_token, private=args.hub_private_repo, revision=args.hub_revision,
        commit_message=f"hf_tlmtl finetune: {run.model.config.backbone} on {run.data_args.dataset}",
    )
    print(f"Pushed to the Hub: {getattr(commit, 'commit_url', None) or run.push_repo}", flush=True)


def describe_results(run: Run, summary: dict[str, Any], out: Path) -> str:
    lines = ["", f"== Results on the validation split ({summary['data']['validation_rows']} rows) =="]
    width = max(len(t.name) for t in run.model.tasks)
    for task in run.model.tasks:
        values = summary["per_task"].get(task.name, {})
        baseline = summary["baselines"].get(task.name, {})
        shown = []
        for metric, value in values.items():
            if metric == "loss" or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            text = f"{metric} {value:.3f}"
            if metric in baseline:
                text += f" (baseline {baseline[metric]:.3f})"
            shown.append(text)
        lines.append(f"  {task.name:<{width}}  {task.type:<14}  " + (", ".join(shown) or "no metrics"))
    if "eval_loss" in summary["eval"]:
        lines.append(f"  overall eval loss {summary['eval']['eval_loss']:.4f}")
    lines.append("  (baseline: a model that ignores the image: majority class, training mean, label frequency)")
    lines.append("")
    lines.append(f"Files in {out.resolve()}:")
    lines.append("  config.json, model.safetensors    the model: import hf_tlmtl; transformers.AutoModel.from_pretrained(dir)")
    lines.append("  preprocessor_config.json          its preprocessing (AutoImageProcessor)")
    lines.append(f"  {SUMMARY_FILE:<32}  arguments, data, transfer plan, per-task metrics and baselines")
    lines.append(f"  {CURVES_FILE:<32}  training loss and evaluation metrics per task")
    if (out / CARD_FILE).is_file():
        lines.append(f"  {CARD_FILE:<32}  model card")
    if (out / "adapter").is_dir():
        lines.append(f"  {'adapter/':<32}  the peft adapter alone (the model above has it merged)")
    if _checkpoints(out):
        lines.append(f"  {PREFIX_CHECKPOINT_DIR}-*{'':<21}  resume with --resume_from_checkpoint true")
    lines.append(f"Predict: python recipes/predict.py --model {out} --data IMAGES_OR_TABLE --output predictions.csv")
    return "\n".join(lines)


def main(argv: list[str]) -> dict[str, Any]:
    """Set up (exit 2 on bad input), then train, evaluate and save."""
    run = run_or_exit(setup, argv)  # UsageError and the library's "what to change" errors
    return train_and_save(run)


def cli() -> None:
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars; the Trainer keeps its own
    datasets.disable_progress_bars()
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
