"""FSDP2 with full checkpoints (``FULL_STATE_DICT``) and ``bn='recalibrate'``: 2 real processes on CPU, gloo.

Run A: the Trainer's own ``--fsdp`` with ``fsdp_config {"state_dict_type": "FULL_STATE_DICT"}``,
``test_resnet`` (BatchNorm) fine-tuned with ``bn recalibrate``, 2 processes x 4 images, checkpoints at
steps 2 and 4. Run B resumes A's full checkpoint-2 on 2 processes.

- A full checkpoint is one ``model.safetensors`` that loads on one process (no per-process shards).
- Resuming it ends on exactly A's final weights.
- Recalibration under sharding: the stem's parameters belong to FSDP's root unit, so the statistics pass
  runs through the whole model there. The saved running statistics equal those that one process
  recalibrates from the same final weights over the same training rows (augmentation is off, so the
  training transform is deterministic).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from recipe_utils import assert_same_tensors, TINY, TWO_CPU_PROCESSES, run_launch, summary

ARGS = [
    *TINY,
    "--dataset", "shapes", "--n_train", "32", "--n_eval", "8", "--tasks", "shape,scale",
    "--transfer_strategy", "fine_tune", "--bn", "recalibrate", "--augment", "false", "--learning_rate", "0.01",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
    "--save_strategy", "steps", "--save_steps", "2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_full")
    config = tmp / "full.json"
    config.write_text(json.dumps({"state_dict_type": "FULL_STATE_DICT"}))
    full, resumed = tmp / "full", tmp / "resumed"
    trainer_fsdp = ["--fsdp", "--fsdp_config", str(config)]
    a = run_launch(TWO_CPU_PROCESSES, [*ARGS, *trainer_fsdp], full, tmp)
    run_launch(TWO_CPU_PROCESSES, [*ARGS, *trainer_fsdp, "--resume_from_checkpoint", full / "checkpoint-2"], resumed, tmp)
    return full, resumed, a


def test_full_checkpoint_is_one_safetensors_file_that_loads_on_one_process(runs):
    import transformers

    import hf_tlmtl  # noqa: F401

    full, _, a = runs
    assert "sharding : FSDP2 over 2 processes, one unit per BasicBlock, Bottleneck block; checkpoints FULL_STATE_DICT" in a.stdout
    assert "BatchNorm recalibrate" in a.stdout
    checkpoint = full / "checkpoint-2"
    assert not list(checkpoint.rglob("*.distcp"))
    saved = load_file(checkpoint / "model.safetensors")
    model = transformers.AutoModel.from_pretrained(checkpoint)
    assert model.task_names == ["shape", "scale"]
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())
    # Checkpoint-2 is halfway: the final weights moved on from it.
    final = load_file(full / "model.safetensors")
    assert any(not torch.equal(final[k], saved[k]) for k in final if k.endswith("conv1.weight"))


def test_resume_from_full_checkpoint_ends_on_the_same_weights(runs):
    full, resumed, _ = runs
    assert summary(resumed)["resumed_from"].endswith("checkpoint-2") and summary(resumed)["world_size"] == 2
    assert_same_tensors(resumed, full)


def test_recalibrated_statistics_under_fsdp_equal_one_process_recalibration(runs):
    import transformers

    import hf_tlmtl  # noqa: F401
    from hf_tlmtl.transfer.batch_norm import batch_norm_layers, recalibrate_batch_norm
    from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
    from hf_tlmtl.data import load_image_dataset, resolve_tasks

    full, _, _ = runs
    saved = transformers.AutoModel.from_pretrained(full)
    sharded_stats = {name: (layer.running_mean.clone(), layer.running_var.clone())
                     for name, layer in batch_norm_layers(saved).items()}
    data, _ = resolve_tasks(load_image_dataset("shapes", n_train=32, n_eval=8, image_size=32, seed=0), "shape,scale")
    rows = prepare_dataset(data["train"], saved.config, train=False)  # augmentation off: the eval transform
    collate = MultiTaskCollator(saved.tasks)
    batches = [collate([rows[i] for i in range(start, start + 4)]) for start in range(0, len(rows), 4)]
    assert recalibrate_batch_norm(saved, batches) == 32
    again = batch_norm_layers(saved)
    assert len(again) == len(sharded_stats) == 15
    for name, (mean, var) in sharded_stats.items():
        torch.testing.assert_close(again[name].running_mean, mean, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(again[name].running_var, var, atol=1e-5, rtol=1e-4, msg=name)
