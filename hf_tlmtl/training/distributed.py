"""Training past one process: FSDP2 wrap units from timm's blocks, FSDP2 on CPU, what FSDP refuses.

- The wrap units are the timm classes of :func:`hf_tlmtl.backbone.block_class_names` (the model's
  ``_no_split_modules``): accelerate's ``transformer_based_wrap`` and the Trainer's ``--fsdp auto_wrap``
  shard each of them on its own, then the whole model.
- :func:`enable_fsdp_on_cpu`: accelerate 1.x turns FSDP on for accelerator devices only; on CPU a
  ``--use_fsdp`` / ``--fsdp`` run silently becomes DDP (``MULTI_CPU``). torch's FSDP2 (``fully_shard``)
  runs on CPU with gloo, so the Trainer's accelerator is switched to it (CPU only; on GPUs accelerate
  decides as usual).
- :func:`check_fsdp_setup`: the combinations that cannot be correct under sharding, refused early.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.backbone import block_class_names
    >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> block_class_names(m.backbone), sorted(m._no_split_modules)
    (['BasicBlock', 'Bottleneck'], ['BasicBlock', 'Bottleneck'])
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.tensor import DTensor


def fsdp_requested(args: Any) -> bool:
    """Whether this run asks for FSDP: the Trainer's ``--fsdp`` or ``accelerate launch --use_fsdp``."""
    if getattr(args, "fsdp_plugin_args", None) is not None:
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version(args: Any) -> int:
    """The FSDP version asked for: the Trainer's (``fsdp_config['version']``, default 2) or accelerate's
    (``accelerate launch --fsdp_version``, default 1)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    return int(plugin_args.get("fsdp_version") or os.environ.get("FSDP_VERSION", "1"))


def enable_fsdp_on_cpu(accelerator: Any, args: Any) -> bool:
    """Switch a CPU (``MULTI_CPU``, gloo) accelerator whose run asked for FSDP2 to accelerate's FSDP2 path.

    accelerate sets ``DistributedType.FSDP`` only on accelerator devices; its FSDP2 preparation
    (``fully_shard`` per wrap unit, DTensor parameters, sharded / full state dicts) itself works on
    CPU. Returns whether it switched; does nothing on GPUs or without an FSDP request.
    """

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(args):
        return False
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Every later AcceleratorState() copies PartialState's shared fields over its own: switch both.
    PartialState().distributed_type = DistributedType.FSDP
    return True


def check_fsdp_setup(args: Any, balancer: Any, cpu: bool) -> None:
    """``ValueError`` for FSDP runs that cannot train correctly, each naming what to change.

    - FSDP1 on CPU: only FSDP2 (``fully_shard``) runs there.
    - Learnable balancer parameters (``uncertainty``) with FSDP1: they live outside the model; the trainer
      fits them around FSDP2's optimizer mapping and sharded optimizer checkpoints (see
      ``MultiTaskTrainer.create_scheduler``), not around FSDP1's (untested: it runs on GPUs only).
    - Gradient aggregation (torchjd: ``upgrad``, ``mgda`` ...) is refused by the trainer for every
      multi-process run (each process would aggregate its own shard's Jacobian).

    Every transfer strategy is accepted, ``lora`` (any ``lora_method``) included: its sharded checkpoints hold
    the adapter and heads, and :func:`hf_tlmtl.training.final_model.save_final_model` saves the adapter and the
    merged model from a one-process copy of the gathered weights (:func:`full_state_dict`, :func:`hf_tlmtl.adapters.unsharded_copy`).
    ``bn='recalibrate'`` runs its statistics pass through the sharded model on every process.
    """
    if not fsdp_requested(args):
        return
    if cpu and fsdp_version(args) != 2:
        raise ValueError(
            "FSDP on CPU runs with FSDP2 (torch's fully_shard) only: use `--fsdp true` without fsdp_config "
            "'version': 1 (FSDP2 is the Trainer's default), `accelerate launch --use_fsdp --fsdp_version 2`, or "
            "`accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml`."
        )
    if fsdp_version(args) != 2 and any(p.requires_grad for p in balancer.parameters()):
        raise ValueError(
            f"loss_balancing={args.loss_balancing!r} learns its task weights as parameters outside the model, which "
            "hf_tlmtl supports with FSDP2 only: use `accelerate launch --fsdp_version 2` (or "
            "recipes/configs/accelerate/fsdp2.yaml), loss_balancing 'static' or 'dwa' with FSDP1, or DDP "
            "(`accelerate launch --multi_gpu`)."
        )


def describe_sharding(trainer: Any) -> str | None:
    """One line on how an FSDP trainer shards the model (None without FSDP).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> describe_sharding(MultiTaskTrainer(model=m, args=MultiTaskTrainingArguments("/tmp/d", report_to="none"))) is None
        True
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    plugin = trainer.accelerator.state.fsdp_plugin
    units = sorted(getattr(trainer.model, "_no_split_modules", None) or [])
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    wrap = f"one unit per {', '.join(units)} block" if units and policy is not None else "the model as one unit"
    state_dict = str(plugin.state_dict_type).rsplit(".", 1)[-1]
    return (f"FSDP{plugin.fsdp_version} over {trainer.args.world_size} processes, {wrap}; checkpoints {state_dict}, "
            "final model one model.safetensors")


def full_state_dict(accelerator: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on CPU, in every process: FSDP2's sharded parameters gathered (a collective).

    Not ``accelerator.get_state_dict``: on CPU its FSDP2 path returns tensors whose storage FSDP frees
    again (``cpu_offload`` copies nothing when the weights already are on CPU), and safetensors then
    fails with "invalid python storage". Each shard is gathered here and copied.
    """

    if not getattr(accelerator, "is_fsdp2", False):
        return accelerator.get_state_dict(model, unwrap=True)
    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()
        for name, tensor in model.state_dict().items()
    }


__all__ = ["check_fsdp_setup", "describe_sharding", "enable_fsdp_on_cpu", "fsdp_requested", "fsdp_version", "full_state_dict"]
