"""FSDP2 (torch's ``fully_shard``) through recipes/finetune.py on CPU: 2 real processes, gloo.

Run A: ``accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml`` (accelerate's FSDP2,
sharded checkpoints), ``test_vit`` with ``transfer_strategy partial`` (stem and lower blocks frozen, top
blocks and heads train: FSDP2 with mixed ``requires_grad``), 2 processes x 4 images.
Run B: the same on one process x 8 images. ViT normalises per image (LayerNorm, no BatchNorm), so the
sharded run computes the mean gradient of the same 8 images: weights and eval metrics agree to float
rounding. TOLERANCE is 1e-4 absolute, as in the DDP test: the reduce-scatter sums in another order, and
Adam divides by the root of tiny second moments where a gradient is near zero (attention key biases get
none in exact arithmetic), so those weights differ by up to ~1e-5 (measured); the weights the runs
trained moved by ~7e-3, 70x more. Eval metrics agree to ~1e-7.
Run C: the Trainer's own ``--fsdp`` (FSDP2 by default) (2 processes, ``accelerate launch --multi_gpu``) resumes A's
sharded checkpoint-2 and ends on A's final weights.

The runs balance the two task losses with ``loss_balancing uncertainty``: learnable log-variances that live
outside the model. accelerate's FSDP2 ``prepare`` remaps only the model's parameters in the optimizer, and
torch's sharded optimizer checkpoint names only the model's: the trainer adds the balancer's group after
``prepare`` and keeps its optimizer state in ``balancer_optimizer.safetensors``. The log-variances of A and
B agree within LOG_VAR_TOLERANCE = 1e-6: their gradients are means of O(1) task losses (no near-zero Adam
denominators), measured ~2e-9 apart, while they moved ~2.5e-2 from their initial 0. C ends on A's
log-variances and balancer optimizer state bit for bit; without that optimizer state (Adam's moments, step
count and the group's scheduled learning rate) the log-variances end ~5e-3 away (measured).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_tlmtl.training.balancer_state import BALANCER_OPTIMIZER_NAME, BALANCER_WEIGHTS_NAME

from recipe_utils import assert_same_tensors, assert_same_training, FSDP2_CONFIG, TINY, TWO_CPU_PROCESSES, check_ok, run_finetune, run_launch, summary

COMMON = [
    *TINY,
    "--backbone", "test_vit", "--dataset", "shapes", "--n_train", "32", "--n_eval", "8", "--tasks", "shape,scale",
    "--transfer_strategy", "partial", "--trainable_groups", "3", "--learning_rate", "0.01",
    "--per_device_eval_batch_size", "4", "--loss_balancing", "uncertainty",
]
# 32 rows, global batch 8: 4 steps; checkpoints at 2 and 4.
TWO = [*COMMON, "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]
TOLERANCE = 1e-4
LOG_VAR_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    sharded, single, resumed = tmp / "fsdp", tmp / "one_process", tmp / "resumed"
    a = run_launch(FSDP2_CONFIG, TWO, sharded, tmp)
    check_ok(run_finetune([*COMMON, "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "2",
                           "--output_dir", single], tmp))
    (tmp / "sharded.json").write_text(json.dumps({"state_dict_type": "SHARDED_STATE_DICT"}))
    trainer_fsdp = ["--fsdp", "--fsdp_config", str(tmp / "sharded.json"),
                    "--resume_from_checkpoint", str(sharded / "checkpoint-2")]
    c = run_launch(TWO_CPU_PROCESSES, [*TWO, *trainer_fsdp], resumed, tmp)
    return sharded, single, resumed, a, c


def test_both_launchers_shard_with_fsdp2_over_timm_blocks(runs):
    sharded, _, resumed, a, c = runs
    for proc in (a, c):
        assert "sharding : FSDP2 over 2 processes, one unit per Block block; checkpoints SHARDED_STATE_DICT" in proc.stdout
    assert summary(sharded)["world_size"] == 2 and summary(resumed)["world_size"] == 2
    # A sharded checkpoint holds one shard file per process, no full weights file.
    shards = sorted(p.name for p in (sharded / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert not (sharded / "checkpoint-2" / "model.safetensors").exists()


def test_fsdp_weights_and_metrics_equal_one_process(runs):
    sharded, single, _, _, _ = runs
    a, b = assert_same_training(sharded, single, TOLERANCE), load_file(single / "model.safetensors")
    # The partial strategy held under sharding: the frozen stem and first block are bit-equal to the
    # one-process run's (which did not move them after its checkpoint-2); the top block and heads trained.
    halfway = load_file(single / "checkpoint-2" / "model.safetensors")
    frozen = [k for k in a if k.startswith(("backbone.patch_embed.", "backbone.blocks.0."))]
    trained = [k for k in a if k.startswith(("backbone.blocks.5.", "heads."))]
    assert frozen and trained
    assert all(torch.equal(a[k], b[k]) and torch.equal(b[k], halfway[k]) for k in frozen)
    assert all(not torch.equal(b[k], halfway[k]) for k in trained)


def test_final_model_loads_on_one_process(runs):
    import transformers

    import hf_tlmtl  # noqa: F401

    sharded, _, _, _, _ = runs
    model = transformers.AutoModel.from_pretrained(sharded)
    assert model.task_names == ["shape", "scale"]
    saved = load_file(sharded / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_resume_from_sharded_checkpoint_ends_on_the_same_weights(runs):
    sharded, _, resumed, _, _ = runs
    assert summary(resumed)["resumed_from"].endswith("checkpoint-2")
    assert_same_tensors(resumed, sharded)


def test_balancer_optimizer_state_is_kept_beside_the_sharded_optimizer(runs):
    sharded, single, _, _, _ = runs
    checkpoint = sharded / "checkpoint-2"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / BALANCER_WEIGHTS_NAME).is_file()
    with safe_open(checkpoint / BALANCER_OPTIMIZER_NAME, framework="pt") as f:
        keys = set(f.keys())
    assert keys == {f"log_vars.{task}/{key}" for task in ("shape", "scale") for key in ("exp_avg", "exp_avg_sq", "step")}
    # Without FSDP the Trainer's optimizer file holds that state, as before.
    assert not (single / "checkpoint-2" / BALANCER_OPTIMIZER_NAME).exists()


def test_fsdp_log_variances_equal_one_process(runs):
    sharded, single, _, _, _ = runs
    for step in (2, 4):
        var_a = load_file(sharded / f"checkpoint-{step}" / BALANCER_WEIGHTS_NAME)
        var_b = load_file(single / f"checkpoint-{step}" / BALANCER_WEIGHTS_NAME)
        assert sorted(var_a) == ["log_vars.scale", "log_vars.shape"]
        for key in var_a:
            torch.testing.assert_close(var_a[key], var_b[key], rtol=0, atol=LOG_VAR_TOLERANCE, msg=f"step {step} {key}")
            assert abs(float(var_a[key])) > 1000 * LOG_VAR_TOLERANCE, f"{key} did not train"


def test_resume_restores_the_balancer_and_its_optimizer_state(runs):
    sharded, _, resumed, _, _ = runs
    for name in (f"checkpoint-4/{BALANCER_WEIGHTS_NAME}", f"checkpoint-4/{BALANCER_OPTIMIZER_NAME}"):
        assert_same_tensors(resumed, sharded, name)
