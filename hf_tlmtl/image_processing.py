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
"""

from __future__ import annotations

import os
from typing import Any

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


__all__ = ["TimmMultiTaskImageProcessor"]
