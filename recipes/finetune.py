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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import set_seed  # noqa: E402

import hf_tlmtl  # noqa: E402,F401  (registers the Auto classes)
from hf_tlmtl import TimmMultiTaskModel  # noqa: E402
from hf_tlmtl.data import MultiTaskCollator, build_transforms, check_first_batch, load_splits, prepare_dataset, read_per_process  # noqa: E402
from hf_tlmtl.hub import check_can_push, create_model_card, push_model_to_hub  # noqa: E402
from hf_tlmtl.multitask import baseline_metrics, plot_training_curves  # noqa: E402
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments  # noqa: E402
from hf_tlmtl.training.cli import UsageError, parse_run_argv, run_or_exit  # noqa: E402
from hf_tlmtl.training.final_model import save_final_model  # noqa: E402
from hf_tlmtl.training.folder_lock import lock_output_dir, unlock_output_dir  # noqa: E402
from hf_tlmtl.training.model_setup import build_model, override_preprocessing  # noqa: E402
from hf_tlmtl.training.output_dir import (  # noqa: E402
    CARD_FILE, CURVES_FILE, check_output_dir, check_resume_fits, is_run_entry, removed_if_left_empty, resolve_resume,
)
from hf_tlmtl.training.plan import describe_plan  # noqa: E402
from hf_tlmtl.training.run_folder import previous_run_set_aside, restore_interrupted  # noqa: E402
from hf_tlmtl.training.summary import describe_results, training_summary, write_summary  # noqa: E402
from hf_tlmtl.transfer import SMALL_DATASET_MAX_SAMPLES, Recommendation, parse_similarity, recommend_strategy  # noqa: E402


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


@dataclass
class Run:
    """What :func:`setup` built, handed to :func:`train_and_save` (tests look at it before training)."""

    model_args: ModelArguments
    data_args: DataArguments
    run_args: RunArguments
    raw: Any  # {"train", "validation"}; with --streaming the train split is an IterableDataset
    model: TimmMultiTaskModel
    trainer: MultiTaskTrainer
    resume: str | None
    recommendation: Recommendation | None
    baselines: dict[str, dict[str, float]]
    push_repo: str | None
    crop_note: str | None
    plan: str


def setup(argv: list[str]) -> Run:
    """Everything bad input can stop, in the order users fix it; nothing is trained or written yet."""
    model_args, data_args, run_args, training_args = parse_run_argv(argv, *ARGUMENT_CLASSES)

    # The output folder: an interrupted overwrite put back first; then new, replaced or continued.
    if training_args.local_process_index == 0:  # one run per output folder: a second one is refused here
        lock_output_dir(training_args.output_dir)
    restore_interrupted(training_args, is_run_entry)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, overwrite=run_args.overwrite_output_dir, resume=resume)
    set_seed(training_args.seed)
    if data_args.streaming:  # what a stream cannot do, refused before anything is read
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

    # The data: train and validation splits, and the tasks their columns hold.
    with training_args.main_process_first(desc="loading the dataset"):
        raw, tasks = load_splits(
            data_args.dataset, tasks=data_args.tasks, image_column=data_args.image_column, streaming=data_args.streaming,
            n_train=data_args.n_train, n_eval=data_args.n_eval, image_size=data_args.embedded_image_size,
            seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
            validation_fraction=data_args.validation_fraction, verify_images=data_args.verify_images,
        )

    # The model: a backbone with new heads, or a saved model re-headed (--init_from); its preprocessing.
    model = build_model(
        tasks, backbone=model_args.backbone, pretrained=model_args.pretrained, init_from=model_args.init_from,
        image_size=model_args.image_size, head_hidden_size=model_args.head_hidden_size,
        head_dropout=model_args.head_dropout, drop_path_rate=model_args.drop_path_rate,
    )
    crop_note = override_preprocessing(
        model, mean=model_args.mean, std=model_args.std, crop_pct=model_args.crop_pct, image_size=model_args.image_size
    )
    if model_args.channels_last:
        model.to(memory_format=torch.channels_last)

    # The datasets the model reads (timm's transforms, applied lazily), and a first batch: data errors surface now.
    # Augmentation is seeded per row (run seed, epoch, row): a resumed run draws the crops an uninterrupted one does.
    # A stream has no row index: its augmentation draws from the generators the Trainer seeds.
    train_transform = None if data_args.augment else build_transforms(model.config, train=False)
    row_seed = training_args.seed if data_args.augment and not data_args.streaming else None
    train_ds = prepare_dataset(raw["train"], model.config, train=True, image_column=data_args.image_column,
                               transform=train_transform, seed=row_seed)
    eval_ds = prepare_dataset(raw["validation"], model.config, train=False, image_column=data_args.image_column)
    collator = MultiTaskCollator(model.tasks)
    check_first_batch(train_ds, collator)

    # Advice (--task_similarity) and the baselines (a stream is not read ahead for the training labels' statistics).
    recommendation = None
    if model_args.task_similarity is not None:
        recommendation = recommend_strategy(
            len(raw["train"]), parse_similarity(model_args.task_similarity), model=model,
            small_dataset_max_samples=model_args.small_dataset_max_samples,
            dataset=raw["train"], tasks=model.tasks, image_column=data_args.image_column,
        )
    baselines = {} if data_args.streaming else baseline_metrics(raw["train"], raw["validation"], model.tasks)

    # The trainer. A stream: each process reads its own files when their count divides the processes, else the
    # main one dispatches. --push_to_hub: checked now; the upload happens once, at the end, with hf_tlmtl's card.
    if data_args.streaming:
        training_args.accelerator_config.dispatch_batches = not read_per_process(raw["train"], training_args.world_size)
    push_repo = None
    if training_args.push_to_hub:
        push_repo = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
        check_can_push(push_repo, token=training_args.hub_token)
    training_args.push_to_hub = False
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; silences torch's warning
    with removed_if_left_empty(training_args.output_dir):  # the Trainer creates it before some of its checks
        trainer = MultiTaskTrainer(
            model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator
        )
        batch_note = trainer.check_can_train()  # optimizer and scheduler settings, BatchNorm on batches of one
        if resume is not None:
            check_resume_fits(trainer.model, resume)
    plan = describe_plan(
        trainer, dataset=data_args.dataset, train=raw["train"], validation=raw["validation"],
        init_from=model_args.init_from, augment=data_args.augment, recommendation=recommendation,
        crop_note=crop_note, batch_note=batch_note, resume=resume,
    )
    return Run(model_args, data_args, run_args, raw, model, trainer, resume, recommendation, baselines, push_repo,
               crop_note, plan)


