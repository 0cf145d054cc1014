"""MultiTaskTrainer: ``transformers.Trainer`` with task-aware losses, logging and optimiser.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from itertools import islice
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

try:  # transformers >= 5: optimizer factories (Muon, Dion) build their own groups
    from transformers.trainer_optimizer import (
        is_optimizer_factory as _is_optimizer_factory,
    )
except ImportError:  # pragma: no cover - older transformers

    def _is_optimizer_factory(optimizer_cls: Any) -> bool:
        return False

from ..backbone.unwrap import unwrap
from ..data.collator import MultiTaskCollator
from ..data.feature_cache import cache_features
from ..data.preparation import check_worker_picklable
from ..multitask.balancing import build_balancer
from ..multitask.metrics import build_compute_metrics
from ..transfer.batch_norm import (
    recalibrate_batch_norm,
)
from ..transfer.layer_decay import layer_decay_param_groups
from ..transfer.preparation import prepare_model
from ..transfer.summary import TransferSummary
from ..transfer.unfreezing import GradualUnfreezeCallback
from .arguments import MultiTaskTrainingArguments
from .balancer_state import (
    BALANCER_OPTIMIZER_NAME,
    BALANCER_STATE_NAME,
    balancer_param_group,
    load_balancer_optimizer_state,
    load_balancer_state,
    save_balancer_optimizer_state,
    save_balancer_state,
)
from .checks import check_optimizer_settings, last_batch_of_one
from .distributed import check_fsdp_setup, enable_fsdp_on_cpu, full_state_dict


class MultiTaskTrainer(Trainer):
    """Trainer for :class:`~hf_tlmtl.TimmMultiTaskModel`.

    - ``compute_loss`` combines the task losses with the balancer named by
      ``args.loss_balancing`` and accumulates each task's loss for logging
      (``loss_<task>`` and ``weight_<task>`` next to ``loss``);
    - ``label_names`` default to the model's task names, so evaluation sees the labels;
    - ``args.transfer_strategy`` is applied to the model before training
      once, through :func:`~hf_tlmtl.transfer.prepare_model` (``self.transfer_summary`` says what trains);
      the trainer itself never changes the model's structure;
    - ``create_optimizer`` uses ``--optim``'s class on layer-wise LR decay groups
      (:func:`~hf_tlmtl.transfer.layer_decay.layer_decay_param_groups`), without frozen parameters;
    - ``gradual_unfreeze=True`` adds :class:`~hf_tlmtl.transfer.unfreezing.GradualUnfreezeCallback`
      (``self.gradual_unfreeze``);
    - a task with no label in a batch is left out of the balancer (its head gets an exact zero
      gradient); gradient-aggregation balancers (``upgrad``, ``mgda`` ...) replace the backward
      in ``training_step``; learnable balancer parameters are optimised (own group, no weight
      decay; under FSDP2 the group joins after ``prepare`` and its optimizer state has its own
      checkpoint file) and the balancer's state is written into every checkpoint and restored on resume;
    - ``compute_metrics`` defaults to :func:`~hf_tlmtl.multitask.metrics.build_compute_metrics` of the tasks
      (``eval_<task>_<metric>`` and ``eval_score``).
    """

    def __init__(self, model: Any = None, args: MultiTaskTrainingArguments | None = None, **kwargs: Any):
        if args is None:
            args = MultiTaskTrainingArguments(output_dir="tmp_trainer", report_to="none")
        self.args = args
        self.transfer_summary: TransferSummary | None = None
        model_init = kwargs.pop("model_init", None)
        if model is None and model_init is not None:
            # The Trainer builds a fresh model from model_init at every train(): that model is prepared in
            # call_model_init too. The first one gives the tasks the balancer and the metrics are built for.
            self.model_init = model_init
            model = self.call_model_init()
        else:
            model = self._prepared(model)
        base = unwrap(model)
        self.tasks = list(base.tasks)
        transfer = args.transfer_config()
        if model_init is not None and (transfer.cache_features or args.gradual_unfreeze):
            raise ValueError(
                "cache_features and gradual_unfreeze hold the first model's backbone, which model_init replaces at "
                "train(): pass model= instead of model_init= with them."
            )
        if args.label_names is None:
            args.label_names = [t.name for t in self.tasks]
        self.balancer = build_balancer(args.loss_balancing, self.tasks)
        self._task_loss_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        self._task_loss_counts: dict[str, int] = defaultdict(int)
        # Per-epoch task-loss means for balancers that adapt once per epoch (DWA); checkpointed.
        self._epoch_loss_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        self._epoch_loss_counts: dict[str, int] = defaultdict(int)
        self._epochs_closed = 0
        self._task_by_name = {t.name: t for t in self.tasks}
        if "compute_metrics" not in kwargs:
            kwargs["compute_metrics"] = build_compute_metrics(self.tasks, label_names=args.label_names)
        if transfer.cache_features:
            self._use_feature_caches(base, args, kwargs)
        super().__init__(model=model, args=args, **kwargs)
        self.model_init = model_init
        if self.transfer_summary is not None and self.is_world_process_zero():
            logger.info("%s", self.transfer_summary)
        self.gradual_unfreeze: GradualUnfreezeCallback | None = None
        if args.gradual_unfreeze:
            self.gradual_unfreeze = GradualUnfreezeCallback(
                base, max_groups=args.trainable_groups, every_n_steps=args.unfreeze_every_n_steps
            )
            self.add_callback(self.gradual_unfreeze)
        self.balancer.to(self.args.device)
        self.add_callback(_BalancerCallback(self))
        if self.balancer.requires_grad_aggregation:
            self._check_grad_aggregation_setup()
        check_fsdp_setup(self.args, self.balancer, cpu=self.args.device.type == "cpu")
        if args.dataloader_num_workers > 0:
            for what, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
                for split in dataset.values() if isinstance(dataset, dict) else [dataset]:
                    check_worker_picklable(split, what, workers=args.dataloader_num_workers)
        seeded = _seeded_transform(self.train_dataset)
        if seeded is not None:
            self.add_callback(_AugmentationEpochCallback(seeded))
            if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
                logger.warning(
                    "dataloader_persistent_workers keeps the workers' copy of the dataset from the first epoch: the "
                    "per-row augmentation seed does not advance with the epoch (each epoch repeats the first one's crops)."
                )
        self._checked_can_train: str | None | bool = False
        self._bn_recalibrated_at: int | None = None

    def _prepared(self, model: Any) -> Any:
        """``model`` made ready as ``args.transfer_config()`` says (:func:`~hf_tlmtl.transfer.prepare_model`, idempotent)."""
        transfer = self.args.transfer_config()
        if not transfer.changes_model:
            return model
        model = prepare_model(model, transfer)
        self.transfer_summary = model.transfer_summary
        return model

    def call_model_init(self, trial: Any = None) -> Any:
        """``Trainer.call_model_init``, then :func:`~hf_tlmtl.transfer.prepare_model` with the arguments' transfer config.

        So ``model_init`` may return a plain model, or one it prepared itself (preparing again changes nothing).
        """
        model = self._prepared(super().call_model_init(trial))
        tasks = [t.name for t in unwrap(model).tasks]
        if getattr(self, "tasks", None) is not None and tasks != [t.name for t in self.tasks]:
            raise ValueError(
                f"model_init returned a model with tasks {tasks}, but this trainer was built for "
                f"{[t.name for t in self.tasks]}: every model it returns must have the same tasks."
            )
        return model

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; on CPU, a run that asks for FSDP2 gets it (accelerate alone would run DDP)."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``; under FSDP the full model is gathered from the shards by
        :func:`hf_tlmtl.training.distributed.full_state_dict` and written by the main process as one
        ``model.safetensors``: always for the model saved from outside the Trainer (the final one), and for
        checkpoints with ``FULL_STATE_DICT`` (``SHARDED_STATE_DICT`` checkpoints keep the Trainer's shards).
        With ``bn='recalibrate'`` :meth:`recalibrate_batch_norm` runs first (under FSDP on every process: it gathers)."""
        self.recalibrate_batch_norm()
        if not self.is_fsdp_enabled:
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        full = "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        if _internal_call and not full:
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        state_dict = full_state_dict(self.accelerator, self.model)  # a collective: every process takes part
        self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ------------------------------------------------------------------ checks before training
    def check_can_train(self) -> str | None:
        """Checks that would otherwise fail only inside ``train()``, after output folders were touched.

        - The optimizer (``--optim`` with its learning rate, betas, epsilon, weight decay) and the LR
          scheduler are built once on a dummy parameter: ``ValueError`` for settings they refuse.
        - BatchNorm that trains cannot normalise one value per channel: when a layer of the backbone sees
          1x1 feature maps at the model's input size, ``per_device_train_batch_size=1`` is a ``ValueError``
          and a last partial batch of one image is dropped (``dataloader_drop_last``; the returned note
          says so).

        Runs once (``train()`` calls it too); returns a note on what was adjusted, or None.
        """
        if self._checked_can_train is not False:
            return self._checked_can_train or None
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        if not (_is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)):
            check_optimizer_settings(self.args, optimizer_cls, optimizer_kwargs)  # else it builds its own groups
        note = None
        if not self.args.cache_features:
            note = last_batch_of_one(self.model, self.args, self.train_dataset)
        if note is not None:
            self.args.dataloader_drop_last = True
            logger.warning(note)
        self._checked_can_train = note
        return note

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train`` after :meth:`check_can_train`."""
        self.check_can_train()
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ BatchNorm recalibration
    def recalibrate_batch_norm(self) -> int:
        """``bn='recalibrate'``: re-estimate the backbone's BatchNorm statistics on the training data.

        One pass, in order, over at most ``bn_recalibration_batches`` batches of
        ``per_device_eval_batch_size`` training rows, with the training transform
        (:func:`hf_tlmtl.transfer.batch_norm.recalibrate_batch_norm`). Every process reads the same rows, so the
        statistics agree across processes; the random state is restored afterwards, so training (and
        an exact resume) draws what it would have drawn. Runs before :meth:`evaluate` and
        :meth:`save_model` (checkpoints included), once per training step. Returns the images seen.
        """
        if self.args.bn != "recalibrate" or self.train_dataset is None:
            return 0
        step = self.state.global_step
        if self._bn_recalibrated_at == step:
            return 0
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_eval_batch_size,
            shuffle=False,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            seen = recalibrate_batch_norm(
                self.model, islice(loader, self.args.bn_recalibration_batches), autocast=self.autocast_smart_context_manager
            )
        self._bn_recalibrated_at = step
        logger.info("bn='recalibrate': BatchNorm statistics re-estimated on %d training images (step %d).", seen, step)
        return seen

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, after :meth:`recalibrate_batch_norm` with ``bn='recalibrate'``."""
        self.recalibrate_batch_norm()
        return super().evaluate(*args, **kwargs)


    @staticmethod
    def _use_feature_caches(base: Any, args: MultiTaskTrainingArguments, kwargs: dict[str, Any]) -> None:
        """``cache_features``: replace ``train_dataset`` / ``eval_dataset`` in ``kwargs`` by their feature caches.

        The frozen backbone runs once per dataset (eval transform, no augmentation) through
        :func:`hf_tlmtl.data.cache_features`; heads then train on ``model(features=...)``. Datasets may
        be raw splits or :func:`~hf_tlmtl.data.prepare_dataset` outputs (their image column and labelled
        tasks are kept). The cache lives in the ``datasets`` cache and is reused while backbone
        weights, data and transform are unchanged.
        """
        def cached(dataset: Any) -> Any:
            return cache_features(base, dataset, batch_size=args.per_device_eval_batch_size, device=args.device)

        for key in ("train_dataset", "eval_dataset"):
            dataset = kwargs.get(key)
            if isinstance(dataset, dict):
                kwargs[key] = {name: cached(split) for name, split in dataset.items()}
            elif dataset is not None:
                kwargs[key] = cached(dataset)
        kwargs.setdefault("data_collator", MultiTaskCollator(base.tasks))

    # --------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The balancer's loss of the tasks labelled in the batch (the model's own weighted loss for ``static``).

        The model decides which tasks are labelled (``outputs.labelled_tasks``); a task without labels in the
        batch is left out of the balancer, and its exact-zero loss keeps its head in the graph (zero gradient,
        and DDP still sees every parameter used).
        """
        outputs = model(**inputs)
        present, absent = self._split_by_presence(outputs)
        if self.balancer.is_static:
            loss = outputs.loss  # the TaskSpec-weighted sum: the same number the static balancer would give
        else:
            loss = self.balancer.combine(present) if present else 0.0
            for zero in absent.values():
                loss = loss + zero
        if model.training:
            self._record_task_losses(present)
        return (loss, outputs) if return_outputs else loss

    def _split_by_presence(self, outputs: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Task losses of the tasks with at least one label in the batch (as the model found), and of the others."""
        task_losses = outputs.task_losses or {}
        if not task_losses:
            raise ValueError(
                f"The batch has no label for any task; expected columns {[t.name for t in self.tasks]} "
                "(check prepare_dataset / the collator)."
            )
        labelled = set(outputs.labelled_tasks)
        present = {name: loss for name, loss in task_losses.items() if name in labelled}
        absent = {name: loss for name, loss in task_losses.items() if name not in labelled}
        return present, absent

    def _record_task_losses(self, task_losses: dict[str, torch.Tensor]) -> None:
        for name, value in task_losses.items():
            self._task_loss_sums[name] = self._task_loss_sums[name].to(value.device) + value.detach().float()
            self._task_loss_counts[name] += 1
            self._epoch_loss_sums[name] = self._epoch_loss_sums[name].to(value.device) + value.detach().float()
            self._epoch_loss_counts[name] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each task's mean training loss since the last log, and the current task weights."""
        if "loss" in logs and self._task_loss_counts:
            for name, total in self._task_loss_sums.items():
                logs[f"loss_{name}"] = round(float(total) / max(self._task_loss_counts[name], 1), 4)
            for name, weight in self.balancer.weights().items():
                logs[f"weight_{name}"] = round(float(weight), 4)
            self._task_loss_sums.clear()
            self._task_loss_counts.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ gradient aggregation
    def _check_grad_aggregation_setup(self) -> None:
        method = self.args.loss_balancing
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            # Under DDP each process would aggregate its own batch's Jacobian and DDP would then average the
            # aggregates (not the aggregate of the mean); under FSDP each process holds a shard of the
            # backbone, so torchjd would see the Jacobian of a slice of the shared parameters only.
            raise ValueError(
                f"loss_balancing={method!r} aggregates per-task gradients with torchjd in one process; it does not "
                f"run under distributed (DDP or FSDP) or multi-GPU training (world_size={self.args.world_size}, "
                f"n_gpu={self.args.n_gpu}). Train on one process and one device, or use "
                "loss_balancing='static', 'uncertainty' or 'dwa' ('uncertainty' with FSDP2 only)."
            )
        if self.args.fp16:
            raise ValueError(
                f"loss_balancing={method!r} back-propagates through torchjd, outside fp16 loss scaling: use bf16=True "
                "or full precision instead of fp16=True."
            )

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """``Trainer.training_step``; with a gradient-aggregation balancer (``upgrad``, ``mgda`` ...)
        the backward is torchjd's: one backward per present task for the shared backbone (the
        Jacobian, aggregated into one gradient), each head its own task's gradient. Heads of
        absent tasks get an exact zero gradient. Losses are scaled by ``1 / accumulation steps``."""
        if not self.balancer.requires_grad_aggregation:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
            present, _ = self._split_by_presence(outputs)
        self._record_task_losses(present)
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        base = unwrap(model)
        self.balancer.backward(present, features=outputs.pooled, shared_params=base.backbone.parameters(), scale=scale)
        for head in base.heads.values():
            for param in head.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
        if not present:
            return torch.zeros((), device=self.args.device)
        return (self.balancer.combine(present) * scale).detach()

    # ------------------------------------------------------------------ balancer parameters and state
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the balancer's learnable parameters (uncertainty log-variances);
        under FSDP those join in :meth:`create_scheduler` instead."""
        optimizer = self._create_layer_decay_optimizer(model)
        if not self.is_fsdp_enabled:
            self._add_balancer_params(optimizer)
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """``Trainer.create_scheduler``; under FSDP the balancer's parameters join the optimizer here first.

        accelerate's FSDP2 ``prepare`` swaps every parameter the optimizer holds for the model's sharded
        one, found by name in the model, and fails on any other (a ``KeyError``). The Trainer calls this
        right after that ``prepare`` and before it builds the scheduler: the balancer's group joins then,
        and the scheduler scales its learning rate as it does without FSDP.
        """
        if self.is_fsdp_enabled:
            self._add_balancer_params(optimizer if optimizer is not None else self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def _create_layer_decay_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """``--optim``'s optimizer class on :func:`~hf_tlmtl.transfer.layer_decay.layer_decay_param_groups`.

        Backbone layers get ``learning_rate * layer_decay ** (num_layers - layer_id)`` (all
        ``learning_rate`` without ``layer_decay``), heads ``learning_rate * head_lr_scale``; frozen
        parameters are left out, except those gradual unfreezing will unfreeze: they are in from
        the start (see :mod:`hf_tlmtl.transfer.unfreezing`).
        """
        if self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if _is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            if self.gradual_unfreeze is not None:
                raise ValueError(
                    f"optim={self.args.optim!r} builds its own parameter groups, so gradual_unfreeze cannot put the "
                    "groups it unfreezes later in the optimizer; use an AdamW/SGD-style --optim or gradual_unfreeze=False."
                )
            logger.warning(
                "optim=%r builds its own parameter groups: layer_decay and head_lr_scale are not applied.", self.args.optim
            )
            return super().create_optimizer(model)
        scheduled = self.gradual_unfreeze.scheduled_trainable() if self.gradual_unfreeze else contextlib.nullcontext()
        with scheduled:
            groups = layer_decay_param_groups(
                opt_model,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                layer_decay=self.args.layer_decay,
                head_lr_scale=self.args.head_lr_scale,
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _add_balancer_params(self, optimizer: torch.optim.Optimizer) -> None:
        """Adds learnable balancer parameters as their own group (no weight decay), once."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self.balancer.parameters() if p.requires_grad and id(p) not in held]
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})

    @contextlib.contextmanager
    def _without_balancer_group(self) -> Any:
        """The optimizer without the balancer's group and its state while the block runs, under FSDP.

        torch's distributed optimizer state dict (what accelerate saves and loads for FSDP) names every
        parameter of the optimizer by its name in the model, and fails on the balancer's. Loading
        replaces the optimizer's ``state`` and ``param_groups``: the group and its state go back into
        the new ones.
        """
        optimizer = self.optimizer
        group = balancer_param_group(self.balancer, optimizer) if self.is_fsdp_enabled and optimizer is not None else None
        if group is None:
            yield
            return
        index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
        state = {p: optimizer.state.pop(p) for p in group["params"] if p in optimizer.state}
        del optimizer.param_groups[index]
        try:
            yield
        finally:
            optimizer.param_groups.insert(index, group)
            optimizer.state.update(state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """``Trainer._save_optimizer_and_scheduler``; under FSDP the balancer's optimizer state goes to its own
        file (:func:`~hf_tlmtl.training.balancer_state.save_balancer_optimizer_state`), outside FSDP's (sharded) one."""
        with self._without_balancer_group():
            super()._save_optimizer_and_scheduler(output_dir)
        if self.is_fsdp_enabled and self.args.should_save:
            save_balancer_optimizer_state(self.balancer, self.optimizer, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``Trainer._load_optimizer_and_scheduler``; under FSDP the balancer's optimizer state comes from its
        own file."""
        with self._without_balancer_group():
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.is_fsdp_enabled or balancer_param_group(self.balancer, self.optimizer) is None:
            return
        if not load_balancer_optimizer_state(self.balancer, self.optimizer, checkpoint):
            logger.warning(
                f"{checkpoint} has no {BALANCER_OPTIMIZER_NAME}: the optimizer state of loss_balancing="
                f"{self.args.loss_balancing!r} starts fresh (its parameters are restored)."
            )

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Also writes the balancer's state (``balancer.safetensors`` + ``balancer_state.json``), last.

        ``balancer_state.json`` is the checkpoint's last file, written atomically: a checkpoint is complete when it
        is there (:func:`hf_tlmtl.training.output_dir.complete_checkpoints`). ``save_total_limit`` removes older
        checkpoints only after that, so a run killed while writing one still has the previous one to resume from.
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer would rotate before the balancer state is written
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            epoch_losses = {
                name: [float(total), self._epoch_loss_counts[name]] for name, total in self._epoch_loss_sums.items()
            }
            extra = {"epoch": self.state.epoch, "epochs_closed": self._epochs_closed, "epoch_task_losses": epoch_losses}
            save_balancer_state(self.balancer, folder, extra=extra)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Restores the balancer in place (its parameters stay the ones the optimizer holds)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = load_balancer_state(self.balancer, resume_from_checkpoint)
        if state is None:
            raise ValueError(
                f"{resume_from_checkpoint} is incomplete: it has no {BALANCER_STATE_NAME}, which a MultiTaskTrainer "
                "checkpoint gets last (the run stopped while writing it, or another trainer wrote it). Resume from the "
                "checkpoint before it, which is kept until a newer one is complete."
            )
        self._epoch_loss_sums.clear()
        self._epoch_loss_counts.clear()
        for name, (total, count) in state.get("epoch_task_losses", {}).items():
            self._epoch_loss_sums[name] = torch.tensor(float(total))
            self._epoch_loss_counts[name] = int(count)
        self._epochs_closed = int(state.get("epochs_closed", 0))
        epoch = state.get("epoch") or 0.0
        # Saved on an epoch's last step, before that epoch ended: the resumed run starts the next
        # epoch, so close this one now.
        if abs(epoch - round(epoch)) < 1e-6 and round(epoch) > self._epochs_closed:
            self._end_balancer_epoch()

    def _sync_balancer_grads(self) -> None:
        """Under DDP and FSDP the balancer sits outside the wrapped model: average its gradients over the
        processes as DDP does for the model (a process without the task contributes zero)."""
        if self.args.world_size <= 1:
            return
        for param in self.balancer.parameters():
            if not param.requires_grad:
                continue
            has_grad = torch.tensor(float(param.grad is not None), device=param.device)
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            grad = self.accelerator.reduce(grad, reduction="sum")
            if float(self.accelerator.reduce(has_grad, reduction="sum")) > 0:
                param.grad = grad / self.args.world_size

    def _end_balancer_epoch(self) -> None:
        """Feeds the epoch's mean training loss of each task (over all processes) to the balancer."""
        names = [t.name for t in self.tasks]
        sums = torch.tensor([float(self._epoch_loss_sums.get(n, 0.0)) for n in names], device=self.args.device)
        counts = torch.tensor([float(self._epoch_loss_counts.get(n, 0)) for n in names], device=self.args.device)
        if self.args.world_size > 1:
            sums, counts = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(counts, "sum")
        means = {n: float(s / c) for n, s, c in zip(names, sums.tolist(), counts.tolist()) if c > 0}
        self.balancer.on_epoch_end(means)
        self._epoch_loss_sums.clear()
        self._epoch_loss_counts.clear()
        self._epochs_closed += 1


class _BalancerCallback(TrainerCallback):
    """Averages the balancer's gradients over processes before each optimizer step, clears them
    after it (the Trainer only zeroes the model's) and closes each epoch for it (DWA adapts its weights from the epoch's mean task losses)."""

    def __init__(self, trainer: MultiTaskTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._sync_balancer_grads()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.balancer.zero_grad(set_to_none=True)

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._end_balancer_epoch()


class _AugmentationEpochCallback(TrainerCallback):
    """Tells a seeded training transform (``prepare_dataset(..., seed=)``) which epoch is starting.

    The Trainer's ``state.epoch`` is the fraction of epochs done: at an epoch's start it is a whole
    number, or the checkpoint's fraction in the epoch a resumed run continues.
    """

    def __init__(self, transform: Any):
        self.transform = transform

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.transform.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


def _seeded_transform(dataset: Any) -> Any:
    """The seeded ``prepare_dataset`` transform of ``dataset``, or None."""
    format_ = getattr(dataset, "format", None)
    transform = (format_ or {}).get("format_kwargs", {}).get("transform") if isinstance(format_, dict) else None
    return transform if getattr(transform, "seed", None) is not None and hasattr(transform, "set_epoch") else None
