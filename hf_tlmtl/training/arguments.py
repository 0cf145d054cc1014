"""``MultiTaskTrainingArguments``: ``TrainingArguments`` plus the transfer-learning and multi-task options,
checked together when made; :meth:`~MultiTaskTrainingArguments.transfer_config` hands the transfer part to
:func:`hf_tlmtl.transfer.prepare_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

try:  # transformers >= 5: optimizer factories (Muon, Dion) build their own groups
    from transformers.trainer_optimizer import (
        is_optimizer_factory as _is_optimizer_factory,
    )
except ImportError:  # pragma: no cover - older transformers

    def _is_optimizer_factory(optimizer_cls: Any) -> bool:
        return False

from ..adapters.config import METHODS, AdapterConfig
from ..multitask.balancing import BALANCERS
from ..transfer.batch_norm import check_bn_policy
from ..transfer.preparation import TransferConfig


@dataclass
class MultiTaskTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus transfer-learning and multi-task options.

    Defaults differ from ``TrainingArguments`` in two places that multi-task image models need:
    ``remove_unused_columns=False`` (the lazy image transform reads the raw columns) and
    ``label_names`` filled with the model's task names by the trainer.
    """

    transfer_strategy: str | None = field(
        default=None,
        metadata={"help": "feature_extraction | fine_tune | partial | truncate | lora (None: leave the model as is)."},
    )
    trainable_groups: int | None = field(
        default=None, metadata={"help": "partial: number of top layer groups that train."}
    )
    trainable_fraction: float | None = field(
        default=None,
        metadata={"help": "partial / truncate, instead of trainable_groups: share of the backbone's parameters that "
                  "trains, resolved to whole top layer groups (the transfer summary says which)."},
    )
    truncate_stage: int | None = field(
        default=None, metadata={"help": "truncate: feature_info index of the last backbone stage kept."}
    )
    keep_depth: float | None = field(
        default=None,
        metadata={"help": "truncate, instead of truncate_stage: share of the backbone's depth kept, resolved to the "
                  "nearest cut timm can make (hf_tlmtl.transfer.truncation_points)."},
    )
    bn: str = field(
        default="train",
        metadata={"help": "BatchNorm policy: train | frozen (statistics and affine weights fixed, whatever else "
                  "trains) | recalibrate (re-estimate running statistics on the training data before each "
                  "evaluation and save). See hf_tlmtl.transfer.batch_norm."},
    )
    bn_recalibration_batches: int = field(
        default=100, metadata={"help": "bn=recalibrate: at most this many training batches (eval batch size) per re-estimate."}
    )
    keep_frozen: bool = field(
        default=False,
        metadata={"help": "fine_tune / partial / truncate keep what was frozen before (instead of unfreezing it, with a warning)."},
    )
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise LR decay in (0, 1]; lr of group i = lr * decay**(num_layers - i)."}
    )
    head_lr_scale: float = field(default=1.0, metadata={"help": "Heads train at learning_rate * head_lr_scale."})
    loss_balancing: str = field(default="static", metadata={"help": f"Multi-task loss balancing: {sorted(BALANCERS)}."})
    gradual_unfreeze: bool = field(
        default=False, metadata={"help": "ULMFiT-style: heads first, then one more group from the top each epoch."}
    )
    unfreeze_every_n_steps: int | None = field(
        default=None, metadata={"help": "gradual_unfreeze: unfreeze every N steps instead of every epoch."}
    )
    cache_features: bool = field(
        default=False, metadata={"help": "feature_extraction: run the frozen backbone once and train heads on cached features."}
    )
    lora_r: int = field(default=8, metadata={"help": "lora: adapter rank."})
    lora_alpha: int = field(default=16, metadata={"help": "lora: scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout on the adapter input."})
    lora_target_modules: str = field(default="auto", metadata={"help": "lora: 'auto' or a comma-separated list / regex."})
    lora_method: str = field(default="lora", metadata={"help": "peft method: lora | loha | lokr | ia3."})
    adapter_name: str = field(default="default", metadata={"help": "lora: name of the adapter being trained."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: image transforms need the raw dataset columns."}
    )
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available,
        metadata={"help": "Pin batches in page-locked memory (default: only when a CUDA device is present)."},
    )

    def __post_init__(self) -> None:
        check_bn_policy(self.bn)
        if self.bn_recalibration_batches < 1:
            raise ValueError(f"bn_recalibration_batches must be >= 1, got {self.bn_recalibration_batches}.")
        if self.loss_balancing not in BALANCERS:
            raise ValueError(f"Unknown loss_balancing {self.loss_balancing!r}; valid methods: {sorted(BALANCERS)}.")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay} (1.0 means no decay).")
        if self.head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale must be > 0, got {self.head_lr_scale}.")
        _check_transfer_args(self)
        super().__post_init__()

    def adapter_config(self) -> AdapterConfig:
        """The ``lora_*`` fields and ``adapter_name`` as one :class:`~hf_tlmtl.adapters.AdapterConfig`."""
        return AdapterConfig(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            method=self.lora_method,
            adapter_name=self.adapter_name,
        )

    def transfer_config(self) -> TransferConfig:
        """What :func:`hf_tlmtl.transfer.prepare_model` needs from these arguments.

        Example:
            >>> args = MultiTaskTrainingArguments(output_dir="/tmp/x", transfer_strategy="partial", trainable_groups=2)
            >>> args.transfer_config().strategy, args.transfer_config().trainable_groups
            ('partial', 2)
        """
        strategy = self.transfer_strategy
        return TransferConfig(
            strategy=strategy,
            trainable_groups=self.trainable_groups if strategy in ("partial", "truncate") else None,
            trainable_fraction=self.trainable_fraction,
            truncate_stage=self.truncate_stage,
            keep_depth=self.keep_depth,
            bn=self.bn,
            keep_frozen=self.keep_frozen,
            adapter=self.adapter_config() if strategy == "lora" else None,
            cache_features=self.cache_features,
        )


