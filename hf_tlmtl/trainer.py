"""MultiTaskTrainer: ``transformers.Trainer`` with task-aware losses, logging and optimiser.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.trainer import MultiTaskTrainer, MultiTaskTrainingArguments
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> args = MultiTaskTrainingArguments(output_dir="/tmp/hf_tlmtl_doctest", report_to="none")
    >>> trainer = MultiTaskTrainer(model=model, args=args)
    >>> trainer.args.label_names
    ['y']
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .balancing import BALANCERS, build_balancer


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
    truncate_stage: int | None = field(
        default=None, metadata={"help": "truncate: feature_info index of the last backbone stage kept."}
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
    lora_target_modules: str = field(default="auto", metadata={"help": "lora: 'auto' or a comma-separated list / regex."})
    lora_method: str = field(default="lora", metadata={"help": "peft method: lora | loha | lokr | ia3."})
    adapter_name: str = field(default="default", metadata={"help": "lora: name of the adapter being trained."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: image transforms need the raw dataset columns."}
    )

    def __post_init__(self) -> None:
        if self.loss_balancing not in BALANCERS:
            raise ValueError(f"Unknown loss_balancing {self.loss_balancing!r}; valid methods: {sorted(BALANCERS)}.")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay} (1.0 means no decay).")
        if self.head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale must be > 0, got {self.head_lr_scale}.")
        super().__post_init__()


class MultiTaskTrainer(Trainer):
    """Trainer for :class:`~hf_tlmtl.TimmMultiTaskModel`.

    - ``compute_loss`` combines the task losses with the balancer named by
      ``args.loss_balancing`` and accumulates each task's loss for logging
      (``loss_<task>`` and ``weight_<task>`` next to ``loss``);
    - ``label_names`` default to the model's task names, so evaluation sees the labels.
    """

    def __init__(self, model: Any = None, args: MultiTaskTrainingArguments | None = None, **kwargs: Any):
        if args is None:
            args = MultiTaskTrainingArguments(output_dir="tmp_trainer", report_to="none")
        base_model = _unwrap(model)
        self.tasks = list(base_model.tasks)
        if args.label_names is None:
            args.label_names = [t.name for t in self.tasks]
        self.balancer = build_balancer(args.loss_balancing, self.tasks)
        self._task_loss_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        self._task_loss_counts: dict[str, int] = defaultdict(int)
        super().__init__(model=model, args=args, **kwargs)
        self.balancer.to(self.args.device)

    # --------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        task_losses = outputs.task_losses or {}
        if not task_losses:
            raise ValueError(
                f"The batch has no label for any task; expected columns {[t.name for t in self.tasks]} "
                "(check prepare_dataset / the collator)."
            )
        loss = self.balancer.combine(task_losses)
        if model.training:
            self._record_task_losses(task_losses)
        return (loss, outputs) if return_outputs else loss

    def _record_task_losses(self, task_losses: dict[str, torch.Tensor]) -> None:
        for name, value in task_losses.items():
            self._task_loss_sums[name] = self._task_loss_sums[name].to(value.device) + value.detach().float()
            self._task_loss_counts[name] += 1

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


def _unwrap(model: Any) -> Any:
    """The TimmMultiTaskModel inside a peft / DDP wrapper."""
    while not hasattr(model, "tasks"):
        inner = getattr(model, "module", None) or getattr(model, "base_model", None)
        if inner is None or inner is model:
            inner = getattr(model, "model", None)
        if inner is None:
            raise ValueError(f"MultiTaskTrainer needs a TimmMultiTaskModel, got {type(model).__name__}.")
        model = inner
    return model
