"""recipes/finetune.py's transfer options: --bn, --trainable_fraction, --small_dataset_max_samples, --mean/--std/
--crop_pct (and the whole-image default below the native size), and a plan that says what decides the run."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_tlmtl.transfer.batch_norm import batch_norm_layers, frozen_batch_norm_layers
from hf_tlmtl.training.cli import UsageError
from hf_tlmtl.data import build_transforms
from recipe_utils import TINY, load_recipe, write_image_folder

DATA = ["--dataset", "digits", "--n_train", "40", "--n_eval", "20"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("finetune")


def setup(recipe, tmp_path, *extra: str):
    return recipe.setup([*map(str, TINY), *DATA, "--output_dir", str(tmp_path / "out"), *extra])


def test_bn_and_trainable_fraction_reach_the_model_and_the_plan(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = setup(recipe, tmp_path, "--transfer_strategy", "partial", "--trainable_fraction", "0.5", "--bn", "frozen",
                "--max_steps", "3")
    assert not batch_norm_layers(run.model) and len(frozen_batch_norm_layers(run.model)) == 15
    plan = run.plan
    assert "BatchNorm frozen" in plan and "trainable_fraction=0.5 -> top 1 of 5 layer groups (layer4.0)" in plan
    # max_steps decides the length, not num_train_epochs: 3 steps x 8 rows over 40 rows.
    assert "3 steps (max_steps; 0.6 epochs)" in plan and "1 epochs" not in plan


def test_small_dataset_threshold_is_a_recipe_option(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = setup(recipe, tmp_path, "--task_similarity", "different")
    large = setup(recipe, tmp_path, "--task_similarity", "different", "--small_dataset_max_samples", "30")
    assert small.recommendation.case == 2 and "(< 5,000: small)" in small.recommendation.reason
    assert large.recommendation.case == 4 and "(>= 30: large)" in large.recommendation.reason


def test_mean_std_crop_overrides_go_into_the_saved_preprocessing(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = setup(recipe, tmp_path, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--crop_pct", "0.9")
    config = run.model.config.data_config
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.25, 0.25, 0.25] and config["crop_pct"] == 0.9
    from PIL import Image

    pixels = build_transforms(run.model.config, train=False)(Image.new("RGB", (32, 32), (255, 255, 255)))
    torch.testing.assert_close(pixels, torch.full_like(pixels, (1.0 - 0.5) / 0.25))


def test_whole_image_below_the_native_size(recipe, tmp_path, monkeypatch):
    """test_resnet's native input is 160 px with crop_pct 0.95; at 32 px the recipe keeps the whole image."""
    monkeypatch.chdir(tmp_path)
    run = setup(recipe, tmp_path)
    native = run.model.backbone.pretrained_cfg
    assert native["crop_pct"] == 0.95 and native["input_size"] == (3, 160, 160)
    assert run.model.config.data_config["crop_pct"] == 1.0
    assert "crop_pct 0.95 -> 1.0: input 32 px is below the backbone's native 160 px" in run.plan
    kept = setup(recipe, tmp_path, "--crop_pct", "0.875")
    assert kept.model.config.data_config["crop_pct"] == 0.875 and kept.crop_note is None


def test_cached_features_plan_says_augmentation_is_off(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = setup(recipe, tmp_path, "--transfer_strategy", "feature_extraction", "--cache_features", "true", "--augment", "true")
    assert "augmentation off (--cache_features" in run.plan


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--mean", "0.5,0.5"], "--mean needs 3 numbers"),
        (["--std", "0.2,0,0.2"], "--std needs 3 positive numbers"),
        (["--mean", "a,b,c"], "--mean takes 3 comma-separated numbers"),
        (["--crop_pct", "1.5"], r"--crop_pct must be in \(0, 1\]"),
    ],
)
def test_bad_preprocessing_overrides(recipe, tmp_path, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=match):
        setup(recipe, tmp_path, *extra)


def test_local_folder_does_not_say_downloading(tmp_path, capfd):
    from hf_tlmtl.data import load_image_dataset

    folder = write_image_folder(tmp_path / "images", ["a", "b"], per_class=20, size=8)  # datasets shows the bar from 16 files
    datasets.enable_progress_bars()
    load_image_dataset(str(folder))
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Reading local files" in err
