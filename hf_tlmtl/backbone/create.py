"""A timm backbone from a name, ``hf-hub:`` or ``local-dir:`` source, with errors that say what to do; its
data config; a cut after one of its stages (timm's ``prune_intermediate_layers``, pooling restored).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import timm
from timm.models import parse_model_name
from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
from torch import nn


def _suggest_models(name: str) -> str:
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    return f" Close names in timm: {close}." if close else " See timm.list_models('*pattern*') for valid names."


def _network_error_message(source: str, error: Exception) -> str:
    return (
        f"Could not fetch pretrained weights for {source!r} from the Hugging Face Hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The Hub is unreachable "
        "from here (offline machine, firewall, or HF_HUB_OFFLINE=1). Save the weights on a machine with access "
        "(timm.models.save_for_hf(timm.create_model(name, pretrained=True), DIR)) and use "
        "backbone='local-dir:DIR', or pass pretrained=False to start from random weights."
    )


def is_network_error(error: Exception) -> bool:
    """Errors the Hub client raises when it cannot reach the Hub (or is told not to)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")) or (
        isinstance(error, OSError) and "huggingface" in str(error).lower()
    )


def resolve_backbone_source(name: str, timm_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Architecture name and creation kwargs for ``name`` (plain timm name, ``hf-hub:`` or ``local-dir:``).

    Validates early: unknown architectures get close-name suggestions, missing folders are named.
    Saved ``model_args`` of a source checkpoint become defaults of ``timm_kwargs`` so the
    architecture can be rebuilt later without the source.
    """
    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        raise ValueError(str(e)) from None
    model_args: dict[str, Any] = {}
    if source == "local-dir":
        if not (Path(model_id) / "config.json").is_file():
            raise ValueError(
                f"backbone {name!r}: no timm checkpoint at {model_id!r} (config.json missing). Write one with "
                "timm.models.save_for_hf(model, DIR) and pass backbone='local-dir:DIR'."
            )
        pretrained_cfg, architecture, model_args = load_model_config_from_path(model_id)
    elif source == "hf-hub":
        try:
            pretrained_cfg, architecture, model_args = load_model_config_from_hf(model_id)
        except Exception as e:  # noqa: BLE001 - re-raised with a clear message
            if is_network_error(e):
                raise ValueError(_network_error_message(name, e)) from e
            raise
    else:
        architecture = name.split(".")[0]
        if not timm.is_model(architecture):
            raise ValueError(f"Unknown timm architecture {architecture!r} (timm {timm.__version__}).{_suggest_models(name)}")
        return name, dict(timm_kwargs)
    if not timm.is_model(architecture):
        raise ValueError(
            f"backbone {name!r} uses architecture {architecture!r}, which timm {timm.__version__} does not know: "
            "upgrade timm (pip install -U timm)."
        )
    # The source's classifier size is irrelevant: heads replace it.
    saved_args = {k: v for k, v in (model_args or {}).items() if k != "num_classes"}
    return architecture, {**saved_args, **timm_kwargs}


def create_backbone(name: str, pretrained: bool = False, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` with errors that say what to do."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"Unknown timm architecture {name!r} (timm {timm.__version__}).{_suggest_models(name)}") from e
        if pretrained and is_network_error(e.__cause__ or e):
            raise ValueError(_network_error_message(name, e)) from e
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message
        if pretrained and is_network_error(e):
            raise ValueError(_network_error_message(name, e)) from e
        raise


def _pool_type(backbone: nn.Module) -> str:
    """The backbone's global pooling type, wherever the family keeps it."""
    for owner in (backbone, getattr(backbone, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str) and pool:
            return pool
        if getattr(pool, "pool_type", None):
            return pool.pool_type
    return "avg"


def truncate_backbone(backbone: nn.Module, stage: int) -> None:
    """Keep the backbone up to ``feature_info[stage]`` (timm's ``prune_intermediate_layers``), pooled."""
    if not hasattr(backbone, "prune_intermediate_layers"):
        raise ValueError(
            f"{type(backbone).__name__} has no prune_intermediate_layers, so it cannot be truncated. Families "
            "that support it include ResNet, ConvNeXt, EfficientNet, ViT/DeiT/EVA, Swin, MaxViT, RegNet; "
            "use strategy='partial' instead."
        )
    num_stages = len(backbone.feature_info)
    if not 0 <= stage < num_stages - 1:
        raise ValueError(
            f"truncate_stage={stage} is out of range: {type(backbone).__name__} has {num_stages} stages "
            f"(feature_info indices 0..{num_stages - 1}); keep one of 0..{num_stages - 2} to drop at least the top stage."
        )
    pool = _pool_type(backbone)
    backbone.prune_intermediate_layers(indices=[stage], prune_head=True, prune_norm=False)
    # Pruning removes global pooling too; the heads need pooled features.
    backbone.reset_classifier(0, pool)


def backbone_data_config(backbone: nn.Module, image_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """timm's data config (input size, mean, std, interpolation, crop) of a built backbone.

    ``image_size`` (an int or ``(height, width)``) replaces the input size, e.g. for a ViT built
    with ``img_size=``.

    Example:
        >>> import timm
        >>> backbone_data_config(timm.create_model("test_resnet"), image_size=32)["input_size"]
        (3, 32, 32)
    """
    data_config = timm.data.resolve_model_data_config(backbone)
    if image_size is not None:
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        data_config["input_size"] = (data_config["input_size"][0], *size)
    return data_config
