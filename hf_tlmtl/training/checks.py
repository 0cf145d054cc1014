"""Checks that would otherwise fail only inside ``Trainer.train()``, after output folders were touched.

:meth:`~hf_tlmtl.training.MultiTaskTrainer.check_can_train` runs them before training (and the recipes
before anything is written):

- :func:`check_optimizer_settings`: the optimizer and the LR scheduler, built once on a dummy parameter.
- :func:`last_batch_of_one`: BatchNorm that trains cannot normalise one value per channel.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainingArguments, get_scheduler

from ..backbone.unwrap import unwrap
from ..transfer.batch_norm import batch_norm_min_values


def check_optimizer_settings(args: TrainingArguments, optimizer_cls: type, optimizer_kwargs: dict[str, Any]) -> None:
    """Build ``optimizer_cls`` and ``args``'s LR scheduler once on a dummy parameter; ``ValueError`` naming the
    settings they refuse (learning rate, betas, epsilon, weight decay, scheduler kwargs).

    Example:
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments(output_dir="/tmp/x", learning_rate=-1.0, report_to="none")
        >>> check_optimizer_settings(args, torch.optim.AdamW, {"lr": args.learning_rate})
        Traceback (most recent call last):
        ...
        ValueError: optim='adamw_torch_fused' refuses these settings (Invalid learning rate: -1.0): check learning_rate=-1.0, weight_decay=0.0, adam_beta1/adam_beta2=0.9/0.999, adam_epsilon=1e-08, optim_args.
    """
    dummy = torch.nn.Parameter(torch.zeros(2))
    try:
        optimizer = optimizer_cls([dummy], **optimizer_kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"optim={getattr(args.optim, 'value', args.optim)!r} refuses these settings ({e}): check learning_rate="
            f"{args.learning_rate}, weight_decay={args.weight_decay}, adam_beta1/adam_beta2="
            f"{args.adam_beta1}/{args.adam_beta2}, adam_epsilon={args.adam_epsilon}, optim_args."
        ) from None
    steps = args.max_steps if args.max_steps > 0 else 100
    try:
        get_scheduler(
            args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(steps),
            num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"lr_scheduler_type={str(args.lr_scheduler_type)!r} refuses these settings ({e}); check "
            f"lr_scheduler_kwargs={args.lr_scheduler_kwargs}."
        ) from None


def last_batch_of_one(model: torch.nn.Module, args: TrainingArguments, train_dataset: Any) -> str | None:
    """Whether training would feed BatchNorm a batch it cannot train on; the note to drop the last batch, or None.

    When a BatchNorm layer of the backbone sees 1x1 feature maps at the model's input size,
    ``per_device_train_batch_size=1`` (or a one-row training set) is a ``ValueError``; an epoch that would end on
    a batch of one image returns a note saying that image is left out (set ``dataloader_drop_last``).

    Example:
        >>> from transformers import TrainingArguments
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
        >>> args = TrainingArguments(output_dir="/tmp/x", per_device_train_batch_size=4, report_to="none")
        >>> last_batch_of_one(m, args, list(range(9)))[:46]
        '9 training rows in batches of 4 would end each'
    """
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return None
    found = batch_norm_min_values(model)
    if found is None or found[0] > 1:
        return None
    _, layer = found
    base = unwrap(model)
    size = "x".join(str(v) for v in base.config.data_config.get("input_size", [])[1:])
    batch, rows = args.per_device_train_batch_size, len(train_dataset)
    fix = (
        "use a batch size of 2 or more, a larger image size, or transfer_strategy='feature_extraction' "
        "(BatchNorm frozen)"
    )
    why = (
        f"BatchNorm layer {layer} of backbone {base.config.backbone!r} sees 1x1 feature maps at input {size}, "
        "and BatchNorm cannot train on one value per channel"
    )
    if batch == 1:
        raise ValueError(f"per_device_train_batch_size=1: {why}; {fix}.")
    # Several processes: accelerate completes every process's last batch (even_batches), so only
    # a single process can end an epoch on a batch of one.
    if args.world_size > 1 or args.dataloader_drop_last or rows % batch != 1:
        return None
    if rows == 1:
        raise ValueError(f"The training set has 1 row: {why}; train on more rows or {fix}.")
    return (
        f"{rows} training rows in batches of {batch} would end each epoch on a batch of one image, which "
        f"{layer} (BatchNorm) cannot train on: that last image is left out of each epoch (dataloader_drop_last)"
    )
