"""The transfer study recipe, in miniature: real source training, real Trainer runs on real embedded
data, every case x contender in the table, the JSON and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_tlmtl.transfer import recommend_strategy
from recipe_utils import REPO, load_recipe

CONFIG = REPO / "recipes" / "configs" / "transfer_study.yaml"
CONTENDERS = ["scratch", "feature_extraction", "partial", "truncate", "fine_tune_llrd", "lora"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("transfer_study")


def miniature(out: Path, *extra: str) -> list[str]:
    """The shipped config shrunk: 1 seed, 10 / 20 images, 16 px, a few steps."""
    return [
        str(CONFIG), "--output_dir", str(out), "--results_dir", str(out / "results"),
        "--image_size", "16", "--small_size", "10", "--large_size", "20", "--n_eval", "20",
        "--small_steps", "2", "--large_steps", "3", "--source_epochs", "1", "--seeds", "0",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32", "--num_threads", "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def study(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer_study")
    return out, recipe.main(miniature(out))


def test_every_case_and_contender_is_measured(study):
    out, results = study
    saved = json.loads((out / "results" / "results.json").read_text())
    assert saved["contenders"] == CONTENDERS
    assert [c["case"] for c in saved["cases"]] == [1, 2, 3, 4]
    assert saved["small_dataset_max_samples"] == 15  # midpoint of 10 and 20
    for case in saved["cases"]:
        assert set(case["contenders"]) == set(CONTENDERS)
        # What recommend_strategy says for this case is recorded next to the measurement.
        expected = recommend_strategy(case["n_train"], case["similarity"], small_dataset_max_samples=15)
        assert (case["case"], case["recommendation"]["strategy"]) == (expected.case, expected.strategy)
        assert case["winner"] in CONTENDERS
        assert case["agreement"] in ("agrees", "within noise", "disagrees")
        for name, result in case["contenders"].items():
            (run,) = result["runs"]
            assert 0.0 <= run["metric"] <= 1.0 and math.isfinite(result["mean"]) and result["std"] == 0.0
            assert run["steps"] == case["steps"], name
            assert math.isfinite(run["wall_seconds"]) and run["wall_seconds"] > 0
            assert 0 < run["trainable_params"] <= run["total_params"]
        params = {name: result["trainable_params"] for name, result in case["contenders"].items()}
        # The strategies really were applied: what trains differs as each strategy says.
        assert params["feature_extraction"] < params["lora"] < params["partial"] < params["fine_tune_llrd"]
        assert params["scratch"] == params["fine_tune_llrd"] == case["contenders"]["scratch"]["total_params"]
        assert case["contenders"]["truncate"]["total_params"] < case["contenders"]["scratch"]["total_params"]
    assert results["source"]["reused"] is False and results["source"]["metrics"]["source_accuracy"] >= 0.0


def test_table_lists_every_case_and_contender(study):
    out, results = study
    table = (out / "results" / "results.md").read_text()
    for case in (1, 2, 3, 4):
        assert f"case {case}:" in table
    matrix = table.split("## Every case x contender")[0]
    for name in CONTENDERS:
        assert sum(line.startswith(f"| {name} |") for line in matrix.splitlines()) == 1, name
    long_rows = [line for line in table.split("## Every case x contender")[1].split("##")[0].splitlines() if line.startswith("| ")]
    assert len(long_rows) == 2 + 4 * len(CONTENDERS)  # header, rule, one row per case x contender
    assert "small_dataset_max_samples=15" in table and "recommend_strategy vs the measured winner" in table


def test_plot_is_a_png(study):
    out, _ = study
    png = (out / "results" / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "results" / "results.png").shape
    assert width > 1000 and height > 700


def test_source_is_reused_when_its_settings_match(recipe, study):
    out, results = study
    again = recipe.main(miniature(out, "--contenders", "feature_extraction", "--overwrite_output_dir", "true"))
    assert again["source"]["reused"] is True
    assert again["source"]["metrics"] == results["source"]["metrics"]
    assert again["contenders"] == ["feature_extraction"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contenders", "scratch,magic"], "unknown"),
        (["--small_size", "50", "--large_size", "40"], "small_size"),
        (["--layer_decay", "0.5"], "set per contender"),
        (["--small_dataset_max_samples", "5"], "must lie in"),
        (["--contendrs", "lora"], "did you mean --contenders"),
    ],
)
def test_bad_arguments_stop_before_training(recipe, tmp_path, argv, message):
    with pytest.raises(recipe.UsageError, match=message):
        recipe.main(miniature(tmp_path) + argv)
    assert not (tmp_path / "results").exists() and not (tmp_path / "source").exists()
