"""A real ``accelerate launch --multi_gpu --num_processes 2`` of recipes/finetune.py on CPU (gloo).

Compared with one process at the same global batch (2 x 4 = 1 x 8), same seed and data order.
The backbone is frozen (``feature_extraction``: BatchNorm too), so the data-parallel run computes
the same mean gradient as the single process and its eval metrics agree to float rounding
(tolerance 1e-4 absolute). With a BatchNorm backbone that trains, each process normalises its own
4 images instead of 8: close, not equal, which is why this comparison freezes it. Augmentation is
on: it is seeded per row (run seed, epoch, row), so both processes crop every row as the single
process does.

The data-parallel run is launched with the shipped ``recipes/configs/accelerate/multi_cpu_ddp.yaml``, the
resumed one with the equivalent command-line flags. A second 2-process run is killed (SIGKILL, launcher and workers) after its first checkpoint and
resumed: it ends with exactly the weights of the uninterrupted 2-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from recipe_utils import assert_same_tensors, ACCELERATE_CONFIGS, TINY, TWO_CPU_PROCESSES, check_ok, launch_command, recipe_env, run_finetune, summary

COMMON = [
    *TINY,
    "--dataset", "shapes", "--n_train", "64", "--n_eval", "16", "--tasks", "shape,scale,marks",
    "--augment", "true", "--transfer_strategy", "feature_extraction", "--learning_rate", "0.02",
    "--num_train_epochs", "2", "--per_device_eval_batch_size", "4",
]
# 16 steps; checkpoints at 4, 8, 12 and 16 (the killed run is stopped after checkpoint-4).
TWO_PROCESSES = [*COMMON, "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "4"]
TOLERANCE = 1e-4


# The shipped config README gives for N CPU processes: the same launch as TWO_CPU_PROCESSES.
MULTI_CPU_CONFIG = ["--config_file", str(ACCELERATE_CONFIGS / "multi_cpu_ddp.yaml")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    two = tmp / "two_processes"
    distributed = subprocess.run(launch_command(MULTI_CPU_CONFIG, TWO_PROCESSES, two), cwd=tmp, env=recipe_env(tmp), capture_output=True,
                                 text=True, timeout=300)
    check_ok(distributed)
    one = tmp / "one_process"
    check_ok(run_finetune([*COMMON, "--per_device_train_batch_size", "8", "--output_dir", one], tmp))
    return two, one, distributed


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """TWO_PROCESSES again, killed after checkpoint-4, then resumed with --resume_from_checkpoint true."""
    tmp = tmp_path_factory.mktemp("distributed_resume")
    killed = tmp / "killed"
    proc = subprocess.Popen(launch_command(TWO_CPU_PROCESSES, TWO_PROCESSES, killed), cwd=tmp, env=recipe_env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not (killed / "checkpoint-4" / "trainer_state.json").is_file():
            assert proc.poll() is None, "the 2-process run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        finished_early = (killed / "model.safetensors").exists()
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    finally:
        proc.wait()
    assert not finished_early
    launch = launch_command(TWO_CPU_PROCESSES, [*TWO_PROCESSES, "--resume_from_checkpoint", "true"], killed)
    check_ok(subprocess.run(launch, cwd=tmp, env=recipe_env(tmp), capture_output=True, text=True, timeout=300))
    return killed


def test_two_processes_trained_data_parallel(runs):
    two, one, _ = runs
    info = summary(two)
    assert info["world_size"] == 2 and info["written_by_process"] == 0
    steps = json.loads((two / "trainer_state.json").read_text())["global_step"]
    # 64 rows, global batch 8, 2 epochs: 16 steps (two lone processes would have made 32 each).
    assert steps == json.loads((one / "trainer_state.json").read_text())["global_step"] == 16


def test_only_the_main_process_wrote(runs):
    two, _, proc = runs
    assert proc.stdout.count("== hf_tlmtl finetune ==") == 1
    assert proc.stdout.count("== Results on the validation split") == 1
    assert "global batch 8 (2 process(es) x 4)" in proc.stdout
    names = sorted(p.name for p in two.iterdir() if not p.name.startswith("checkpoint-"))
    assert names == sorted(
        ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "trainer_state.json",
         "training_args.bin", "training_curves.png", "training_summary.json"]
    )


def test_saved_model_loads_and_matches_one_process_run(runs):
    import transformers

    import hf_tlmtl  # noqa: F401

    two, one, _ = runs
    model = transformers.AutoModel.from_pretrained(two)
    assert model.task_names == ["shape", "scale", "marks"]
    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=TOLERANCE, msg=key)
    eval_two, eval_one = summary(two)["eval"], summary(one)["eval"]
    compared = [k for k in eval_one if k.startswith("eval_") and k.split("_")[1] in ("loss", "shape", "scale", "marks")]
    assert len(compared) >= 8
    for key in compared:
        assert eval_two[key] == pytest.approx(eval_one[key], abs=TOLERANCE), key



def test_two_process_resume_with_augmentation_is_exact(runs, resumed):
    two, _, _ = runs
    info = summary(resumed)
    assert info["world_size"] == 2 and "checkpoint-" in info["resumed_from"]
    got = assert_same_tensors(resumed, two)
    first = load_file(resumed / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(first[k], got[k]) for k in first)  # training went on after the checkpoint