def _check_transfer_args(args: MultiTaskTrainingArguments) -> None:
    """Early, clear errors for options that cannot work together; the transfer part is :class:`TransferConfig`'s."""
    strategy = args.transfer_strategy
    if args.trainable_groups is not None:
        if args.trainable_groups < 0:
            raise ValueError(f"trainable_groups must be >= 0, got {args.trainable_groups}.")
        if strategy not in ("partial", "truncate") and not args.gradual_unfreeze:
            raise ValueError(
                f"trainable_groups is used by transfer_strategy 'partial' / 'truncate' or by gradual_unfreeze, "
                f"not by {strategy!r}; drop it or change the strategy."
            )
    if strategy == "lora":
        if args.lora_method not in METHODS:
            raise ValueError(f"Unknown lora_method {args.lora_method!r}; valid methods: {sorted(METHODS)}.")
        if args.lora_r < 1 or not 0.0 <= args.lora_dropout < 1.0:
            raise ValueError(f"lora_r must be >= 1 and lora_dropout in [0, 1); got {args.lora_r} and {args.lora_dropout}.")
    args.transfer_config()  # the strategy, its options, the BatchNorm policy and the feature cache, checked together
    if args.gradual_unfreeze and strategy in ("feature_extraction", "lora"):
        raise ValueError(
            f"gradual_unfreeze unfreezes backbone groups, which transfer_strategy={strategy!r} keeps frozen; use "
            "transfer_strategy None, 'fine_tune', 'partial' or 'truncate' with it."
        )
    if args.unfreeze_every_n_steps is not None:
        if not args.gradual_unfreeze:
            raise ValueError("unfreeze_every_n_steps needs gradual_unfreeze=True.")
        if args.unfreeze_every_n_steps < 1:
            raise ValueError(f"unfreeze_every_n_steps must be >= 1, got {args.unfreeze_every_n_steps}.")
