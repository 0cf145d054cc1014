"""The multi-task vs single-task experiment (benchmarks/mtl_vs_single), in miniature (real Trainer, real embedded data)."""

from __future__ import annotations

import json
import math

import pytest

from recipe_utils import load_benchmark


@pytest.fixture(scope="module")
def recipe():
    return load_benchmark("mtl_vs_single")


def test_miniature_run_reports_every_setup_and_task(recipe, tmp_path):
    out = tmp_path / "study"
    argv = [
        "--backbone", "test_resnet", "--image_size", "32", "--n_train", "48", "--n_eval", "24",
        "--tasks", "shape,scale,marks", "--balancing_methods", "static,dwa", "--timing_repeats", "2",
        "--inference_batch_size", "8", "--output_dir", str(out), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--report_to", "none", "--disable_tqdm", "true",
    ]
    results = recipe.main(argv)

    assert set(results["single"]) == {"shape", "scale", "marks"}
    assert set(results["multi"]) == {"static", "dwa"}
    # One shared backbone holds fewer parameters than three single-task models.
    single_params = sum(r["params"] for r in results["single"].values())
    assert results["multi"]["static"]["params"] < single_params
    for run in results["multi"].values():
        assert math.isfinite(run["delta_m"])
        assert {"shape_accuracy", "scale_mae", "marks_map"} <= set(run["metrics"])
    table = (out / "results.md").read_text()
    assert "single-task ×3" in table and "multi-task, static" in table and "multi-task, dwa" in table
    assert json.loads((out / "results.json").read_text())["experiment"]["tasks"] == "shape,scale,marks"

    # A second run refuses to overwrite the results without the flag.
    with pytest.raises(recipe.UsageError, match="overwrite_output_dir"):
        recipe.main(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "shape,scale"], "3 or more"),
        (["--balancing_methods", "magic"], "unknown"),
        (["--n_trian", "5"], "did you mean --n_train"),
    ],
)
def test_bad_arguments_stop_before_training(recipe, tmp_path, argv, message):
    with pytest.raises(recipe.UsageError, match=message):
        recipe.main(argv + ["--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
