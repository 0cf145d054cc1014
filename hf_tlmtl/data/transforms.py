"""Images into tensors: timm's transforms for a model's data config (:func:`build_transforms`); images become RGB
through :func:`hf_tlmtl.image_processing.rgb_image`, which scales 16-bit images instead of clipping them.
"""

from __future__ import annotations

from typing import Any, Callable

import timm.data

from ..configuration import TimmMultiTaskConfig

# timm's default RandomResizedCrop keeps as little as 8% of the image (ImageNet at 224 px);
# small images lose the object at that zoom, so training crops keep at least 35% by default.
DEFAULT_TRAIN_SCALE = (0.35, 1.0)


_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def as_config(config: Any) -> TimmMultiTaskConfig:
    """Accept a config or anything carrying one (the model)."""
    config = getattr(config, "config", config)
    if not isinstance(config, TimmMultiTaskConfig):
        raise ValueError(
            f"Expected a TimmMultiTaskConfig (or a TimmMultiTaskModel), got {type(config).__name__}; "
            "pass model.config."
        )
    return config


def build_transforms(config: TimmMultiTaskConfig, train: bool, **timm_overrides: Any) -> Callable:
    """timm's train or eval transform for the model's data config (input size, mean, std, crop).

    ``train=True`` gives timm's standard augmentation (random resized crop, horizontal flip,
    colour jitter; crop scale floor raised to :data:`DEFAULT_TRAIN_SCALE`); ``train=False``
    gives the deterministic resize + centre crop the model is evaluated with. Any keyword of
    ``timm.data.create_transform`` overrides (``scale=(1.0, 1.0)``, ``hflip=0.0``,
    ``auto_augment="rand-m9-mstd0.5"`` ...). Geometric augmentation changes geometric labels
    (size, rotation, position): for such regression tasks pass ``scale=(1, 1), ratio=(1, 1),
    hflip=0.0`` or train on the eval transform.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")],
        ...                                          image_size=32)
        >>> from PIL import Image
        >>> build_transforms(model.config, train=False)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    config = as_config(config)
    data_config = config.data_config or {}
    if "input_size" not in data_config:
        raise ValueError(
            "The model config has no data_config['input_size']; build the model with "
            "TimmMultiTaskModel.from_backbone(...), which resolves timm's data config."
        )
    kwargs: dict[str, Any] = {k: data_config[k] for k in _TRANSFORM_KEYS if data_config.get(k) is not None}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    for key in ("mean", "std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if train:
        kwargs["scale"] = DEFAULT_TRAIN_SCALE
    kwargs.update(timm_overrides)
    return timm.data.create_transform(is_training=train, **kwargs)
