"""Adapters attached to a backbone: :func:`apply_lora` and the choice of the layers they go on.

``target_modules="auto"`` picks from the model itself (:func:`auto_target_modules`) and logs the pick; names,
suffixes and regexes are checked against the modules that exist. Heads are ``modules_to_save``; BatchNorm is frozen.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import peft
from peft.tuners.tuners_utils import check_target_module_exists
from timm.layers import freeze_batch_norm_2d
from torch import nn
from transformers.utils import logging

from ..backbone.unwrap import is_peft_model, unwrap
from .config import AdapterConfig

logger = logging.get_logger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""Layer types adapters are put on (all of LoRA, LoHa, LoKr and IA3 support them)."""


# ------------------------------------------------------------------------------------ methods


# ---------------------------------------------------------------------------- target modules
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The backbone's Linear and Conv2d layers by full name (``backbone.<path>``), in model order.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
        >>> list(adaptable_modules(m))[:2]
        ['backbone.patch_embed.proj', 'backbone.blocks.0.attn.qkv']
    """
    backbone = unwrap(model).backbone
    found = {}
    for name, module in backbone.named_modules():
        if isinstance(module, ADAPTABLE_TYPES) and not _inside_adapter(name):
            # A layer that already carries adapters is peft's wrapper around it: its base_layer.
            found[f"backbone.{name}".removesuffix(".base_layer")] = module
    return found


def _inside_adapter(name: str) -> bool:
    """Layers peft itself created (``lora_A`` ...) or copied (``modules_to_save``) are not candidates."""
    return any(part.startswith(("lora_", "hada_", "lokr_", "ia3_")) or part == "modules_to_save" for part in name.split("."))


def _numel(modules: list[nn.Module]) -> int:
    return sum(m.weight.numel() for m in modules)


def _pick_auto(modules: dict[str, nn.Module]) -> tuple[list[str], str]:
    """``(names, description)`` of the layers "auto" adapts; see :func:`auto_target_modules`."""
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if linears:
        has_attention = any(".attn." in n or ".attention." in n for n in linears)
        kind = "attention and MLP Linear layers" if has_attention else "pointwise (MLP) Linear layers"
        return linears, kind
    convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups == 1}
    spatial = [n for n, m in convs.items() if max(m.kernel_size) > 1]
    pointwise = [n for n, m in convs.items() if max(m.kernel_size) == 1]
    if spatial and _numel([convs[n] for n in spatial]) >= _numel([convs[n] for n in pointwise]):
        return spatial, "spatial (kxk, ungrouped) convolutions"
    return pointwise, "pointwise (1x1) convolutions"


def auto_target_modules(model: nn.Module) -> list[str]:
    """The backbone layers ``target_modules="auto"`` puts adapters on, by full module name.

    - Backbones with Linear layers (ViT/DeiT/EVA/Swin: attention ``qkv``/``proj`` and MLP ``fc1``/``fc2``;
      ConvNeXt: its pointwise MLP ``fc1``/``fc2``): every Linear layer.
    - Pure CNNs: the ungrouped kxk (e.g. 3x3) convolutions (ResNet), unless 1x1 convolutions hold more
      weights (depthwise-separable or grouped families: EfficientNet, MobileNet, RegNet, ResNeXt), then those.

    Grouped / depthwise convolutions (``groups > 1``, e.g. ConvNeXt ``conv_dw``) are never picked: LoRA
    on them needs the rank divisible by the groups and cannot be merged. Patch / stem embeddings of
    ViT-like models are convolutions, so they are left out there too.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> auto_target_modules(m)[:3]
        ['backbone.conv1.0', 'backbone.conv1.3', 'backbone.conv1.6']
    """
    return _pick_auto(adaptable_modules(model))[0]


def _log_auto_pick(model: nn.Module, picked: list[str], kind: str, modules: dict[str, nn.Module]) -> None:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in picked})
    left_out = [n for n in modules if n not in set(picked)]
    logger.info(
        "target_modules='auto' on backbone %r: %d %s (%s); left out %d: %s",
        unwrap(model).config.backbone, len(picked), kind, ", ".join(leaves), len(left_out), short_list(left_out),
    )


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are (for error messages)."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _split_patterns(target_modules: str | Sequence[str]) -> str | list[str]:
    """A list of names / suffixes, or one regex: ``"qkv,fc1"`` and ``"qkv"`` are names, ``".*attn.*"`` a regex."""
    if isinstance(target_modules, str):
        if "," in target_modules:
            return [t.strip() for t in target_modules.split(",") if t.strip()]
        if re.fullmatch(r"[\w.]+", target_modules):
            return [target_modules]
        return target_modules
    return list(target_modules)


def _no_match_error(model: nn.Module, target_modules: Any, modules: dict[str, nn.Module]) -> ValueError:
    described = [f"{n.removeprefix('backbone.')} ({type(m).__name__})" for n, m in modules.items()]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    return ValueError(
        f"target_modules={target_modules!r} matches no Linear/Conv2d layer of backbone "
        f"{unwrap(model).config.backbone!r}. Layers that can take adapters: {short_list(described, 12)}; "
        f"their names end in {leaves}. Pass some of these names (or suffixes, comma-separated), a regex over "
        "the module names, or 'auto'."
    )


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str] = "auto") -> list[str]:
    """Full names of the backbone layers that ``target_modules`` selects (``"auto"``: :func:`auto_target_modules`).

    ``target_modules`` is ``"auto"``, a list (or comma-separated string) of module names or name suffixes
    (``["qkv", "fc1"]``), or one regex matched against the whole name, with or without the
    ``backbone.`` prefix (``r"blocks\\.[6-9]\\..*"``). Heads are never targets: they train fully.

    Raises:
        ValueError: nothing matches (the message lists the layers that exist).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
        >>> resolve_target_modules(m, "blocks.5.attn.qkv,blocks.5.mlp.fc2")
        ['backbone.blocks.5.attn.qkv', 'backbone.blocks.5.mlp.fc2']
    """
    modules = adaptable_modules(model)
    if isinstance(target_modules, str) and target_modules == "auto":
        picked, kind = _pick_auto(modules)
        if not picked:
            raise _no_match_error(model, target_modules, modules)
        _log_auto_pick(model, picked, kind, modules)
        return picked
    patterns = _split_patterns(target_modules)
    matcher = peft.LoraConfig(target_modules=patterns)  # only for peft's own name matching
    picked = [
        n for n in modules
        if check_target_module_exists(matcher, n) or check_target_module_exists(matcher, n.removeprefix("backbone."))
    ]
    if not picked:
        raise _no_match_error(model, target_modules, modules)
    return picked


# --------------------------------------------------------------------------------- attach
def _check_grouped(model: nn.Module, targets: list[str], adapter: AdapterConfig) -> None:
    modules = adaptable_modules(model)
    for name in targets:
        groups = getattr(modules[name], "groups", 1)
        if adapter.method == "lora" and groups > 1:
            # Even with a divisible rank peft cannot merge it: merge_adapter (and save_final_model, which
            # saves the merged model) would fail after training.
            need = f"needs r divisible by {groups} (got r={adapter.r}) and " if adapter.r % groups else ""
            raise ValueError(
                f"{name} is a grouped convolution (groups={groups}): LoRA on it {need}cannot be merged into "
                "the model. Leave grouped convolutions out of target_modules ('auto' does), or use method='loha' / "
                "'lokr', which merge them."
            )


def _head_modules(model: nn.Module, tasks: Sequence[str] | None) -> list[str]:
    base = unwrap(model)
    names = list(base.heads) if tasks is None else list(tasks)
    unknown = sorted(set(names) - set(base.heads))
    if unknown or not names:
        raise ValueError(f"tasks={list(tasks or [])!r}: pick one or more of this model's tasks {list(base.heads)}.")
    return [f"heads.{name}" for name in names]


def _adapter_config(config: AdapterConfig | None, **settings: Any) -> AdapterConfig:
    """``config``, or one made (and checked) from the keyword settings; never both."""
    if config is None:
        return AdapterConfig(**settings)
    defaults = {f.name: f.default for f in dataclasses.fields(AdapterConfig)}
    changed = sorted(k for k, v in settings.items() if v != defaults[k])
    if changed:
        raise ValueError(f"Pass config=AdapterConfig(...) or the settings {changed}, not both.")
    return config


def build_adapter_config(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "auto",
    method: str = "lora",
    tasks: Sequence[str] | None = None,
    *,
    config: AdapterConfig | None = None,
) -> peft.PeftConfig:
    """The peft config :func:`apply_lora` uses: resolved backbone targets, heads as ``modules_to_save``.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_convnext", [TaskSpec(name="y", type="regression")])
        >>> config = build_adapter_config(m, method="loha")
        >>> type(config).__name__, any("conv_dw" in t for t in config.target_modules)
        ('LoHaConfig', False)
    """
    adapter = _adapter_config(config, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, method=method)
    targets = resolve_target_modules(model, adapter.target_modules)
    _check_grouped(model, targets, adapter)
    return adapter.peft_config(targets, _head_modules(model, tasks))


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "auto",
    method: str = "lora",
    adapter_name: str = "default",
    tasks: Sequence[str] | None = None,
    *,
    config: AdapterConfig | None = None,
) -> peft.PeftModel:
    """Put a trainable adapter on the (frozen) backbone; heads train fully as ``modules_to_save``.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel`, or a ``peft.PeftModel`` of one: then the adapter is
            added next to the existing ones (same method) and made the active, trainable one; the
            others stay frozen.
        r: Rank (LoRA, LoHa, LoKr; ignored by ``ia3``).
        alpha: Scaling numerator (``alpha / r``; ignored by ``ia3``).
        dropout: LoRA dropout / LoHa-LoKr module dropout (ignored by ``ia3``).
        target_modules: ``"auto"`` (see :func:`auto_target_modules`; the pick is logged), names, suffixes
            or a regex (see :func:`resolve_target_modules`).
        method: One of :data:`~hf_tlmtl.adapters.METHODS`: ``lora``, ``loha``, ``lokr``, ``ia3``.
        adapter_name: Name of this adapter; several named adapters share one backbone.
        tasks: Heads this adapter trains and saves (default: all); the others stay frozen as in the base.
        config: All of the settings above but ``tasks`` as one :class:`~hf_tlmtl.adapters.AdapterConfig`,
            instead of the keywords.

    Returns:
        The ``peft.PeftModel``; only the active adapter and its heads require grad.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.adapters import AdapterConfig
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> pm = apply_lora(m, r=4)
        >>> pm = apply_lora(pm, config=AdapterConfig(r=4, adapter_name="other"))
        >>> pm.active_adapter, sorted(pm.peft_config)
        ('other', ['default', 'other'])
    """
    adapter = _adapter_config(
        config, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, method=method, adapter_name=adapter_name
    )
    if is_peft_model(model):
        return _add_adapter(model, adapter, tasks)
    base = unwrap(model)
    peft_config = build_adapter_config(base, tasks=tasks, config=adapter)
    freeze_backbone_batch_norm(base)
    peft_model = peft.get_peft_model(base, peft_config, adapter_name=adapter.adapter_name)
    _recordbase_model(peft_model, adapter.adapter_name)
    return peft_model


def _recordbase_model(peft_model: peft.PeftModel, adapter_name: str) -> None:
    """``base_model_name_or_path`` = where the base model was loaded from (peft would write null: transformers 5
    models have no ``name_or_path`` attribute of their own), so the adapter says which base it needs."""
    peft_model.peft_config[adapter_name].base_model_name_or_path = unwrap(peft_model).config._name_or_path or None


def _add_adapter(model: peft.PeftModel, adapter: AdapterConfig, tasks: Sequence[str] | None) -> peft.PeftModel:
    name = adapter.adapter_name
    if name in model.peft_config:
        raise ValueError(
            f"The model already has an adapter named {name!r} (adapters: {sorted(model.peft_config)}); "
            "pick a new adapter_name, or switch to it with model.set_adapter(name)."
        )
    config = build_adapter_config(model, tasks=tasks, config=adapter)
    if config.peft_type != model.peft_type:
        raise ValueError(
            f"method={adapter.method!r} cannot join the model's {str(model.peft_type.value).lower()} adapters "
            f"{sorted(model.peft_config)}: peft combines adapters of one method only. Use method="
            f"{str(model.peft_type.value).lower()!r}, or start from a base model without adapters."
        )
    model.add_adapter(name, config)
    _recordbase_model(model, name)
    model.set_adapter(name)
    return model


def freeze_backbone_batch_norm(base: nn.Module) -> None:
    """BatchNorm -> ``FrozenBatchNorm2d`` (timm): running statistics belong to the shared, frozen base."""
    base.backbone = freeze_batch_norm_2d(base.backbone)

