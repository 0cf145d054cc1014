"""Kill and resume: a run stopped by SIGKILL after its first checkpoint, resumed with
``--resume_from_checkpoint true``, ends with exactly the weights of an uninterrupted run (same seed),
augmentation on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from recipe_utils import assert_same_tensors, FINETUNE, TINY, check_ok, recipe_env, run_finetune, summary

# 64 rows / batch 4 = 16 steps per epoch, 2 epochs, a checkpoint every 4 steps. Augmentation is on:
# it is seeded per row (run seed, epoch, row index) and leaves the global random state alone, so the
# batch accelerate prefetches before a checkpoint gets the same crops in the resumed run.
RUN = [
    *TINY,
    "--augment", "true",
    "--dataset", "shapes", "--n_train", "64", "--n_eval", "16", "--tasks", "shape,scale",
    "--per_device_train_batch_size", "4", "--num_train_epochs", "2",
    "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "4",
]
FIRST_CHECKPOINT = "checkpoint-4"
TOTAL_STEPS = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    reference = tmp / "reference"
    check_ok(run_finetune([*RUN, "--output_dir", reference], tmp))

    killed = tmp / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(FINETUNE), *map(str, RUN), "--output_dir", str(killed)],
        cwd=tmp, env=recipe_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while not (killed / FIRST_CHECKPOINT / "trainer_state.json").is_file():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert still_running, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    interrupted = {
        "model_written": (killed / "model.safetensors").exists(),
        "checkpoints": sorted(p.name for p in killed.glob("checkpoint-*")),
    }
    resumed = check_ok(run_finetune([*RUN, "--output_dir", killed, "--resume_from_checkpoint", "true"], tmp))
    return reference, killed, interrupted, resumed


def test_killed_run_left_a_checkpoint_and_no_final_model(runs):
    _, _, interrupted, _ = runs
    assert not interrupted["model_written"]
    assert FIRST_CHECKPOINT in interrupted["checkpoints"]
    assert f"checkpoint-{TOTAL_STEPS}" not in interrupted["checkpoints"]


def test_resumed_run_matches_uninterrupted_weights(runs):
    reference, killed, _, resumed = runs
    assert "resume   : from " in resumed.stdout
    info = summary(killed)
    assert info["resumed_from"] and "checkpoint-" in info["resumed_from"]
    assert info["train"]["epoch"] == pytest.approx(2.0)
    got = assert_same_tensors(killed, reference)
    assert summary(reference)["eval"]["eval_loss"] == info["eval"]["eval_loss"]
    # ... and training after the checkpoint did move them (the comparison is not vacuous).
    first = load_file(killed / FIRST_CHECKPOINT / "model.safetensors")
    moved = [k for k in first if first[k].is_floating_point() and not torch.allclose(first[k], got[k], atol=1e-4)]
    assert len(moved) > len(first) // 3


def test_overwrite_output_dir_replaces_a_previous_run(runs, tmp_path):
    """--overwrite_output_dir true starts over: old checkpoints go, files not written by a run stay."""
    _, killed, _, _ = runs
    import shutil

    out = tmp_path / "again"
    shutil.copytree(killed, out)
    (out / "notes.txt").write_text("mine")
    stale = out / "checkpoint-999"
    stale.mkdir()
    check_ok(run_finetune([*TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8", "--tasks", "shape",
                           "--output_dir", out, "--overwrite_output_dir", "true"], tmp_path))
    assert (out / "notes.txt").read_text() == "mine"
    assert not stale.exists() and not list(out.glob("checkpoint-*"))
    assert not (out / ".previous-run").exists()  # set aside during the run, deleted once the new model was saved
    assert [t["name"] for t in summary(out)["tasks"]] == ["shape"]
