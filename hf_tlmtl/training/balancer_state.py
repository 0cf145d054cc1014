"""A loss balancer's state in Trainer checkpoints: ``balancer.safetensors`` + ``balancer_state.json``, and
under FSDP its optimizer state in ``balancer_optimizer.safetensors`` (tensors and JSON metadata, no pickle).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..multitask.balancing import LossBalancer

BALANCER_WEIGHTS_NAME = "balancer.safetensors"
"""File in a checkpoint folder holding the balancer's tensors (e.g. uncertainty log-variances)."""


BALANCER_STATE_NAME = "balancer_state.json"
"""File in a checkpoint folder holding the balancer's non-tensor state (e.g. DWA loss history)."""


BALANCER_OPTIMIZER_NAME = "balancer_optimizer.safetensors"
"""File in an FSDP checkpoint folder holding the optimizer's state for the balancer's parameters (its
tensors; the group's hyperparameters and non-tensor state in the file's metadata). Without FSDP that state
is in the Trainer's own optimizer file."""


def save_balancer_state(balancer: LossBalancer, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the balancer's tensors (safetensors) and other state (JSON) into a checkpoint folder.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec
        >>> from hf_tlmtl.multitask.balancing import build_balancer
        >>> b = build_balancer("uncertainty", [TaskSpec(name="y", type="regression")])
        >>> d = tempfile.mkdtemp(); save_balancer_state(b, d)
        >>> sorted(os.listdir(d))
        ['balancer.safetensors', 'balancer_state.json']
    """

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in balancer.state_dict().items()}
    if tensors:
        save_file(tensors, os.path.join(directory, BALANCER_WEIGHTS_NAME))
    state = {"method": balancer.name, "tasks": balancer.task_names, "state": balancer.json_state(), **(extra or {})}
    # Written whole or not at all (a temporary file renamed): its presence marks a checkpoint complete.
    path = os.path.join(directory, BALANCER_STATE_NAME)
    with open(f"{path}.tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(f"{path}.tmp", path)


def load_balancer_state(balancer: LossBalancer, directory: str | os.PathLike) -> dict[str, Any] | None:
    """Restore what :func:`save_balancer_state` wrote (in place: parameters keep their identity,
    so an optimizer holding them stays valid). Returns the saved JSON, or ``None`` when the
    folder has no balancer state.

    Raises ``ValueError`` when the checkpoint was written by another method or other tasks.

    Example:
        >>> import tempfile, torch
        >>> from hf_tlmtl import TaskSpec
        >>> from hf_tlmtl.multitask.balancing import build_balancer
        >>> b = build_balancer("uncertainty", [TaskSpec(name="y", type="regression")])
        >>> with torch.no_grad(): _ = b.log_vars["y"].fill_(0.3)
        >>> d = tempfile.mkdtemp(); save_balancer_state(b, d)
        >>> b2 = build_balancer("uncertainty", [TaskSpec(name="y", type="regression")])
        >>> _ = load_balancer_state(b2, d); round(b2.log_vars["y"].item(), 4)
        0.3
    """

    state_file = os.path.join(directory, BALANCER_STATE_NAME)
    if not os.path.isfile(state_file):
        return None
    with open(state_file) as f:
        state = json.load(f)
    if state.get("method") != balancer.name:
        raise ValueError(
            f"Checkpoint {directory} was trained with loss_balancing={state.get('method')!r}, but "
            f"{balancer.name!r} is configured: resume with loss_balancing={state.get('method')!r}, or start "
            "a new run (without resume_from_checkpoint) to change the method."
        )
    if state.get("tasks") != balancer.task_names:
        raise ValueError(
            f"Checkpoint {directory} has balancer state for tasks {state.get('tasks')}, but the model's tasks "
            f"are {balancer.task_names}: resume with the same tasks, or start a new run."
        )
    weights_file = os.path.join(directory, BALANCER_WEIGHTS_NAME)
    if os.path.isfile(weights_file):
        device = next((t.device for t in balancer.state_dict().values()), torch.device("cpu"))
        balancer.load_state_dict(load_file(weights_file, device=str(device)))
    balancer.load_json_state(state.get("state", {}))
    return state


def balancer_param_group(balancer: LossBalancer, optimizer: Any) -> dict[str, Any] | None:
    """The optimizer's parameter group that holds the balancer's parameters (None when none does).

    Example:
        >>> from hf_tlmtl import TaskSpec
        >>> from hf_tlmtl.multitask.balancing import build_balancer
        >>> b = build_balancer("uncertainty", [TaskSpec(name="y", type="regression")])
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> balancer_param_group(b, opt) is None
        True
        >>> opt.add_param_group({"params": list(b.parameters()), "weight_decay": 0.0})
        >>> balancer_param_group(b, opt) is opt.param_groups[1]
        True
    """
    ids = {id(p) for p in balancer.parameters()}
    return next((g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])), None)


def _parameters_in(balancer: LossBalancer, group: dict[str, Any]) -> list[tuple[str, torch.nn.Parameter]]:
    """The balancer's named parameters that the optimizer ``group`` holds."""
    held = {id(p) for p in group["params"]}
    return [(name, param) for name, param in balancer.named_parameters() if id(param) in held]


def save_balancer_optimizer_state(balancer: LossBalancer, optimizer: Any, directory: str | os.PathLike) -> None:
    """Write the optimizer's state for the balancer's parameters (``BALANCER_OPTIMIZER_NAME``).

    For runs whose optimizer checkpoint cannot hold parameters outside the model (FSDP's sharded
    optimizer state): tensors (Adam's moments and step) under ``<parameter>/<key>``; the group's
    hyperparameters (``lr``, ``betas`` ...) and any non-tensor state in the metadata, as JSON.
    Nothing is written when the optimizer holds no balancer parameter.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec
        >>> from hf_tlmtl.multitask.balancing import build_balancer
        >>> b = build_balancer("uncertainty", [TaskSpec(name="y", type="regression")])
        >>> opt = torch.optim.AdamW([{"params": list(b.parameters()), "weight_decay": 0.0}], lr=0.1)
        >>> b.combine({"y": torch.tensor(2.0)}).backward(); opt.step()
        >>> d = tempfile.mkdtemp(); save_balancer_optimizer_state(b, opt, d)
        >>> b2 = build_balancer("uncertainty", [TaskSpec(name="y", type="regression")])
        >>> opt2 = torch.optim.AdamW([{"params": list(b2.parameters()), "weight_decay": 0.0}], lr=0.5)
        >>> load_balancer_optimizer_state(b2, opt2, d), opt2.param_groups[0]["lr"]
        (True, 0.1)
        >>> torch.equal(opt2.state[b2.log_vars["y"]]["exp_avg"], opt.state[b.log_vars["y"]]["exp_avg"])
        True
    """

    group = balancer_param_group(balancer, optimizer)
    if group is None:
        return
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, param in _parameters_in(balancer, group):
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    hyperparameters = {k: v for k, v in group.items() if k != "params"}
    try:
        metadata = {"param_group": json.dumps(hyperparameters), "scalars": json.dumps(scalars)}
    except TypeError as e:
        raise ValueError(
            f"The optimizer's group of balancer parameters holds a value JSON cannot store ({e}); this optimizer cannot "
            "checkpoint a learnable balancer under FSDP: use an AdamW/SGD-style --optim, or loss_balancing 'static' / 'dwa'."
        ) from None
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, BALANCER_OPTIMIZER_NAME), metadata=metadata)


