"""The image processor of :class:`~hf_tlmtl.TimmMultiTaskModel`: timm's eval transform for its data config.

transformers' ``TimmWrapperImageProcessor`` already turns a timm data config into timm's
transforms and preprocesses PIL images, arrays and tensors with them. It reads that config
from a timm ``pretrained_cfg`` inside ``config.json``; this subclass reads the resolved
``data_config`` of a :class:`~hf_tlmtl.TimmMultiTaskConfig` instead and saves itself as a
regular ``preprocessor_config.json``, so ``AutoImageProcessor.from_pretrained(model_dir)``
works for saved models (``TimmMultiTaskModel.save_pretrained`` writes the file).

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> from transformers import AutoImageProcessor
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
    >>> d = tempfile.mkdtemp(); model.save_pretrained(d)
    >>> processor = AutoImageProcessor.from_pretrained(d)
    >>> type(processor).__name__, processor(Image.new("RGB", (40, 50)))["pixel_values"].shape
    ('TimmMultiTaskImageProcessor', torch.Size([1, 3, 32, 32]))

:func:`rgb_image` is how every image becomes RGB, in training and in the pipeline: 16-bit and float images are
scaled, not clipped.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image as PILImage
from transformers import TimmWrapperImageProcessor
from transformers.image_processing_base import ImageProcessingMixin
from transformers.utils import IMAGE_PROCESSOR_NAME

from .configuration import TimmMultiTaskConfig


class TimmMultiTaskImageProcessor(TimmWrapperImageProcessor):
    """timm's eval (and train) transform for a :class:`~hf_tlmtl.TimmMultiTaskConfig`'s ``data_config``.

    ``processor(images)["pixel_values"]`` equals ``hf_tlmtl.data.build_transforms(config,
    train=False)`` applied to each image; ``processor.train_transforms`` is timm's default
    training augmentation for the same config.

    Args:
        data_config: timm data config (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``, ``crop_mode``), as stored in ``TimmMultiTaskConfig.data_config``.
        architecture: The timm architecture, for information.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=40)
        >>> TimmMultiTaskImageProcessor.from_config(model.config).data_config["input_size"]
        (3, 40, 40)
    """

    def __init__(self, data_config: dict[str, Any], architecture: str | None = None, **kwargs: Any):
        if not data_config or "input_size" not in data_config:
            raise ValueError(
                "TimmMultiTaskImageProcessor needs a timm data config with 'input_size' (and mean/std); build the "
                "model with TimmMultiTaskModel.from_backbone(...), which resolves it, and use "
                "TimmMultiTaskImageProcessor.from_config(model.config)."
            )
        size = data_config["input_size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(
                f"data_config['input_size'] must be [channels, height, width] of positive whole numbers, got {size!r}; "
                "fix preprocessor_config.json (or config.json's data_config), or save the model again."
            )
        # timm.data.resolve_data_config reads the same keys from a pretrained_cfg as from a data config.
        super().__init__(pretrained_cfg=dict(data_config), architecture=architecture)

    @classmethod
    def from_config(cls, config: TimmMultiTaskConfig) -> "TimmMultiTaskImageProcessor":
        """The processor for a model's config (or a model: its ``.config`` is used)."""
        config = getattr(config, "config", config)
        if not isinstance(config, TimmMultiTaskConfig):
            raise ValueError(f"Expected a TimmMultiTaskConfig (or a TimmMultiTaskModel), got {type(config).__name__}.")
        return cls(data_config=config.data_config, architecture=config.backbone)

    @classmethod
    def get_image_processor_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # The parent reads a timm config.json; this processor has its own preprocessor_config.json.
        kwargs.setdefault("image_processor_filename", IMAGE_PROCESSOR_NAME)
        return super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Write ``preprocessor_config.json`` (the parent disables saving: timm keeps it in ``config.json``)."""
        return ImageProcessingMixin.save_pretrained(self, save_directory, push_to_hub=push_to_hub, **kwargs)


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


__all__ = ["SIXTEEN_BIT_MODES", "TimmMultiTaskImageProcessor", "rgb_image"]