def train_and_save(run: Run) -> dict[str, Any]:
    """Train, evaluate, save the model, its card, the summary and the curves, push; returns the summary."""
    trainer, args = run.trainer, run.trainer.args
    out = Path(args.output_dir)
    main_process = args.process_index == 0
    # --overwrite_output_dir: the previous run is set aside until this run's first checkpoint or final model,
    # and put back if this run fails before that.
    with previous_run_set_aside(trainer, is_run_entry, enabled=run.run_args.overwrite_output_dir and run.resume is None):
        if main_process:
            print(run.plan, flush=True)
        train_result = trainer.train(resume_from_checkpoint=run.resume)
        metrics = trainer.evaluate()
        final_model = save_final_model(trainer)
    trainer.save_state()

    summary = training_summary(
        trainer, metrics, train_result.metrics, dataset=run.data_args.dataset, train=run.raw["train"],
        validation=run.raw["validation"], baselines=run.baselines, recommendation=run.recommendation,
        resumed_from=run.resume,
        arguments={"model": dataclasses.asdict(run.model_args), "data": dataclasses.asdict(run.data_args),
                   "run": dataclasses.asdict(run.run_args), "training": args.to_dict()},
    )
    if not main_process:  # the Trainer saves on process 0 only; the others write nothing here either
        return summary
    plot_training_curves(trainer.state.log_history, run.model.task_names, out / CURVES_FILE,
                         title=f"{run.model.config.backbone} on {run.data_args.dataset}")
    summary["model_card"] = "off (--model_card false)"
    if run.run_args.model_card:
        card = create_model_card(
            final_model, metrics=metrics, dataset=run.data_args.dataset, training_args=args,
            transfer_summary=trainer.transfer_summary, recommendation=run.recommendation, repo_id=run.push_repo,
            curves_image=out / CURVES_FILE if (out / CURVES_FILE).is_file() else None,
        )
        card.save(out / CARD_FILE)
        summary["model_card"] = "written"
    summary["push_to_hub"] = run.push_repo
    write_summary(summary, out)
    print(describe_results(summary, out), flush=True)

    if run.push_repo:  # the output folder (model, card, summary, curves, adapter) in one commit
        try:
            commit = push_model_to_hub(
                out, run.push_repo, token=args.hub_token, private=args.hub_private_repo, revision=args.hub_revision,
                commit_message=f"hf_tlmtl finetune: {run.model.config.backbone} on {run.data_args.dataset}",
            )
        except (ValueError, ConnectionError) as e:  # hf_tlmtl.hub.PushToHubError is a ConnectionError
            print(f"error: push to the Hub failed, the local folder is complete: {' '.join(str(e).split())}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        print(f"Pushed to the Hub: {getattr(commit, 'commit_url', None) or run.push_repo}", flush=True)
    return summary


def main(argv: list[str]) -> dict[str, Any]:
    """Set up (bad input: one ``error:`` line, exit code 2, nothing written), then train and save."""
    run = run_or_exit(setup, argv)
    try:
        summary = train_and_save(run)
    finally:  # the output folder is free for the next run (the process's end would free it too)
        unlock_output_dir(run.trainer.args.output_dir)
    if torch.distributed.is_initialized():  # each process leaves its group: gloo can abort at exit otherwise
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars; the Trainer keeps its own
    datasets.disable_progress_bars()
    main(sys.argv[1:])
