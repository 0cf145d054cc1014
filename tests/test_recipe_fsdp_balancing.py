"""A learnable loss balancer (``loss_balancing uncertainty``) under FSDP2 on CPU: 2 real processes, gloo.

The balancer's log-variances live outside the model. accelerate's FSDP2 ``prepare`` remaps only the model's
parameters in the optimizer, and torch's sharded optimizer checkpoint names only the model's: the trainer
adds the balancer's group after ``prepare`` and keeps its optimizer state in ``balancer_optimizer.safetensors``.

Run A: ``accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml``, ``test_vit`` (LayerNorm: a
process's batch of 4 normalises as the same 4 images in a batch of 8), 2 processes x 4 images, sharded
checkpoints at steps 2 and 4.
Run B: the same on one process x 8 images (no FSDP). Weights agree within TOLERANCE = 1e-4, as in
test_recipe_fsdp.py (reduce-scatter order, Adam on near-zero gradients; measured ~3e-5 here), and the two
log-variances within LOG_VAR_TOLERANCE = 1e-6: their gradients are means of O(1) task losses (no near-zero
Adam denominators), measured ~2e-9 apart, while they moved ~2.5e-2 from their initial 0.
Run C: A resumed from its sharded checkpoint-2 (same launcher) ends on A's weights, log-variances and
balancer optimizer state, bit for bit. Without the balancer's optimizer state (Adam's moments, step count and
the group's scheduled learning rate) the log-variances end ~5e-3 away (measured), so equality tests it.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_tlmtl.balancing import BALANCER_OPTIMIZER_NAME, BALANCER_WEIGHTS_NAME
from recipe_utils import ACCELERATE, FINETUNE, REPO, TINY, check_ok, recipe_env, run_finetune, summary

FSDP_CONFIG = REPO / "recipes" / "configs" / "accelerate" / "fsdp2.yaml"
COMMON = [
    *TINY,
    "--backbone", "test_vit", "--dataset", "shapes", "--n_train", "32", "--n_eval", "8", "--tasks", "shape,scale",
    "--transfer_strategy", "partial", "--trainable_groups", "3", "--learning_rate", "0.01",
    "--per_device_eval_batch_size", "4", "--loss_balancing", "uncertainty",
    # 32 rows, global batch 8: 4 steps; checkpoints at 2 and 4.
    "--save_strategy", "steps", "--save_steps", "2",
]
TWO = [*COMMON, "--per_device_train_batch_size", "4"]
TOLERANCE = 1e-4
LOG_VAR_TOLERANCE = 1e-6


def _launch(args: list, output_dir) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(FSDP_CONFIG), "--main_process_port", "0", str(FINETUNE),
            *map(str, args), "--output_dir", str(output_dir)]


def _run(cmd: list[str], tmp) -> subprocess.CompletedProcess:
    return check_ok(subprocess.run(cmd, cwd=tmp, env=recipe_env(tmp), capture_output=True, text=True, timeout=300))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_balancing")
    sharded, single, resumed = tmp / "fsdp", tmp / "one_process", tmp / "resumed"
    _run(_launch(TWO, sharded), tmp)
    check_ok(run_finetune([*COMMON, "--per_device_train_batch_size", "8", "--output_dir", single], tmp))
    _run(_launch([*TWO, "--resume_from_checkpoint", sharded / "checkpoint-2"], resumed), tmp)
    return sharded, single, resumed


def test_balancer_optimizer_state_is_kept_beside_the_sharded_optimizer(runs):
    sharded, single, _ = runs
    checkpoint = sharded / "checkpoint-2"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / BALANCER_WEIGHTS_NAME).is_file()
    with safe_open(checkpoint / BALANCER_OPTIMIZER_NAME, framework="pt") as f:
        keys = set(f.keys())
    assert keys == {f"log_vars.{task}/{key}" for task in ("shape", "scale") for key in ("exp_avg", "exp_avg_sq", "step")}
    # Without FSDP the Trainer's optimizer file holds that state, as before.
    assert not (single / "checkpoint-2" / BALANCER_OPTIMIZER_NAME).exists()


def test_fsdp_weights_and_log_variances_equal_one_process(runs):
    sharded, single, _ = runs
    assert summary(sharded)["world_size"] == 2 and summary(single)["world_size"] == 1
    a, b = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOLERANCE, msg=key)
    for step in (2, 4):
        var_a = load_file(sharded / f"checkpoint-{step}" / BALANCER_WEIGHTS_NAME)
        var_b = load_file(single / f"checkpoint-{step}" / BALANCER_WEIGHTS_NAME)
        assert sorted(var_a) == ["log_vars.scale", "log_vars.shape"]
        for key in var_a:
            torch.testing.assert_close(var_a[key], var_b[key], rtol=0, atol=LOG_VAR_TOLERANCE, msg=f"step {step} {key}")
            assert abs(float(var_a[key])) > 1000 * LOG_VAR_TOLERANCE, f"{key} did not train"


def test_resume_from_sharded_checkpoint_ends_on_the_same_weights_and_balancer(runs):
    sharded, _, resumed = runs
    assert summary(resumed)["resumed_from"].endswith("checkpoint-2")
    for name in ("model.safetensors", f"checkpoint-4/{BALANCER_WEIGHTS_NAME}", f"checkpoint-4/{BALANCER_OPTIMIZER_NAME}"):
        expected, got = load_file(sharded / name), load_file(resumed / name)
        assert expected.keys() == got.keys(), name
        different = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
