"""One entry point that makes a model ready to train: :func:`prepare_model` with a :class:`TransferConfig`.

Strategy, adapters, BatchNorm policy and the feature-cache decision are settled here, once, before any
``Trainer`` exists: the way peft users call ``get_peft_model`` first. :class:`~hf_tlmtl.training.MultiTaskTrainer`
calls it with ``args.transfer_config()`` and never changes the model's structure itself. The function is
idempotent (a model prepared with a config is returned as it is when prepared with it again), so it also
serves as a ``Trainer(model_init=...)``: ``model_init=lambda: prepare_model(build_model(), config)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.utils import logging

from ..adapters.attach import apply_lora
from ..adapters.config import AdapterConfig
from ..backbone.unwrap import is_peft_model, unwrap
from .batch_norm import check_bn_policy, freeze_batch_norm
from .strategies import BN_FROZEN_STRATEGIES, STRATEGIES, apply_transfer_strategy
from .summary import TransferSummary, summarize_trainable

logger = logging.get_logger(__name__)

_PREPARED = "_hf_tlmtl_transfer_config"
"""Attribute of the (unwrapped) model that holds the config it was prepared with (not saved)."""


@dataclass(frozen=True)
class TransferConfig:
    """How a model should train: the transfer strategy and what goes with it, checked when made.

    Args:
        strategy: ``feature_extraction`` | ``fine_tune`` | ``partial`` | ``truncate`` | ``lora`` (see
            :func:`~hf_tlmtl.transfer.apply_transfer_strategy`), or ``None``: leave the model as it is.
        trainable_groups: ``partial`` / ``truncate``: how many top layer groups train.
        trainable_fraction: ``partial`` / ``truncate``, instead: the share of the backbone's parameters that trains.
        truncate_stage: ``truncate``: the ``feature_info`` index of the last stage kept (``None``: drop the top stage).
        keep_depth: ``truncate``, instead: the share of the backbone's depth kept.
        bn: BatchNorm policy: ``train`` | ``frozen`` | ``recalibrate`` (see :mod:`hf_tlmtl.transfer.batch_norm`).
        keep_frozen: ``fine_tune`` / ``partial`` / ``truncate`` keep what an earlier freeze froze.
        adapter: ``lora``: the adapter's settings (default ``AdapterConfig()``); a peft model given to
            :func:`prepare_model` trains its adapter of this name, added if it has none.
        cache_features: ``feature_extraction``: heads train on the frozen backbone's cached features.

    Example:
        >>> TransferConfig(strategy="partial", trainable_fraction=0.25).trainable_fraction
        0.25
        >>> TransferConfig(strategy="feature_extraction", bn="recalibrate")
        Traceback (most recent call last):
        ...
        ValueError: bn='recalibrate' has nothing to re-estimate under feature_extraction (the frozen backbone keeps the source's BatchNorm statistics); use bn='train' or a strategy that trains the backbone.
    """

    strategy: str | None = None
    trainable_groups: int | None = None
    trainable_fraction: float | None = None
    truncate_stage: int | None = None
    keep_depth: float | None = None
    bn: str = "train"
    keep_frozen: bool = False
    adapter: AdapterConfig | None = field(default=None)
    cache_features: bool = False

    def __post_init__(self) -> None:
        strategy = self.strategy
        check_bn_policy(self.bn)
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"Unknown transfer_strategy {strategy!r}; valid strategies: {list(STRATEGIES)} (or None).")
        if self.trainable_groups is not None:
            if self.trainable_groups < 0:
                raise ValueError(f"trainable_groups must be >= 0, got {self.trainable_groups}.")
            if strategy not in ("partial", "truncate"):
                raise ValueError(
                    f"trainable_groups is used by transfer_strategy 'partial' / 'truncate', not by {strategy!r}; "
                    "drop it or change the strategy."
                )
        if strategy == "partial" and self.trainable_groups is None and self.trainable_fraction is None:
            raise ValueError(
                "transfer_strategy='partial' needs trainable_groups (how many top layer groups train) or "
                "trainable_fraction (the share of the backbone's parameters that trains)."
            )
        if self.trainable_fraction is not None:
            if self.trainable_groups is not None:
                raise ValueError("Pass trainable_groups or trainable_fraction, not both.")
            if strategy not in ("partial", "truncate"):
                raise ValueError(f"trainable_fraction is used by transfer_strategy 'partial' / 'truncate', not {strategy!r}.")
            if not 0.0 < self.trainable_fraction <= 1.0:
                raise ValueError(f"trainable_fraction must be in (0, 1], got {self.trainable_fraction}.")
        if self.truncate_stage is not None and strategy != "truncate":
            raise ValueError(f"truncate_stage is used by transfer_strategy='truncate' only, not {strategy!r}.")
        if self.keep_depth is not None:
            if strategy != "truncate" or self.truncate_stage is not None:
                raise ValueError("keep_depth is used by transfer_strategy='truncate' only, instead of truncate_stage.")
            if not 0.0 < self.keep_depth < 1.0:
                raise ValueError(f"keep_depth must be in (0, 1) (share of the backbone's depth kept), got {self.keep_depth}.")
        if self.bn == "recalibrate" and (strategy in BN_FROZEN_STRATEGIES or self.cache_features):
            raise ValueError(
                f"bn='recalibrate' has nothing to re-estimate under {strategy} (the frozen backbone keeps the source's "
                "BatchNorm statistics); use bn='train' or a strategy that trains the backbone."
            )
        if self.adapter is not None and strategy != "lora":
            raise ValueError(f"adapter= is used by transfer_strategy='lora' only, not {strategy!r}.")
        if self.cache_features and strategy != "feature_extraction":
            raise ValueError(
                f"cache_features=True needs transfer_strategy='feature_extraction' (a frozen backbone), got "
                f"{strategy!r}; set transfer_strategy='feature_extraction' or cache_features=False."
            )

    @property
    def changes_model(self) -> bool:
        """Whether :func:`prepare_model` has anything to do (a strategy, or frozen BatchNorm)."""
        return self.strategy is not None or self.bn == "frozen"

    def replace(self, **changes: Any) -> "TransferConfig":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)


def prepare_model(model: nn.Module, config: TransferConfig) -> nn.Module:
    """Make ``model`` train as ``config`` says; returns the model to train (a ``peft.PeftModel`` for ``lora``).

    Freezing, truncation, adapters and the BatchNorm policy are applied in place (``lora`` wraps the model).
    The returned model's ``transfer_summary`` (a :class:`~hf_tlmtl.transfer.TransferSummary`, or ``None`` when
    the config changes nothing) says what trains. Preparing a model again with the same config returns it
    unchanged; a different config applies on top where that is possible (``fine_tune`` after
    ``feature_extraction``; not a second cut).

    A peft model is taken as it is with ``strategy="lora"``: its adapter named ``config.adapter.adapter_name``
    becomes the active, trainable one (added next to the others if it does not exist yet). Any other
    strategy on a peft model is a ``ValueError``: merge the adapters first.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.transfer import TransferConfig, prepare_model
        >>> config = TransferConfig(strategy="truncate", truncate_stage=2, bn="frozen")
        >>> model = prepare_model(TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")]), config)
        >>> model.config.truncate_stage, model.config.bn_policy, model.transfer_summary.strategy
        (2, 'frozen', 'truncate')
        >>> prepare_model(model, config) is model  # idempotent
        True
    """
    if not isinstance(config, TransferConfig):
        raise ValueError(f"config must be a hf_tlmtl.transfer.TransferConfig, got {type(config).__name__}.")
    base = unwrap(model)
    if getattr(base, _PREPARED, None) == config and (config.strategy != "lora" or is_peft_model(model)):
        return model
    model, summary = _apply(model, config)
    setattr(unwrap(model), _PREPARED, config)
    model.transfer_summary = summary
    return model


def _apply(model: nn.Module, config: TransferConfig) -> tuple[nn.Module, TransferSummary | None]:
    strategy = config.strategy
    if strategy is None:
        if config.bn == "frozen":
            freeze_batch_norm(model)
            unwrap(model).config.bn_policy = "frozen"
        return model, None
    adapter = config.adapter or AdapterConfig()
    if is_peft_model(model):
        if strategy != "lora":
            raise ValueError(
                f"The model already carries peft adapters; transfer_strategy={strategy!r} cannot be applied on top. "
                "Use transfer_strategy='lora' or None to train the adapters, or merge them first (merge_and_unload())."
            )
        if adapter.adapter_name in model.peft_config:
            model.set_adapter(adapter.adapter_name)
        else:
            model = apply_lora(model, config=adapter)
        return model, summarize_trainable(model, strategy)
    if strategy == "lora":
        summary = apply_transfer_strategy(model, strategy, bn=config.bn, config=adapter)
    else:
        summary = apply_transfer_strategy(
            model,
            strategy,
            trainable_groups=config.trainable_groups,
            truncate_stage=config.truncate_stage,
            trainable_fraction=config.trainable_fraction,
            keep_depth=config.keep_depth,
            bn=config.bn,
            keep_frozen=config.keep_frozen,
        )
    return summary.model, summary