def load_balancer_optimizer_state(balancer: LossBalancer, optimizer: Any, directory: str | os.PathLike) -> bool:
    """Restore what :func:`save_balancer_optimizer_state` wrote into the optimizer's balancer group
    (hyperparameters and per-parameter state). Returns False when the folder has no such file.

    Example: see :func:`save_balancer_optimizer_state`, which saves and loads one.
    """

    path = os.path.join(directory, BALANCER_OPTIMIZER_NAME)
    group = balancer_param_group(balancer, optimizer)
    if group is None or not os.path.isfile(path):
        return False
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key, value in json.loads(metadata.get("param_group", "{}")).items():
        group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    scalars = json.loads(metadata.get("scalars", "{}"))
    # As torch's Optimizer.load_state_dict: "step" stays on the CPU unless the group is capturable or fused.
    step_on_param = bool(group.get("capturable") or group.get("fused"))
    for name, param in _parameters_in(balancer, group):
        state: dict[str, Any] = {}
        for key, value in [*tensors.items(), *scalars.items()]:
            owner, _, field_name = key.rpartition("/")
            if owner != name:
                continue
            if torch.is_tensor(value) and (field_name != "step" or step_on_param):
                value = value.to(param.device)
            state[field_name] = value
        if state:
            optimizer.state[param] = state
        else:
            optimizer.state.pop(param, None)
    return True
