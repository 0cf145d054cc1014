"""recipes/finetune.py --transfer_strategy lora: the saved model has the adapter merged, the adapter is kept."""

from __future__ import annotations

import json

import pytest
import torch

from recipe_utils import TINY, check_ok, run_finetune, summary


def test_lora_run_saves_merged_model_that_scores_what_was_evaluated(tmp_path):
    import transformers

    import hf_tlmtl  # noqa: F401
    from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
    from hf_tlmtl.data import load_image_dataset, resolve_tasks

    out = tmp_path / "out"
    proc = check_ok(
        run_finetune(
            [*TINY, "--dataset", "shapes", "--n_train", "32", "--n_eval", "16", "--tasks", "shape,scale",
             "--transfer_strategy", "lora", "--lora_r", "4", "--learning_rate", "0.01", "--output_dir", out],
            tmp_path,
        )
    )
    assert "strategy lora" in proc.stdout and "adapter/" in proc.stdout
    info = summary(out)
    assert 0 < info["transfer"]["trainable_params"] < info["transfer"]["total_params"] / 2
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    model = transformers.AutoModel.from_pretrained(out).eval()  # merged: a plain TimmMultiTaskModel
    assert type(model).__name__ == "TimmMultiTaskModel"
    assert not any("lora" in k for k in model.state_dict())
    data = load_image_dataset("shapes", n_train=32, n_eval=16, image_size=32, seed=0)
    data, _ = resolve_tasks(data, "shape,scale")
    batch = MultiTaskCollator(model.tasks)(list(prepare_dataset(data["validation"], model.config, train=False)))
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    mae = (logits["scale"].squeeze(-1) - batch["scale"].squeeze(-1)).abs().mean().item()
    accuracy = (logits["shape"].argmax(-1) == batch["shape"]).float().mean().item()
    assert info["per_task"]["scale"]["mae"] == pytest.approx(mae, abs=1e-4)
    assert info["per_task"]["shape"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
