"""The task-grouping recipe, in miniature (real Trainer runs on real embedded data, tiny budget)."""

from __future__ import annotations

import json
import math

import pytest

from recipe_utils import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("task_groups")


COMMON = [
    "--backbone", "test_resnet", "--image_size", "32", "--n_train", "48", "--n_eval", "16",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
    "--disable_tqdm", "true", "--logging_steps", "100",
]


def test_miniature_study_proposes_trains_and_scores_every_grouping(recipe, tmp_path):
    out = tmp_path / "study"
    argv = COMMON + [
        "--tasks", "shape,scale,marks", "--seeds", "0", "--affinity_steps", "4", "--affinity_every", "2",
        "--affinity_start", "2", "--total_steps", "6", "--output_dir", str(out),
    ]
    results = recipe.main(argv)
    seed = results["seeds"][0]
    tasks = ["shape", "scale", "marks"]
    assert sorted(seed["proposals"]) == [1, 2, 3]
    for k, proposal in seed["proposals"].items():
        groups = proposal["groups"]
        assert len(groups) == k and sorted(t for g in groups for t in g) == sorted(tasks)  # a partition into k groups
        # Equal total compute: the groups' steps add up to --total_steps (6 steps shared by group size).
        assert sum(seed["runs"]["+".join(g)]["steps"] for g in groups) == 6
        assert math.isfinite(proposal["delta_m"])
    assert seed["proposals"][1]["groups"] == [tasks]
    assert seed["proposals"][3]["delta_m"] == 0.0  # every task alone is the reference
    assert seed["affinity"]["measurements"] == 2 and seed["affinity"]["steps"] == [2, 4]
    assert (out / "seed0" / "task_affinity.png").is_file() and (out / "task_affinity.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"]["0"]["proposals"]["2"]["groups"] == seed["proposals"][2]["groups"]
    assert "[shape+scale+marks]" in (out / "results.md").read_text()
    with pytest.raises(recipe.UsageError, match="overwrite_output_dir"):
        recipe.main(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "shape"], "2 or more"),
        (["--tasks", "shape,scale", "--max_groups", "3"], "from 1 to the number of tasks"),
        (["--tasks", "shape,nope"], "2 or more different columns"),
        (["--max_steps", "5"], "--max_steps is set per group"),
        (["--affinity_steps", "5", "--affinity_start", "20"], "no affinity measurement fits"),
    ],
)
def test_bad_arguments_stop_before_training(recipe, tmp_path, argv, message):
    with pytest.raises(recipe.UsageError, match=message):
        recipe.main(COMMON + argv + ["--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
