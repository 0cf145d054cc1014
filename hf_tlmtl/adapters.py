"""PEFT adapters (LoRA, LoHa, LoKr, IA3) on any timm backbone of a :class:`~hf_tlmtl.TimmMultiTaskModel`.

- :func:`apply_lora` wraps the model in a ``peft.PeftModel``: adapters on the backbone, task heads as
  ``modules_to_save`` (they train fully). ``target_modules="auto"`` picks the layers from the model
  itself (:func:`auto_target_modules`) and logs what it picked. Called on a ``PeftModel``, it adds
  another named adapter to the same frozen backbone (one per target task or task set).
- Switching is peft's own ``set_adapter``; saving is peft's ``save_pretrained``: the adapter only
  (``adapter_config.json`` + ``adapter_model.safetensors``, and peft's ``README.md`` card; adapters not
  named ``default`` go to ``DIR/<name>``). :func:`load_adapter` puts a saved adapter back on a base
  model after checking that it fits that backbone and those heads.
- :func:`merge_adapter` folds the active adapter into the weights and returns a plain
  :class:`~hf_tlmtl.TimmMultiTaskModel` (peft's ``merge_and_unload``, BatchNorm unfrozen again).
- :func:`unsharded_copy` rebuilds a peft model in one process from its gathered weights: how an
  FSDP-trained adapter is saved and merged (FSDP frees the storage peft's save and merge read).

BatchNorm layers of the backbone become ``FrozenBatchNorm2d`` (timm) when adapters are attached: the
running statistics are part of the frozen base, so training one adapter cannot change what another
adapter (or the base) computes, and a saved adapter reproduces its outputs on a fresh base.

Example:
    >>> import tempfile, torch
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.adapters import apply_lora, load_adapter, merge_adapter
    >>> tasks = [TaskSpec(name="y", type="regression")]
    >>> _ = torch.manual_seed(0); model = TimmMultiTaskModel.from_backbone("test_vit", tasks, img_size=32)
    >>> peft_model = apply_lora(model, r=4, alpha=8)
    >>> sorted(peft_model.peft_config["default"].modules_to_save)
    ['heads.y']
    >>> d = tempfile.mkdtemp(); peft_model.save_pretrained(d)
    >>> _ = torch.manual_seed(0); base = TimmMultiTaskModel.from_backbone("test_vit", tasks, img_size=32)
    >>> again = load_adapter(base, d)
    >>> plain = merge_adapter(again)
    >>> type(plain).__name__
    'TimmMultiTaskModel'
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import peft
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d
from torch import nn
from transformers.utils import logging

from .transfer import base_model, is_peft_model

logger = logging.get_logger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""Layer types adapters are put on (all of LoRA, LoHa, LoKr and IA3 support them)."""


# ------------------------------------------------------------------------------------ methods
def _lora_config(r: int, alpha: float, dropout: float, targets: list[str], heads: list[str]) -> peft.PeftConfig:
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=heads)


def _loha_config(r: int, alpha: float, dropout: float, targets: list[str], heads: list[str]) -> peft.PeftConfig:
    return peft.LoHaConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=targets, modules_to_save=heads)


def _lokr_config(r: int, alpha: float, dropout: float, targets: list[str], heads: list[str]) -> peft.PeftConfig:
    return peft.LoKrConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=targets, modules_to_save=heads)


def _ia3_config(r: int, alpha: float, dropout: float, targets: list[str], heads: list[str]) -> peft.PeftConfig:
    # (IA)^3 learns one scaling vector per layer: no rank, alpha or dropout. MLP output layers (fc2)
    # scale their input (the hidden activations), as the paper does for feed-forward blocks.
    feedforward = [t for t in targets if t.endswith("fc2")]
    return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, modules_to_save=heads)


METHODS: dict[str, Callable[..., peft.PeftConfig]] = {
    "lora": _lora_config,
    "loha": _loha_config,
    "lokr": _lokr_config,
    "ia3": _ia3_config,
}
"""Valid values of ``method`` / ``MultiTaskTrainingArguments.lora_method``: the peft config each builds."""


