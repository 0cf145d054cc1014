"""AutoImageProcessor for saved hf_tlmtl models: exactly the model's eval transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl import TaskSpec, TimmMultiTaskImageProcessor, TimmMultiTaskModel
from hf_tlmtl.data import build_transforms

TASKS = [TaskSpec(name="shape", type="classification", num_labels=3), TaskSpec(name="size", type="regression")]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A model with timm's resolved data config, and one whose data config differs in every key."""
    default = TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=40)
    custom = TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=40)
    custom.config.data_config = {
        "input_size": [3, 36, 44],
        "interpolation": "bicubic",
        "mean": [0.4, 0.3, 0.2],
        "std": [0.2, 0.25, 0.3],
        "crop_pct": 0.8,
        "crop_mode": "squash",
    }
    dirs = {}
    for name, model in (("default", default), ("custom", custom)):
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs, {"default": default.config, "custom": custom.config}


@pytest.mark.parametrize("which", ["default", "custom"])
def test_auto_image_processor_equals_eval_transform(saved_models, which):
    dirs, configs = saved_models
    processor = AutoImageProcessor.from_pretrained(dirs[which])
    assert type(processor) is TimmMultiTaskImageProcessor
    eval_transform = build_transforms(configs[which], train=False)
    images = [_image(0, (57, 43)), _image(1, (30, 70))]  # non-square, one smaller than the input size

    single = processor(images[0], return_tensors="pt")["pixel_values"]
    batch = processor(images, return_tensors="pt")["pixel_values"]

    expected = torch.stack([eval_transform(image) for image in images])
    assert single.shape == (1, *configs[which].data_config["input_size"])
    assert torch.equal(single[0], expected[0])
    assert torch.equal(batch, expected)


def test_save_pretrained_writes_preprocessor_config(saved_models):
    dirs, configs = saved_models
    saved = json.loads((dirs["custom"] / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "TimmMultiTaskImageProcessor"
    assert saved["data_config"]["interpolation"] == "bicubic"
    assert saved["data_config"]["crop_pct"] == 0.8
    assert list(saved["data_config"]["input_size"]) == [3, 36, 44]


def test_processor_round_trips_through_its_own_save(saved_models, tmp_path):
    dirs, configs = saved_models
    processor = TimmMultiTaskImageProcessor.from_config(configs["custom"])
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    image = _image(3, (50, 50))
    assert torch.equal(reloaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_processor_without_input_size_is_refused():
    with pytest.raises(ValueError, match="input_size"):
        TimmMultiTaskImageProcessor(data_config={"mean": [0.5, 0.5, 0.5]})
