"""Saved adapters: checked against a base before loading, loaded, merged, and rebuilt from gathered shards.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping

import peft
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d
from torch import nn

from ..backbone.unwrap import is_peft_model, unwrap
from .attach import ADAPTER_WEIGHTS_NAME, freeze_backbone_batch_norm, short_list


def _saved_shapes(adapter_path: Path) -> dict[str, tuple[int, ...]]:
    weights = adapter_path / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(
            f"{adapter_path} holds no {ADAPTER_WEIGHTS_NAME}; save adapters with peft_model.save_pretrained(DIR) "
            "(safetensors). Adapters named other than 'default' are saved in DIR/<adapter_name>."
        )
    with safe_open(str(weights), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _expected_shapes(base: nn.Module, config: peft.PeftConfig) -> dict[str, tuple[int, ...]]:
    """Adapter tensors (names and shapes) ``config`` gives on ``base``'s architecture, built on the meta device."""
    with torch.device("meta"):
        skeleton = type(base)(copy.deepcopy(base.config))
        skeleton.backbone = freeze_batch_norm_2d(skeleton.backbone)
        config = copy.deepcopy(config)
        config.base_model_name_or_path = None  # keeps peft from warning that the skeleton has no path
        wrapped = peft.get_peft_model(skeleton, config)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(wrapped).items()}


def _recorded_backbone(config: peft.PeftConfig) -> str:
    """How the adapter config names its base: the base folder's backbone when it is readable."""
    source = config.base_model_name_or_path
    if not source:
        return "a base model it does not record (base_model_name_or_path is null)"
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        backbone = json.loads(config_file.read_text()).get("backbone")
        return f"backbone {backbone!r} (base model {source})"
    return f"base model {source!r}"


def check_adapter_fits(model: nn.Module, adapter_path: str | Path) -> peft.PeftConfig:
    """The saved adapter's config, after checking that its tensors fit ``model``'s backbone and heads.

    Raises:
        ValueError: the folder holds no adapter, or the adapter was trained on a different backbone (both
            named) or for different heads.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.adapters import apply_lora
        >>> tasks = [TaskSpec(name="y", type="regression")]
        >>> d = tempfile.mkdtemp()
        >>> apply_lora(TimmMultiTaskModel.from_backbone("test_vit", tasks)).save_pretrained(d)
        >>> check_adapter_fits(TimmMultiTaskModel.from_backbone("test_vit", tasks), d).peft_type.value
        'LORA'
    """
    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} is not a saved adapter (adapter_config.json missing); save one with peft_model.save_pretrained(DIR).")
    config = peft.PeftConfig.from_pretrained(str(path))
    base = unwrap(model)
    backbone = base.config.backbone
    saved = _saved_shapes(path)
    try:
        expected = _expected_shapes(base, config)
    except ValueError as e:  # peft: target modules not found in the base model
        targets = sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) else config.target_modules
        raise ValueError(
            f"The adapter at {path} was trained on {_recorded_backbone(config)}, not on this model's backbone "
            f"{backbone!r}: its target modules {targets} are not all in {backbone!r}. Load it onto a base model "
            "with the adapter's backbone."
        ) from e
    wrong = [k for k in saved if k in expected and expected[k] != saved[k]] + [k for k in saved if k not in expected]
    if wrong:
        where = "heads" if all(".heads." in k for k in wrong) else "backbone"
        detail = ", ".join(f"{k} {saved[k]} vs {expected.get(k, 'absent')}" for k in wrong[:3])
        if where == "heads":
            raise ValueError(
                f"The adapter at {path} was trained for other heads than this model's tasks "
                f"{list(base.heads)} ({detail}). Load it onto a base model with the adapter's tasks."
            )
        raise ValueError(
            f"The adapter at {path} was trained on {_recorded_backbone(config)}, which differs from this model's "
            f"backbone {backbone!r}: saved vs expected shapes {detail}. Load it onto a base model with the "
            "adapter's backbone."
        )
    return config