# ---------------------------------------------------------------------------- target modules
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The backbone's Linear and Conv2d layers by full name (``backbone.<path>``), in model order.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
        >>> list(adaptable_modules(m))[:2]
        ['backbone.patch_embed.proj', 'backbone.blocks.0.attn.qkv']
    """
    backbone = base_model(model).backbone
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
        base_model(model).config.backbone, len(picked), kind, ", ".join(leaves), len(left_out), _short_list(left_out),
    )


def _short_list(names: Sequence[str], limit: int = 8) -> str:
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
        f"{base_model(model).config.backbone!r}. Layers that can take adapters: {_short_list(described, 12)}; "
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
def _check_hyperparameters(r: int, alpha: float, dropout: float, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown adapter method {method!r}; valid methods: {sorted(METHODS)}.")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the adapter rank) must be an int >= 1, got {r!r}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")


def _check_grouped(model: nn.Module, targets: list[str], r: int, method: str) -> None:
    modules = adaptable_modules(model)
    for name in targets:
        groups = getattr(modules[name], "groups", 1)
        if method == "lora" and groups > 1:
            # Even with a divisible rank peft cannot merge it: merge_adapter (and recipes/finetune.py, which
            # saves the merged model) would fail after training.
            need = f"needs r divisible by {groups} (got r={r}) and " if r % groups else ""
            raise ValueError(
                f"{name} is a grouped convolution (groups={groups}): LoRA on it {need}cannot be merged into "
                "the model. Leave grouped convolutions out of target_modules ('auto' does), or use method='loha' / "
                "'lokr', which merge them."
            )


def _head_modules(model: nn.Module, tasks: Sequence[str] | None) -> list[str]:
    base = base_model(model)
    names = list(base.heads) if tasks is None else list(tasks)
    unknown = sorted(set(names) - set(base.heads))
    if unknown or not names:
        raise ValueError(f"tasks={list(tasks or [])!r}: pick one or more of this model's tasks {list(base.heads)}.")
    return [f"heads.{name}" for name in names]


def build_adapter_config(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "auto",
    method: str = "lora",
    tasks: Sequence[str] | None = None,
) -> peft.PeftConfig:
    """The peft config :func:`apply_lora` uses: resolved backbone targets, heads as ``modules_to_save``.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_convnext", [TaskSpec(name="y", type="regression")])
        >>> config = build_adapter_config(m, method="loha")
        >>> type(config).__name__, any("conv_dw" in t for t in config.target_modules)
        ('LoHaConfig', False)
    """
    _check_hyperparameters(r, alpha, dropout, method)
    targets = resolve_target_modules(model, target_modules)
    _check_grouped(model, targets, r, method)
    config = METHODS[method](r, alpha, dropout, targets, _head_modules(model, tasks))
    return config


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "auto",
    method: str = "lora",
    adapter_name: str = "default",
    tasks: Sequence[str] | None = None,
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
        method: One of :data:`METHODS`: ``lora``, ``loha``, ``lokr``, ``ia3``.
        adapter_name: Name of this adapter; several named adapters share one backbone.
        tasks: Heads this adapter trains and saves (default: all); the others stay frozen as in the base.

    Returns:
        The ``peft.PeftModel``; only the active adapter and its heads require grad.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> pm = apply_lora(m, r=4)
        >>> pm = apply_lora(pm, r=4, adapter_name="other")
        >>> pm.active_adapter, sorted(pm.peft_config)
        ('other', ['default', 'other'])
    """
    if is_peft_model(model):
        return _add_adapter(model, r, alpha, dropout, target_modules, method, adapter_name, tasks)
    base = base_model(model)
    config = build_adapter_config(base, r, alpha, dropout, target_modules, method, tasks)
    _freeze_batch_norm(base)
    peft_model = peft.get_peft_model(base, config, adapter_name=adapter_name)
    _recordbase_model(peft_model, adapter_name)
    return peft_model


def _recordbase_model(peft_model: peft.PeftModel, adapter_name: str) -> None:
    """``base_model_name_or_path`` = where the base model was loaded from (peft would write null: transformers 5
    models have no ``name_or_path`` attribute of their own), so the adapter says which base it needs."""
    peft_model.peft_config[adapter_name].base_model_name_or_path = base_model(peft_model).config._name_or_path or None


