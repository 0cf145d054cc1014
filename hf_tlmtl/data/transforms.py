"""Images into tensors: timm's transforms for a model's data config (:func:`build_transforms`) and the RGB
conversion that scales 16-bit images instead of clipping them (:func:`rgb_image`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import timm.data
from PIL import Image as PILImage

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


SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of 16-bit grayscale images (PNG, TIFF); ``I`` is how Pillow opens some 16-bit PNGs."""


def rgb_image(image: PILImage.Image) -> PILImage.Image:
    """``image`` as 8-bit RGB, the way timm's transforms read it; 16-bit grayscale is scaled, not clipped.

    PIL's ``convert("RGB")`` clips a 16-bit image to its lowest 8 bits' range (every value above 255 becomes
    white), so the model would see another picture than the file holds. How each mode becomes RGB:

    - 16-bit grayscale (:data:`SIXTEEN_BIT_MODES`, values 0..65535): divided by 257 and rounded, the 8-bit
      picture of the same scene;
    - 32-bit float (``F``, TIFF): values in [0, 1] are scaled by 255; other values are taken as 0..255 and clipped;
    - everything else through PIL's ``convert("RGB")``: grayscale (``L``, ``1``) repeated over the channels,
      palette (``P``) looked up, ``RGBA`` / ``LA`` with the alpha channel dropped (not composited), ``CMYK`` / ``YCbCr``
      converted by PIL's formulas.

    Example:
        >>> import numpy as np
        >>> from PIL import Image
        >>> deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
        >>> np.asarray(rgb_image(deep))[0, :, 0].tolist(), np.asarray(deep.convert("RGB"))[0, :, 0].tolist()
        ([0, 128, 255], [0, 255, 255])
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 257.0
        elif values.size and np.nanmin(values) >= 0.0 and np.nanmax(values) <= 1.0:
            values = values * 255.0
        image = PILImage.fromarray(np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")
