"""recipes/finetune.py --task_similarity measured: the advice comes from scores measured on the training data."""

from __future__ import annotations

import math

from recipe_utils import TINY, load_recipe


def test_measured_similarity_gives_advice_that_names_its_scores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("finetune")
    run = recipe.setup([*map(str, TINY), "--dataset", "digits", "--n_train", "40", "--n_eval", "20",
                        "--task_similarity", "measured", "--output_dir", str(tmp_path / "out")])
    rec = run.recommendation
    assert rec.measurement is not None and rec.measurement.method == "logme"
    assert 0.0 < rec.measurement.similarity < 1.0 and math.isfinite(rec.measurement.gain)
    plan = run.plan
    assert f"source {rec.measurement.source_score:.3f} vs random init {rec.measurement.random_score:.3f}" in plan
    assert f"Case {rec.case}" in plan
