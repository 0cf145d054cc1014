"""Trainer callbacks: ULMFiT-style gradual unfreezing.

How it stays exact across ``resume_from_checkpoint``:

- Every parameter the schedule will ever unfreeze is in the optimizer from the start, with its
  layer-wise learning rate (:meth:`GradualUnfreezeCallback.scheduled_trainable` is held while the
  trainer builds the optimizer). Until its group is unfrozen it has ``requires_grad=False``, so its
  gradient stays ``None`` and the optimizer skips it (no update, no weight decay, no state). The
  parameter groups are therefore identical in a fresh and in a resumed run, which is what loading a
  checkpoint's optimizer state requires, and the LR scheduler covers every group from step 0.
- How many groups are unfrozen is a function of the trainer state alone (``floor(state.epoch)``, or
  ``state.global_step // every_n_steps``), re-applied at train, epoch and step begin: a resumed run
  re-establishes the trainable set from the restored state.
- BatchNorm layers of groups still frozen run in eval mode (a forward pre-hook switches them), so
  their running statistics do not move and they normalise with those statistics, as a frozen
  network would. Once the group is unfrozen they train normally. (``FrozenBatchNorm2d``, used by the
  ``feature_extraction`` and ``partial`` strategies, is not used here: it turns the affine weights into
  buffers, which could not join the optimizer later.)

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.transfer.unfreezing import GradualUnfreezeCallback
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> callback = GradualUnfreezeCallback(model)
    >>> callback.schedule_names, callback.unfrozen_names
    (['layer4.0', 'layer3.0', 'layer2.0', 'layer1.0', 'conv1+bn1'], [])
    >>> callback.set_num_unfrozen(2); callback.unfrozen_names
    ['layer4.0', 'layer3.0']
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging

from ..backbone.anatomy import backbone_groups, freeze_groups
from ..backbone.unwrap import unwrap

logger = logging.get_logger(__name__)


@dataclass
class _ScheduledGroup:
    name: str
    params: list[nn.Parameter]
    batch_norms: list[nn.Module]


class GradualUnfreezeCallback(TrainerCallback):
    """Heads first, then one more backbone layer group from the top each epoch (or every N steps).

    The schedule covers the backbone groups that are trainable when the callback is created (all of
    them for ``fine_tune``; the top ``trainable_groups`` after ``partial`` / ``truncate``), top first,
    at most ``max_groups`` (groups past the cap are frozen for good). Creating the callback freezes the
    scheduled groups; :class:`~hf_tlmtl.training.MultiTaskTrainer` does this when ``gradual_unfreeze=True``.

    Args:
        model: The :class:`~hf_tlmtl.TimmMultiTaskModel` being trained.
        max_groups: Unfreeze at most this many groups (``None``: all scheduled groups).
        every_n_steps: Unfreeze one more group every N optimizer steps instead of every epoch.
    """

    def __init__(self, model: nn.Module, max_groups: int | None = None, every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 (or None for once per epoch), got {every_n_steps}.")
        if max_groups is not None and max_groups < 0:
            raise ValueError(f"max_groups must be >= 0, got {max_groups}.")
        base = unwrap(model)
        params = dict(base.backbone.named_parameters())
        trainable_groups = [
            g for g in reversed(backbone_groups(base)) if any(params[n].requires_grad for n in g.names if n in params)
        ]
        if max_groups is not None and len(trainable_groups) > max_groups:
            # Groups past the cap never train: freeze them for good (BatchNorm -> FrozenBatchNorm2d).
            freeze_groups(base, trainable_groups[max_groups:])
            trainable_groups = trainable_groups[:max_groups]
        modules = dict(base.backbone.named_modules())
        self.schedule: list[_ScheduledGroup] = []
        for group in trainable_groups:
            owners = {n.rpartition(".")[0] for n in group.names if "." in n}
            norms = [modules[o] for o in sorted(owners) if isinstance(modules.get(o), nn.modules.batchnorm._BatchNorm)]
            trainable = [params[n] for n in group.names if n in params and params[n].requires_grad]
            self.schedule.append(_ScheduledGroup(group.name, trainable, norms))
        self.every_n_steps = every_n_steps
        self.num_unfrozen = -1
        self._frozen_norms: set[int] = set()
        for group in self.schedule:
            for norm in group.batch_norms:
                norm.register_forward_pre_hook(self._keep_frozen_norm_in_eval)
        self.set_num_unfrozen(0)

    # ------------------------------------------------------------------------------ state
    @property
    def schedule_names(self) -> list[str]:
        """Group names in unfreezing order (top first)."""
        return [g.name for g in self.schedule]

    @property
    def unfrozen_names(self) -> list[str]:
        return self.schedule_names[: self.num_unfrozen]

    def num_unfrozen_at(self, state: TrainerState) -> int:
        """Groups unfrozen at this point of training: a function of the trainer state only."""
        if self.every_n_steps:
            count = state.global_step // self.every_n_steps
        else:
            count = math.floor((state.epoch or 0.0) + 1e-6)
        return min(count, len(self.schedule))

    def set_num_unfrozen(self, count: int) -> None:
        """Top ``count`` scheduled groups train; the others are frozen (BatchNorm in eval mode)."""
        if count == self.num_unfrozen:
            return
        self._frozen_norms.clear()
        for index, group in enumerate(self.schedule):
            trainable = index < count
            for param in group.params:
                param.requires_grad_(trainable)
                if not trainable:
                    param.grad = None
            if not trainable:
                self._frozen_norms.update(id(norm) for norm in group.batch_norms)
        if self.num_unfrozen >= 0:
            logger.info("Gradual unfreezing: %d/%d groups train: %s", count, len(self.schedule), self.unfrozen_names)
        self.num_unfrozen = count

    def _keep_frozen_norm_in_eval(self, module: nn.Module, args: Any) -> None:
        if id(module) in self._frozen_norms:
            module.train(False)

    @contextlib.contextmanager
    def scheduled_trainable(self) -> Iterator[None]:
        """Every scheduled parameter counts as trainable inside the block (to build the optimizer)."""
        before = [(p, p.requires_grad) for g in self.schedule for p in g.params]
        for param, _ in before:
            param.requires_grad_(True)
        try:
            yield
        finally:
            for param, flag in before:
                param.requires_grad_(flag)

    # -------------------------------------------------------------------------- events
    def _sync(self, state: TrainerState) -> None:
        self.set_num_unfrozen(self.num_unfrozen_at(state))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._sync(state)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._sync(state)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._sync(state)