def load_adapter(
    model: nn.Module,
    adapter_path: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> peft.PeftModel:
    """Put a saved adapter (``adapter_config.json`` + ``adapter_model.safetensors``) on a model, and activate it.

    Args:
        model: A base :class:`~hf_tlmtl.TimmMultiTaskModel` (wrapped here with ``PeftModel.from_pretrained``)
            or a ``peft.PeftModel`` of one (the adapter is added with ``load_adapter``).
        adapter_path: The folder ``save_pretrained`` wrote (``DIR``, or ``DIR/<name>`` for adapters not
            named ``default``).
        adapter_name: Name the adapter gets in the model.
        is_trainable: Keep training it (otherwise it is loaded frozen, for inference).

    Raises:
        ValueError: before anything is changed, when the adapter does not fit the model
            (see :func:`check_adapter_fits`) or the name is taken.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.adapters import apply_lora
        >>> tasks = [TaskSpec(name="y", type="regression")]
        >>> d = tempfile.mkdtemp()
        >>> apply_lora(TimmMultiTaskModel.from_backbone("test_resnet", tasks)).save_pretrained(d)
        >>> pm = load_adapter(TimmMultiTaskModel.from_backbone("test_resnet", tasks), d, adapter_name="shapes")
        >>> pm.active_adapter
        'shapes'
    """
    check_adapter_fits(model, adapter_path)
    if is_peft_model(model):
        if adapter_name in model.peft_config:
            raise ValueError(
                f"The model already has an adapter named {adapter_name!r} (adapters: {sorted(model.peft_config)}); "
                "load under another adapter_name."
            )
        model.load_adapter(str(adapter_path), adapter_name, is_trainable=is_trainable)
        model.set_adapter(adapter_name, inference_mode=not is_trainable)
        return model
    base = unwrap(model)
    freeze_backbone_batch_norm(base)
    return peft.PeftModel.from_pretrained(base, str(adapter_path), adapter_name=adapter_name, is_trainable=is_trainable)


def unsharded_copy(model: peft.PeftModel, state_dict: Mapping[str, torch.Tensor]) -> peft.PeftModel:
    """A one-process copy of the peft model ``model`` that holds the weights of ``state_dict``.

    For a model whose weights are not whole tensors in this process (FSDP2 shards: gather them first with
    :func:`hf_tlmtl.training.distributed.full_state_dict`): peft's ``save_pretrained`` and :func:`merge_adapter`
    read the weights' storage, which FSDP frees. The base model is rebuilt from its config (BatchNorm frozen
    as :func:`apply_lora` freezes it), every adapter from its peft config, the active one activated, and
    ``state_dict`` (``model.state_dict()``'s names) is loaded strictly: no weight keeps the rebuilt model's
    random initialisation. The global random state is left as it was.

    Raises:
        ValueError: ``model`` is not a peft model, or ``state_dict``'s names are not the rebuilt model's.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.adapters import apply_lora
        >>> pm = apply_lora(TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")]), r=4)
        >>> again = unsharded_copy(pm, pm.state_dict())
        >>> again is not pm, all(torch.equal(v, pm.state_dict()[k]) for k, v in again.state_dict().items())
        (True, True)
    """
    if not is_peft_model(model):
        raise ValueError(f"unsharded_copy needs a peft.PeftModel (from apply_lora / load_adapter), got {type(model).__name__}.")
    base = unwrap(model)
    first, *others = list(model.peft_config)
    with torch.random.fork_rng(devices=[]):  # the random init below is overwritten: it must not shift the run's RNG
        rebuilt_base = type(base)(copy.deepcopy(base.config))
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules()):
            freeze_backbone_batch_norm(rebuilt_base)
        rebuilt = peft.get_peft_model(rebuilt_base, _unnamed(model.peft_config[first]), adapter_name=first)
        for name in others:
            rebuilt.add_adapter(name, _unnamed(model.peft_config[name]))
    for name, config in model.peft_config.items():
        rebuilt.peft_config[name].base_model_name_or_path = config.base_model_name_or_path
    rebuilt.set_adapter(model.active_adapter)
    wanted = rebuilt.state_dict()
    missing, unexpected = sorted(set(wanted) - set(state_dict)), sorted(set(state_dict) - set(wanted))
    if missing or unexpected:
        raise ValueError(
            f"The state dict does not fit a copy of this peft model: {len(missing)} of its weights are missing "
            f"({short_list(missing, 3)}), {len(unexpected)} are not its own ({short_list(unexpected, 3)}). Pass the "
            "model's own state dict (hf_tlmtl.training.distributed.full_state_dict gathers it from FSDP shards)."
        )
    rebuilt.load_state_dict(dict(state_dict), strict=True)
    return rebuilt


def _unnamed(config: peft.PeftConfig) -> peft.PeftConfig:
    """A copy of ``config`` without its base model path (peft warns when the new base does not carry it)."""
    config = copy.deepcopy(config)
    config.base_model_name_or_path = None
    return config


def _unload_heads(model: peft.PeftModel) -> None:
    """Replace each head's ``ModulesToSaveWrapper`` by the head the active adapter trained.

    peft 0.21's LoHa / LoKr / IA3 ``merge_and_unload`` fails on wrapped modules without a ``weight``
    (our heads); LoRA's copes. Unwrapping first with the wrapper's own method works for all of them.
    """
    heads = unwrap(model).heads
    for name in list(heads):
        wrapper = heads[name]
        if hasattr(wrapper, "unload_and_optionally_merge_module"):
            heads[name] = wrapper.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)


def merge_adapter(model: peft.PeftModel) -> nn.Module:
    """Fold the active adapter into the backbone weights: a plain :class:`~hf_tlmtl.TimmMultiTaskModel`.

    peft's ``merge_and_unload`` (heads become the adapter's trained heads), then BatchNorm is unfrozen and
    every parameter requires grad again, as in a model built with ``from_backbone``. Outputs match the
    adapted model's; ``save_pretrained`` / ``AutoModel.from_pretrained`` treat it like any other.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.adapters import apply_lora
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> plain = merge_adapter(apply_lora(m, r=4))
        >>> type(plain).__name__, all(p.requires_grad for p in plain.parameters())
        ('TimmMultiTaskModel', True)
    """
    if not is_peft_model(model):
        raise ValueError(f"merge_adapter needs a peft.PeftModel (from apply_lora / load_adapter), got {type(model).__name__}.")
    _unload_heads(model)
    merged = model.merge_and_unload()
    merged.backbone = unfreeze_batch_norm_2d(merged.backbone)
    merged.requires_grad_(True)
    return merged
