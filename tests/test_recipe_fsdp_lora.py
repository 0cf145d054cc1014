"""LoRA under FSDP2 through recipes/finetune.py on CPU: 2 real processes, gloo.

Run A: ``accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml``, ``test_vit`` with
``transfer_strategy lora`` (r=4 on every Linear of the backbone, heads as ``modules_to_save``), 2 processes x 4
images, sharded checkpoints every 2 steps. The final save gathers the shards and saves the adapter and the
merged model from a one-process copy (``hf_tlmtl.adapters.unsharded_copy``).
Run B: the same on one process x 8 images. ViT has no BatchNorm, so both runs compute the mean gradient of
the same 8 images. TOLERANCE is 1e-4, as in test_recipe_fsdp.py (the reduce-scatter sums in another order,
Adam divides by the root of tiny second moments); measured: the merged weights differ by ~1e-6 and the
adapter tensors by ~2e-6, while the adapter's update to the merged weights reaches ~4e-2.
Run C: the Trainer's own ``--fsdp`` (2 processes, ``accelerate launch --multi_gpu``) resumes A's sharded
checkpoint-2 (adapter and heads only: the base is rebuilt from the seed) and ends on A's final weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from recipe_utils import assert_same_tensors, assert_same_training, FSDP2_CONFIG, TINY, TWO_CPU_PROCESSES, check_ok, run_finetune, run_launch, summary

COMMON = [
    *TINY,
    "--backbone", "test_vit", "--dataset", "shapes", "--n_train", "32", "--n_eval", "8", "--tasks", "shape,scale",
    "--transfer_strategy", "lora", "--lora_r", "4", "--learning_rate", "0.01", "--per_device_eval_batch_size", "4",
]
# 32 rows, global batch 8: 4 steps; sharded checkpoints at 2 and 4.
TWO = [*COMMON, "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]
TOLERANCE = 1e-4
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    sharded, single, resumed = tmp / "fsdp", tmp / "one_process", tmp / "resumed"
    a = run_launch(FSDP2_CONFIG, TWO, sharded, tmp)
    check_ok(run_finetune([*COMMON, "--per_device_train_batch_size", "8", "--output_dir", single], tmp))
    (tmp / "sharded.json").write_text(json.dumps({"state_dict_type": "SHARDED_STATE_DICT"}))
    trainer_fsdp = ["--fsdp", "--fsdp_config", str(tmp / "sharded.json"),
                    "--resume_from_checkpoint", str(sharded / "checkpoint-2")]
    c = run_launch(TWO_CPU_PROCESSES, [*TWO, *trainer_fsdp], resumed, tmp)
    return sharded, single, resumed, a, c


def _adapter_config(run) -> dict:
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # peft writes a set: its order varies per process
    return config


def test_fsdp_lora_run_shards_and_writes_adapter_and_merged_model(runs):
    sharded, _, _, a, _ = runs
    assert "strategy lora" in a.stdout
    assert "sharding : FSDP2 over 2 processes, one unit per Block block; checkpoints SHARDED_STATE_DICT" in a.stdout
    assert summary(sharded)["world_size"] == 2
    shards = sorted(p.name for p in (sharded / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (sharded / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (sharded / "model.safetensors").is_file() and (sharded / "config.json").is_file()


def test_fsdp_lora_adapter_merged_weights_and_metrics_equal_one_process(runs):
    sharded, single, _, _, _ = runs
    assert _adapter_config(sharded) == _adapter_config(single)
    assert _adapter_config(sharded)["r"] == 4
    adapter_a = load_file(sharded / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(single / "adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    assert any(".lora_A." in k for k in adapter_a) and any(".heads." in k for k in adapter_a)
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=0, atol=TOLERANCE, msg=key)
    # The adapter trained: lora_B starts at zero and moved far past the tolerance.
    assert max(v.abs().max().item() for k, v in adapter_a.items() if ".lora_B." in k) > 10 * TOLERANCE

    assert_same_training(sharded, single, TOLERANCE)  # the merged weights and the eval metrics


def test_merged_model_loads_on_one_process_without_adapter_weights(runs):
    import transformers

    import hf_tlmtl  # noqa: F401

    sharded, _, _, _, _ = runs
    model = transformers.AutoModel.from_pretrained(sharded)
    assert type(model).__name__ == "TimmMultiTaskModel" and model.task_names == ["shape", "scale"]
    state = model.state_dict()
    assert not any(mark in k for k in state for mark in ("lora", "base_layer", "modules_to_save"))
    saved = load_file(sharded / "model.safetensors")
    assert state.keys() == saved.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, saved[name]), name


def test_lora_left_the_backbone_at_its_initial_weights(runs):
    """Merged = initial weights + the adapter's update (alpha / r * B @ A) on the adapted layers, and exactly the
    initial weights everywhere else in the backbone: FSDP did not train the frozen base."""
    from transformers import AutoConfig, set_seed

    from hf_tlmtl import TimmMultiTaskModel

    sharded, _, _, _, _ = runs
    set_seed(0)  # what the recipe does (--seed 0) before it builds the randomly initialised model
    tasks = AutoConfig.from_pretrained(sharded).task_specs
    initial = TimmMultiTaskModel.from_backbone("test_vit", tasks, img_size=32).state_dict()
    merged = load_file(sharded / "model.safetensors")
    adapter = load_file(sharded / "adapter" / "adapter_model.safetensors")
    config = _adapter_config(sharded)
    scale = config["lora_alpha"] / config["r"]
    adapted = {k.removeprefix(PREFIX).split(".lora_A.")[0] for k in adapter if ".lora_A." in k}
    assert len(adapted) == 24  # qkv, proj, fc1, fc2 of 6 blocks
    untouched = [k for k in initial if k.startswith("backbone.") and k.rsplit(".", 1)[0] not in adapted]
    assert untouched and all(torch.equal(merged[k], initial[k]) for k in untouched)
    for layer in adapted:
        update = scale * adapter[f"{PREFIX}{layer}.lora_B.weight"] @ adapter[f"{PREFIX}{layer}.lora_A.weight"]
        torch.testing.assert_close(merged[f"{layer}.weight"] - update, initial[f"{layer}.weight"], rtol=0, atol=1e-6,
                                   msg=layer)
        assert torch.equal(merged[f"{layer}.bias"], initial[f"{layer}.bias"]), layer  # LoRA leaves biases alone


def test_resume_from_sharded_lora_checkpoint_ends_on_the_same_weights(runs):
    sharded, _, resumed, _, c = runs
    assert "sharding : FSDP2 over 2 processes" in c.stdout
    assert summary(resumed)["resumed_from"].endswith("checkpoint-2")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert_same_tensors(resumed, sharded, name)
