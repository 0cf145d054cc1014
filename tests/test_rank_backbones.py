"""recipes/rank_backbones.py, run as a user runs it: local-dir: checkpoints and a saved model on embedded data."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from recipe_utils import REPO, check_ok, load_recipe, run_script

RANK = REPO / "recipes" / "rank_backbones.py"


def test_ranks_a_backbone_that_sees_the_labels_above_a_blind_one_and_writes_the_table(tmp_path):
    seeing = tmp_path / "seeing"
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=0), str(seeing))
    blind = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="x", type="regression")], image_size=32)
    with torch.no_grad():  # constant features: the last stage outputs zeros for every image
        for p in blind.backbone.layer4.parameters():
            p.zero_()
    blind.save_pretrained(tmp_path / "blind")
    args = ["--backbones", f"{tmp_path / 'blind'},local-dir:{seeing}", "--dataset", "digits", "--n_train", "80",
            "--embedded_image_size", "32", "--image_size", "32", "--output_dir", tmp_path / "out"]
    proc = check_ok(run_script(RANK, args, tmp_path))
    record = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert [r["name"] for r in record["ranking"]] == [f"local-dir:{seeing}", str(tmp_path / "blind")]
    assert record["n_images"] == 80 and record["method"] == "logme" and [t["name"] for t in record["tasks"]] == ["digit"]
    assert record["ranking"][0]["scores"]["digit"] > record["ranking"][1]["scores"]["digit"]
    assert "| 1 | `local-dir:" in proc.stdout and (tmp_path / "out" / "ranking.md").read_text().count("| ") > 6
    again = run_script(RANK, args, tmp_path)  # the ranking exists: not replaced without --overwrite
    assert again.returncode == 2 and "--overwrite true" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "leap"], "is not one of"),
        (["--backbones", "a,a"], "distinct"),
        (["--tasks", "digit:regression", "--method", "h_score"], "regression"),
        (["--dataset", "shapes", "--tasks", "scale", "--n_train", "5"], "has 5 labelled rows"),
    ],
)
def test_bad_input_is_refused_before_any_backbone_runs(tmp_path, args, message):
    recipe = load_recipe("rank_backbones")
    base = ["--backbones", "test_resnet", "--dataset", "digits", "--embedded_image_size", "16", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=message):  # the CLI prints it as one error: line, exit code 2
        recipe.main(base + args)
    assert not (tmp_path / "out").exists()
