"""Folders saved before the package was re-laid out (issue 22) still load, and give the outputs they gave then.

``tests/fixtures/saved_by_0.1.0`` was written by hf_tlmtl 0.1.0 as of commit 656b99f (the flat layout):
a truncated ``test_resnet`` with frozen BatchNorm and three task types, a ``test_vit`` base model, and a
LoRA adapter on it; beside each, the inputs and the logits it produced in eval mode.
"""

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hf_tlmtl  # noqa: F401  (registers the Auto classes)
from hf_tlmtl import TimmMultiTaskModel
from hf_tlmtl.adapters import load_adapter

SAVED = Path(__file__).parent / "fixtures" / "saved_by_0.1.0"


def _expected(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tensors = load_file(SAVED / f"{name}_expected.safetensors")
    logits = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith("logits.")}
    return tensors["pixel_values"], logits


def test_a_model_saved_by_the_flat_layout_loads_with_automodel_and_gives_the_same_logits():
    model = transformers.AutoModel.from_pretrained(SAVED / "model").eval()
    assert isinstance(model, TimmMultiTaskModel)
    assert model.config.truncate_stage == 3 and model.config.bn_policy == "frozen"
    assert [t.name for t in model.tasks] == ["shape", "scale", "attrs"]
    pixels, expected = _expected("model")
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert set(logits) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(logits[name], value, rtol=0, atol=1e-6)


def test_its_image_processor_loads_with_autoimageprocessor():
    processor = transformers.AutoImageProcessor.from_pretrained(SAVED / "model")
    config = TimmMultiTaskModel.config_class.from_pretrained(SAVED / "model")
    assert list(processor.data_config["input_size"]) == list(config.data_config["input_size"]) == [3, 32, 32]


@pytest.mark.parametrize("adapter_name", ["default", "digits"])
def test_an_adapter_saved_by_the_flat_layout_loads_onto_its_base_and_gives_the_same_logits(adapter_name):
    base = TimmMultiTaskModel.from_pretrained(SAVED / "vit_base")
    model = load_adapter(base, SAVED / "vit_adapter", adapter_name=adapter_name).eval()
    assert model.active_adapter == adapter_name
    pixels, expected = _expected("vit_adapter")
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(logits["digit"], expected["digit"], rtol=0, atol=1e-6)
    with torch.no_grad():  # the adapter is not a no-op: without it the logits differ
        plain = TimmMultiTaskModel.from_pretrained(SAVED / "vit_base").eval()(pixel_values=pixels).logits["digit"]
    assert (plain - expected["digit"]).abs().max() > 1e-3
