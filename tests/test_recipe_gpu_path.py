"""The GPU path of recipes/finetune.py, run on CPU: --bf16, --channels_last and --torch_compile together.

bf16 autocast works on CPU; torch_compile uses the ``aot_eager`` backend here (dynamo traces the model,
no C++ toolchain needed; on a GPU the default inductor backend is the one to use). The recipe runs in
this process (its setup, then its training), so the test can look at the model it trained: weights kept
float32 and channels_last, the prepared forward computing in bf16, the training model compiled,
the loss finite and decreasing on a batch it sees again and again, and the saved model reloading.
"""

from __future__ import annotations

import math

import pytest
import torch

from recipe_utils import TINY, load_recipe


@pytest.fixture
def fresh_state():
    """The recipe ran in this process: leave no bf16 accelerator state or dynamo cache to the next test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()


def test_bf16_channels_last_and_compile_go_through_the_recipe(tmp_path, monkeypatch, fresh_state):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    finetune = load_recipe("finetune")
    out = tmp_path / "run"
    argv = [*TINY, "--dataset", "shapes", "--n_train", "8", "--n_eval", "8", "--tasks", "shape,scale",
            "--augment", "false", "--max_steps", "8", "--learning_rate", "0.01", "--bf16", "true",
            "--channels_last", "true", "--torch_compile", "true", "--torch_compile_backend", "aot_eager",
            "--model_card", "false", "--output_dir", str(out)]
    run = finetune.setup(argv)
    convs = [p for p in run.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    summary = finetune.train_and_save(run)

    trainer = run.trainer
    assert trainer.accelerator.mixed_precision == "bf16"
    assert hasattr(trainer.model_wrapped, "_orig_mod")  # the Trainer trained the torch.compile'd model
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # bf16 autocast, fp32 weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in trainer.model.parameters() if p.dim() == 4)
    # accelerate wraps the prepared model's forward in bf16 autocast and hands float32 outputs back: the
    # features were computed in bf16 (every value is a bf16 number), where float32 weights alone give others.
    batch = next(iter(trainer.get_eval_dataloader()))
    with torch.no_grad():
        pooled = trainer.model(pixel_values=batch["pixel_values"]).pooled
        plain = type(trainer.model).forward(trainer.model, pixel_values=batch["pixel_values"]).pooled  # no autocast
    assert torch.equal(pooled, pooled.to(torch.bfloat16).float())
    assert not torch.equal(plain, plain.to(torch.bfloat16).float())

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert summary["world_size"] == 1 and (out / "model.safetensors").is_file()
    import transformers

    reloaded = transformers.AutoModel.from_pretrained(out)
    assert reloaded.task_names == ["shape", "scale"]
