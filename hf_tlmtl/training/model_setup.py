"""The model a training run starts from, as the recipes' model arguments describe it.

- :func:`build_model`: a timm backbone with new heads (``--backbone``, ``--pretrained``), or a saved hf_tlmtl
  model re-headed for this data's tasks (``--init_from``: transfer), at ``--image_size``;
- :func:`override_preprocessing`: ``--mean`` / ``--std`` / ``--crop_pct`` into the model's data config (saved
  with it), and the whole image kept when the input is below the backbone's native size.

Bad values raise :class:`~hf_tlmtl.training.cli.UsageError` naming the argument.

Example:
    >>> from hf_tlmtl import TaskSpec
    >>> model = build_model([TaskSpec(name="y", type="regression")], backbone="test_resnet", image_size=32)
    >>> override_preprocessing(model, image_size=32)
    "crop_pct 0.95 -> 1.0: input 32 px is below the backbone's native 160 px, so the whole image is kept (pass --crop_pct to choose)"
    >>> model.config.data_config["input_size"], model.config.data_config["crop_pct"]
    ([3, 32, 32], 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm

from ..backbone.anatomy import native_input_side
from ..checkpoints import check_model_folder
from ..modeling import TimmMultiTaskModel
from ..tasks import TaskSpec
from .cli import UsageError


def _fixed_input_size(architecture: str) -> bool:
    """ViT-like timm models are built for one input size (``img_size=`` at creation)."""
    try:
        cfg = timm.models.get_pretrained_cfg(architecture.split(".")[0])
    except Exception:  # noqa: BLE001 - unknown names are reported by from_backbone
        return False
    return bool(getattr(cfg, "fixed_input_size", False))


def build_model(
    tasks: Sequence[TaskSpec],
    *,
    backbone: str,
    pretrained: bool = False,
    init_from: str | None = None,
    image_size: int | None = None,
    head_hidden_size: int | None = None,
    head_dropout: float = 0.0,
    drop_path_rate: float | None = None,
) -> TimmMultiTaskModel:
    """The model to train on ``tasks``.

    Args:
        tasks: This data's tasks.
        backbone: timm model name, ``hf-hub:org/name`` or ``local-dir:/path`` (new heads on it).
        pretrained: Load the backbone's pretrained weights (timm's loaders).
        init_from: A saved hf_tlmtl model (folder or Hub id) to transfer from instead of ``backbone``: its backbone
            is kept, its heads re-made for ``tasks`` (those of same-named, same-size tasks kept: ``reused_heads``).
        image_size: Input side in pixels (default: the backbone's own); ViT-like backbones are built for it.
        head_hidden_size, head_dropout: The heads (2-layer MLP heads with this hidden width; dropout before each).
        drop_path_rate: timm's stochastic depth rate (a new backbone only).
    """
    if init_from:
        source = Path(init_from)
        if source.exists() and not (source / "config.json").is_file():
            raise UsageError(f"--init_from {str(source)!r} has no config.json; pass a folder written by this recipe")
        if not source.exists() and (source.is_absolute() or init_from.startswith((".", "~")) or init_from.count("/") != 1):
            raise UsageError(
                f"--init_from {init_from!r} not found; produce it first (e.g. run recipes/configs/default.yaml) "
                "or pass a Hub id org/name"
            )
        check_model_folder(source, "--init_from")
        model = TimmMultiTaskModel.from_pretrained(init_from, tasks=tasks)
        if image_size and not _fixed_input_size(model.config.backbone):
            model.config.data_config["input_size"] = [model.config.in_chans, image_size, image_size]
        return model
    timm_kwargs: dict[str, Any] = {}
    if drop_path_rate is not None:
        timm_kwargs["drop_path_rate"] = drop_path_rate
    if image_size and _fixed_input_size(backbone.split(":")[-1]):
        timm_kwargs["img_size"] = image_size
    return TimmMultiTaskModel.from_backbone(
        backbone,
        tasks=tasks,
        pretrained=pretrained,
        head_hidden_size=head_hidden_size,
        head_dropout=head_dropout,
        image_size=image_size,
        **timm_kwargs,
    )


def _channel_values(text: str, flag: str, channels: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes {channels} comma-separated numbers (one per channel), got {text!r}") from None
    if len(values) != channels or (flag == "--std" and min(values) <= 0):
        raise UsageError(f"{flag} needs {channels} {'positive ' if flag == '--std' else ''}numbers (one per input channel), got {text!r}")
    return values


def override_preprocessing(
    model: TimmMultiTaskModel,
    *,
    mean: str | None = None,
    std: str | None = None,
    crop_pct: float | None = None,
    image_size: int | None = None,
) -> str | None:
    """``mean`` / ``std`` (comma-separated, one number per channel) and ``crop_pct`` into the model's data config.

    Returns a note when the crop was changed on its own: timm's 0.875 centre crop is an ImageNet-at-224-px
    convention, and below the backbone's native input size (small images, or images generated at the input
    size; ``image_size`` is the one asked for) it would cut an eighth of the border, so there the default is
    the whole image (crop_pct 1.0). ``crop_pct`` given: it is kept as given.
    """
    data_config = model.config.data_config
    channels = model.config.in_chans
    for flag, key, text in (("--mean", "mean", mean), ("--std", "std", std)):
        if text is not None:
            data_config[key] = _channel_values(text, flag, channels)
    if crop_pct is not None:
        if not 0.0 < crop_pct <= 1.0:
            raise UsageError(f"--crop_pct must be in (0, 1] (the centre-crop fraction), got {crop_pct}")
        data_config["crop_pct"] = crop_pct
        return None
    native = native_input_side(model)
    side = min(data_config["input_size"][1:])
    if image_size and native and side < native and data_config.get("crop_pct", 1.0) < 1.0:
        note = (f"crop_pct {data_config['crop_pct']} -> 1.0: input {side} px is below the backbone's native "
                f"{native} px, so the whole image is kept (pass --crop_pct to choose)")
        data_config["crop_pct"] = 1.0
        return note
    return None


__all__ = ["build_model", "override_preprocessing"]