def _add_adapter(
    model: peft.PeftModel, r: int, alpha: float, dropout: float, target_modules: Any, method: str, adapter_name: str,
    tasks: Sequence[str] | None,
) -> peft.PeftModel:
    if adapter_name in model.peft_config:
        raise ValueError(
            f"The model already has an adapter named {adapter_name!r} (adapters: {sorted(model.peft_config)}); "
            "pick a new adapter_name, or switch to it with model.set_adapter(name)."
        )
    config = build_adapter_config(model, r, alpha, dropout, target_modules, method, tasks)
    if config.peft_type != model.peft_type:
        raise ValueError(
            f"method={method!r} cannot join the model's {str(model.peft_type.value).lower()} adapters "
            f"{sorted(model.peft_config)}: peft combines adapters of one method only. Use method="
            f"{str(model.peft_type.value).lower()!r}, or start from a base model without adapters."
        )
    model.add_adapter(adapter_name, config)
    _recordbase_model(model, adapter_name)
    model.set_adapter(adapter_name)
    return model


def _freeze_batch_norm(base: nn.Module) -> None:
    """BatchNorm -> ``FrozenBatchNorm2d`` (timm): running statistics belong to the shared, frozen base."""
    base.backbone = freeze_batch_norm_2d(base.backbone)


# ---------------------------------------------------------------------------------- load
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
    base = base_model(model)
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
    base = base_model(model)
    _freeze_batch_norm(base)
    return peft.PeftModel.from_pretrained(base, str(adapter_path), adapter_name=adapter_name, is_trainable=is_trainable)


# ------------------------------------------------------------------------- unsharded copy
def unsharded_copy(model: peft.PeftModel, state_dict: Mapping[str, torch.Tensor]) -> peft.PeftModel:
    """A one-process copy of the peft model ``model`` that holds the weights of ``state_dict``.

    For a model whose weights are not whole tensors in this process (FSDP2 shards: gather them first with
    :func:`hf_tlmtl.distributed.full_state_dict`): peft's ``save_pretrained`` and :func:`merge_adapter`
    read the weights' storage, which FSDP frees. The base model is rebuilt from its config (BatchNorm frozen
    as :func:`apply_lora` freezes it), every adapter from its peft config, the active one activated, and
    ``state_dict`` (``model.state_dict()``'s names) is loaded strictly: no weight keeps the rebuilt model's
    random initialisation. The global random state is left as it was.

    Raises:
        ValueError: ``model`` is not a peft model, or ``state_dict``'s names are not the rebuilt model's.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> pm = apply_lora(TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")]), r=4)
        >>> again = unsharded_copy(pm, pm.state_dict())
        >>> again is not pm, all(torch.equal(v, pm.state_dict()[k]) for k, v in again.state_dict().items())
        (True, True)
    """
    if not is_peft_model(model):
        raise ValueError(f"unsharded_copy needs a peft.PeftModel (from apply_lora / load_adapter), got {type(model).__name__}.")
    base = base_model(model)
    first, *others = list(model.peft_config)
    with torch.random.fork_rng(devices=[]):  # the random init below is overwritten: it must not shift the run's RNG
        rebuilt_base = type(base)(copy.deepcopy(base.config))
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules()):
            _freeze_batch_norm(rebuilt_base)
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
            f"({_short_list(missing, 3)}), {len(unexpected)} are not its own ({_short_list(unexpected, 3)}). Pass the "
            "model's own state dict (hf_tlmtl.distributed.full_state_dict gathers it from FSDP shards)."
        )
    rebuilt.load_state_dict(dict(state_dict), strict=True)
    return rebuilt


def _unnamed(config: peft.PeftConfig) -> peft.PeftConfig:
    """A copy of ``config`` without its base model path (peft warns when the new base does not carry it)."""
    config = copy.deepcopy(config)
    config.base_model_name_or_path = None
    return config


# --------------------------------------------------------------------------------- merge
def _unload_heads(model: peft.PeftModel) -> None:
    """Replace each head's ``ModulesToSaveWrapper`` by the head the active adapter trained.

    peft 0.21's LoHa / LoKr / IA3 ``merge_and_unload`` fails on wrapped modules without a ``weight``
    (our heads); LoRA's copes. Unwrapping first with the wrapper's own method works for all of them.
    """
    heads = base_model(model).heads
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
