"""The transfer study (benchmarks/transfer_study), in miniature: real source training, real Trainer runs on real
embedded data, transferability scores before training, every case x contender in the table, tau, the JSON and
the plots."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_tlmtl.transfer import recommend_strategy
from hf_tlmtl.transferability import SimilarityMeasurement
from recipe_utils import BENCHMARKS, REPO, load_benchmark, recipe_env

CONFIG = BENCHMARKS / "transfer_study" / "config.yaml"
CONTENDERS = ["scratch", "feature_extraction", "partial", "truncate", "fine_tune_llrd", "lora"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recipe():
    return load_benchmark("transfer_study")


def miniature(out: Path, *extra: str) -> list[str]:
    """The shipped config shrunk: the trained source only, two targets, 1 seed, 12 / 24 images, 16 px, a few steps."""
    return [
        str(CONFIG), "--output_dir", str(out), "--results_dir", str(out / "results"),
        "--sources", "trained", "--targets", "digits,shapes",
        "--image_size", "16", "--small_size", "12", "--large_size", "24", "--n_eval", "20",
        "--small_steps", "2", "--large_steps", "3", "--source_epochs", "1", "--seeds", "0",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32", "--num_threads", "1",
        "--workers", "1", *extra,
    ]


@pytest.fixture(scope="module")
def study(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer_study")
    return out, recipe.main(miniature(out))


def test_every_case_is_scored_then_measured_with_every_contender(study):
    out, results = study
    saved = json.loads((out / "results" / "results.json").read_text())
    assert saved["contenders"] == CONTENDERS and saved["small_dataset_max_samples"] == 18  # midpoint of 12 and 24
    assert [(c["source"], c["target"], c["size"]) for c in saved["cases"]] == [
        ("trained", "digits", "small"), ("trained", "digits", "large"), ("trained", "shapes", "small"), ("trained", "shapes", "large")
    ]
    for case in saved["cases"]:
        assert case["declared"] == ("similar" if case["target"] == "digits" else "different")
        (scores,) = case["scores"]
        assert set(scores["source"]) == {"logme", "h_score", "leep"}  # LEEP from the source's own digit head
        assert all(math.isfinite(v) for v in [*scores["source"].values(), *scores["random"].values()])
        # The measured recommendation is recommend_strategy on the stored measurement.
        measurement = SimilarityMeasurement(**scores["measurement"])
        expected = recommend_strategy(case["n_train"], measurement, small_dataset_max_samples=18, rules="classic")
        assert (case["recommendation"]["case"], case["recommendation"]["strategy"]) == (expected.case, expected.strategy)
        declared = recommend_strategy(case["n_train"], case["declared"], small_dataset_max_samples=18, rules="classic")
        assert case["declared_recommendation"]["strategy"] == declared.strategy
        assert case["winner"] in CONTENDERS
        assert case["recommendation"]["verdict"] in ("agrees", "within noise", "disagrees")
        for name, result in case["contenders"].items():
            (run,) = result["runs"]
            assert 0.0 <= run["metric"] <= 1.0 and run["steps"] == case["steps"], name
            assert 0 < run["trainable_params"] <= run["total_params"]
        params = {name: result["trainable_params"] for name, result in case["contenders"].items()}
        # The strategies really were applied: what trains differs as each strategy says.
        assert params["feature_extraction"] < params["lora"] < params["partial"] < params["fine_tune_llrd"]
        assert params["scratch"] == params["fine_tune_llrd"] == case["contenders"]["scratch"]["total_params"]
        best = max(case["contenders"][c]["mean"] for c in CONTENDERS[1:])
        assert case["best_transfer"] == best and case["scratch_mean"] == case["contenders"]["scratch"]["mean"]
    assert results["sources"][0]["reused"] is False and results["sources"][0]["metrics"]["source_accuracy"] >= 0.0


def test_tau_and_calibration_are_reported(study):
    out, results = study
    tau = results["tau"]
    # Per (target, size): the trained source and random init of its architecture: 2 backbones, too few for tau.
    assert {(t["target"], t["size"], t["n"]) for t in tau["per_target"] if t["method"] == "logme"} == {
        ("digits", "small", 2), ("digits", "large", 2), ("shapes", "small", 2), ("shapes", "large", 2)}
    assert all(t["tau"] is None for t in tau["per_target"])
    logme_all = [t for t in tau["all_pairs"] if t["method"] == "logme"]
    assert [t["n"] for t in logme_all] == [4, 4] and all(t["tau"] is None or -1 <= t["tau"] <= 1 for t in logme_all)
    calibration = results["calibration"]
    assert len(calibration["rows"]) == 4 and 0 <= calibration["correct"] <= 4
    assert calibration["correct"] >= calibration["in_code_correct"]  # the best threshold is at least as good as any


def test_report_lists_every_case_and_contender_and_the_plots_are_pngs(study):
    out, _ = study
    table = (out / "results" / "results.md").read_text()
    matrix = table.split("## recommend_strategy vs the measured winner")[0]
    for case in ("trained → digits, small (12)", "trained → shapes, large (24)"):
        assert sum(line.startswith(f"| {case} |") for line in matrix.splitlines()) == 1, case
    assert all(f"| {c} " in matrix or f" {c} |" in matrix for c in CONTENDERS)
    for section in ("Transferability scores", "Kendall's weighted tau", "Calibration of `similarity=\"measured\"`"):
        assert section in table
    import matplotlib.image

    for name, min_width in (("results.png", 1000), ("scores.png", 700)):
        png = (out / "results" / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert matplotlib.image.imread(out / "results" / name).shape[1] >= min_width


def test_report_only_renders_again_without_training(recipe, study):
    out, results = study
    (out / "results" / "results.md").unlink()
    again = recipe.main(miniature(out, "--report_only", "true"))
    assert (out / "results" / "results.md").is_file()
    assert [c["recommendation"] for c in again["cases"]] == [c["recommendation"] for c in results["cases"]]


def test_source_is_reused_when_its_settings_match(recipe, study):
    out, results = study
    again = recipe.main(miniature(out, "--contenders", "feature_extraction", "--targets", "digits", "--overwrite_output_dir", "true"))
    assert again["sources"][0]["reused"] is True and again["sources"][0]["metrics"] == results["sources"][0]["metrics"]
    assert again["contenders"] == ["feature_extraction"]


def test_two_worker_processes_give_the_single_process_results(study, tmp_path):
    """``--workers 2`` (the shipped config) runs the units in two spawned processes, longest first; every score
    and every run's metric equals the single-process study's, case by case and seed by seed."""
    out, results = study
    parallel = tmp_path / "parallel"
    shutil.copytree(out / "source", parallel / "source")  # the same source network, reused
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "transfer_study" / "run.py"), *miniature(parallel, "--workers", "2")],
        cwd=REPO, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    again = json.loads((parallel / "results" / "results.json").read_text())
    assert again["environment"]["workers"] == 2 and again["sources"][0]["reused"] is True
    assert [(c["source"], c["target"], c["size"]) for c in again["cases"]] == [(c["source"], c["target"], c["size"]) for c in results["cases"]]
    for one, two in zip(results["cases"], again["cases"]):
        assert [s["source"] for s in two["scores"]] == [s["source"] for s in one["scores"]]
        for contender in CONTENDERS:
            assert [r["metric"] for r in two["contenders"][contender]["runs"]] == [r["metric"] for r in one["contenders"][contender]["runs"]], contender


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contenders", "scratch,magic"], "unknown"),
        (["--targets", "digits,cifar"], "--targets: unknown"),
        (["--sources", "trained,trained"], "distinct sources"),
        (["--small_size", "50", "--large_size", "40"], "small_size"),
        (["--layer_decay", "0.5"], "set per contender"),
        (["--small_dataset_max_samples", "5"], "must lie in"),
        (["--contendrs", "lora"], "did you mean --contenders"),
        (["--report_only", "true"], "needs .*results.json"),
        (["--workers", "0"], "and --workers must be >= 1"),
        (["--workers", "2"], "needs this recipe run as a script"),  # imported from a path, under another name
    ],
)
def test_bad_arguments_stop_before_training(recipe, tmp_path, argv, message):
    with pytest.raises(recipe.UsageError, match=message):
        recipe.main(miniature(tmp_path) + argv)
    assert not (tmp_path / "results").exists() and not (tmp_path / "source").exists()
