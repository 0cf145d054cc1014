"""The plan a fine-tuning run prints before it trains: what decides the run, in one screen.

:func:`describe_plan` reads it from the trainer (model, transfer summary, arguments, sharding) and the
few things only the caller knows (the data's name and splits, where the weights came from, the advice,
notes on what was adjusted, the checkpoint resumed from).

Example:
    >>> import tempfile
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
    >>> args = MultiTaskTrainingArguments(tempfile.mkdtemp(), report_to="none")
    >>> plan = describe_plan(MultiTaskTrainer(model=model, args=args), dataset="shapes", train=range(40), validation=range(8))
    >>> print("\\n".join(plan.splitlines()[:4]))
    == hf_tlmtl finetune ==
    model    : test_resnet, random init; input 32x32 (crop_pct 0.95), augmentation timm
    data     : shapes: 40 train / 8 validation rows
    tasks    : y (regression)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbone.unwrap import unwrap
from ..tasks import TaskSpec
from ..transfer.advice import Recommendation
from ..transfer.summary import summarize_trainable
from .distributed import describe_sharding
from .trainer import MultiTaskTrainer


def split_rows(split: Any) -> str:
    """A split's row count as the plan shows it; a stream has none.

    >>> split_rows(range(40))
    '40'
    """
    if hasattr(split, "__len__"):
        return str(len(split))
    return f"streamed ({split.n_shards} file(s))"


def describe_task(task: TaskSpec) -> str:
    """One task as the plan lists it.

    >>> describe_task(TaskSpec(name="shape", type="classification", labels=["square", "circle"]))
    'shape (classification, 2 classes: square, circle)'
    """
    if task.type == "regression":
        return f"{task.name} (regression)"
    labels = ", ".join(task.labels[:6]) + (", ..." if len(task.labels or []) > 6 else "") if task.labels else ""
    return f"{task.name} ({task.type}, {task.num_outputs} classes{': ' + labels if labels else ''})"


def describe_plan(
    trainer: MultiTaskTrainer,
    *,
    dataset: str,
    train: Any,
    validation: Any,
    init_from: str | None = None,
    augment: bool = True,
    recommendation: Recommendation | None = None,
    crop_note: str | None = None,
    batch_note: str | None = None,
    resume: str | None = None,
) -> str:
    """The run's plan: model and weights, data, tasks, what trains, the advice, training length and batch, output.

    Args:
        trainer: The trainer about to train (its model is prepared: the transfer summary says what trains).
        dataset: The data's name as given; ``train`` / ``validation``: its splits (a stream has no row count).
        init_from: The saved model the weights were transferred from (``--init_from``), if any.
        augment: Whether the training transform augments (``--augment``).
        recommendation: :func:`~hf_tlmtl.transfer.recommend_strategy`'s advice, shown with the flags that follow it.
        crop_note, batch_note: What was adjusted on the input crop and on the last batch, shown under the model
            and the training lines.
        resume: The checkpoint the run continues.
    """
    model, args = unwrap(trainer.model), trainer.args
    config = model.config
    if init_from:
        weights = f"transferred from {init_from}"
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
        augmentation = "timm" if augment else "off"
    crop = config.data_config.get("crop_pct")
    lines = [
        "== hf_tlmtl finetune ==",
        f"model    : {config.backbone}, {weights}; input {width}x{height}"
        + (f" (crop_pct {crop:g})" if crop is not None else "") + f", augmentation {augmentation}",
        f"data     : {dataset}: {split_rows(train)} train / {len(validation)} validation rows",
        "tasks    : " + "; ".join(describe_task(t) for t in model.tasks),
    ]
    if crop_note:
        lines.insert(2, f"           note: {crop_note}")
    summary = trainer.transfer_summary or summarize_trainable(trainer.model, args.transfer_strategy)
    lines.append(
        f"transfer : strategy {args.transfer_strategy or 'none (all parameters train)'}; trainable "
        f"{summary.trainable_params:,} of {summary.total_params:,} parameters ({100 * summary.trainable_fraction:.1f}%)"
    )
    lines += ["           " + line for line in str(summary).splitlines()[2:]]
    if recommendation is not None:
        advice = {k: v for k, v in recommendation.training_kwargs(learning_rate=args.learning_rate).items() if v is not None}
        lines.append(f"advice   : {recommendation.reason}")
        lines.append("           to follow it: " + " ".join(f"--{k} {v}" for k, v in advice.items()))
    elif init_from or config.backbone_source:
        lines.append("advice   : pass --task_similarity measured (or similar|different|0..1) for recommend_strategy's transfer advice")
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.max_steps > 0:  # max_steps wins over num_train_epochs in the Trainer
        length = f"{args.max_steps} steps (max_steps"
        if hasattr(train, "__len__"):  # a stream has no length
            length += f"; {args.max_steps * global_batch / max(len(train), 1):.1f} epochs"
        length += ")"
    else:
        length = f"{args.num_train_epochs:g} epochs"
    lines.append(
        f"training : {length}, global batch {global_batch} ({args.world_size} process(es) x "
        f"{args.per_device_train_batch_size}), lr {args.learning_rate:g}, loss balancing {args.loss_balancing}, "
        f"BatchNorm {args.bn}, device {args.device}"
    )
    if batch_note:
        lines.append(f"           note: {batch_note}")
    sharding = describe_sharding(trainer)
    if sharding:
        lines.append(f"sharding : {sharding}")
    if resume:
        lines.append(f"resume   : from {resume}")
    lines.append(f"output   : {Path(args.output_dir).resolve()}")
    return "\n".join(lines)


__all__ = ["describe_plan", "describe_task", "split_rows"]
