"""Inputs that failed late or with a library's own message (issue 24, second part): refused early, in one line.

Each case here used to surface at the first training step, after every prediction was computed, or as a
``datasets`` generation error; now it is a ``ValueError`` / ``UsageError`` naming the input and the fix,
raised before anything is read or written (the recipes print it as one ``error:`` line and exit 2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_tlmtl import TaskSpec
from hf_tlmtl.data import load_table
from hf_tlmtl.training import MultiTaskTrainingArguments
from hf_tlmtl.training.cli import UsageError, build_parser, yaml_to_argv
from hf_tlmtl.training.output_dir import check_output_dir

from recipe_utils import FINETUNE, PREDICT, TINY, recipe_env

READ_ONLY = Path("/proc/hf_tlmtl_cannot_write_here")  # a read-only file system: refused even to root


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_labels": 2.7}, r"num_labels must be a whole number, got 2\.7"),
        ({"num_labels": 3, "label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\), got 1\.5"),
        ({"num_labels": 3, "label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
    ],
)
def test_task_specs_refuse_what_torch_would_refuse_at_the_first_step(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(name="c", type="classification", **kwargs)


def test_whole_float_class_counts_still_work():
    assert TaskSpec(name="c", type="classification", num_labels=3.0).num_labels == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backbone: a\nlearning_rate: 0.1\nbackbone: b\n", r"key 'backbone' is given twice \(line 3\)"),
    ],
)
def test_yaml_that_would_be_read_wrongly_is_refused(tmp_path, text, message):
    import dataclasses

    @dataclasses.dataclass
    class Run:
        backbone: str = "x"
        tasks: str | None = None

    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(UsageError, match=message):
        yaml_to_argv(config, build_parser(Run, MultiTaskTrainingArguments))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"t\.csv is empty"),
        (b"path,size\n", r"t\.csv has a header \(path,size\) but no rows"),
        ("path,größe\na.png,1\n".encode("latin-1"), r"t\.csv is not UTF-8 text \(byte 0xf6 at offset 7\)"),
    ],
)
def test_tables_datasets_cannot_read_are_named(tmp_path, content, message):
    table = tmp_path / "t.csv"
    table.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_table(table, image_column="path")


def test_an_unwritable_output_dir_is_refused_before_the_run(tmp_path):
    with pytest.raises(UsageError, match=r"cannot be written: /proc is not writable"):
        check_output_dir(READ_ONLY / "run", overwrite=False, resume=None)
    proc = subprocess.run(
        [sys.executable, str(FINETUNE), *TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8",
         "--tasks", "shape", "--output_dir", str(READ_ONLY / "run")],
        cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "cannot be written" in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize(("output", "message"), [("folder", "is a folder; pass a file path"), ("ro", "cannot be written")])
def test_predict_refuses_an_output_it_cannot_write_before_predicting(tmp_path, output, message):
    target = tmp_path / "preds.csv" if output == "folder" else READ_ONLY / "p.csv"
    if output == "folder":
        target.mkdir()  # a folder with a file's name
    proc = subprocess.run(
        [sys.executable, str(PREDICT), "--model", str(tmp_path / "no_model"), "--data", str(tmp_path), "--output", str(target)],
        cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-64], "incomplete metadata, file not fully covered"),
        (lambda data: (10**15).to_bytes(8, "little") + data[8:], "header too large"),
        (lambda data: data[:5], "header too small"),
    ],
)
def test_a_damaged_model_file_is_named_before_loading(tmp_path, damage, message):
    from hf_tlmtl import TimmMultiTaskModel

    model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=rf"model\.safetensors is damaged \({message}\).*save or copy it again"):
        TimmMultiTaskModel.from_pretrained(tmp_path / "m")


def test_score_transferability_scores_the_models_tasks_and_takes_a_list_of_names(tmp_path):
    from hf_tlmtl import TimmMultiTaskModel
    from hf_tlmtl.data import load_embedded_dataset
    from hf_tlmtl.transferability import score_transferability

    data = load_embedded_dataset("shapes", n_train=40, n_eval=8, image_size=32)["train"]
    shape = TaskSpec(name="shape", type="classification", labels=data.features["shape"].names)
    model = TimmMultiTaskModel.from_backbone("test_resnet", [shape], image_size=32)
    assert sorted(score_transferability(model, data, cache_dir=str(tmp_path))) == ["shape"]  # not every column
    assert sorted(score_transferability(model, data, tasks=["color", "scale"], cache_dir=str(tmp_path))) == ["color", "scale"]


def test_a_preprocessor_config_with_a_negative_input_size_is_refused_when_loaded(tmp_path):
    import json

    import transformers

    from hf_tlmtl import TimmMultiTaskModel

    TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["data_config"]["input_size"] = [3, -32, 32]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"input_size'\] must be \[channels, height, width\] of positive whole numbers, got \[3, -32, 32\]"):
        transformers.AutoImageProcessor.from_pretrained(tmp_path)


def test_a_decompression_bomb_is_named_by_the_pipeline_reader(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from hf_tlmtl.hub.pipeline import read_image

    PILImage.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels: over twice the limit, as a real bomb is
    with pytest.raises(ValueError, match=r"Could not read image .*bomb\.png' \(DecompressionBombError: Image size"):
        read_image(str(tmp_path / "bomb.png"))


def test_rank_backbones_checks_every_source_before_scoring_the_first(tmp_path):
    from hf_tlmtl.data import load_embedded_dataset
    from hf_tlmtl.transferability import rank_backbones

    data = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"Unknown timm architecture 'resnet_18'.*Close names in timm"):
        rank_backbones(["test_resnet", "resnet_18"], data, [TaskSpec(name="digit", type="classification", num_labels=10)],
                       cache_dir=str(cache))
    assert not cache.exists() or not any(cache.rglob("*.arrow"))  # the first, valid source was not run


def test_a_mapping_given_for_tasks_is_refused_with_the_list_form(tmp_path):
    from hf_tlmtl.data import parse_task_arg

    for spec in ({"shape": "classification"}, '{"shape": "classification"}'):  # YAML's mapping arrives as JSON
        with pytest.raises(ValueError, match=r"--tasks is a list of task specs .* not a mapping"):
            parse_task_arg(spec)
    config = tmp_path / "run.yaml"
    config.write_text("tasks:\n  shape: classification\n")
    proc = subprocess.run(
        [sys.executable, str(FINETUNE), str(config), *TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8",
         "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "not a mapping" in errors[0], proc.stderr[-2000:]


def test_rank_backbones_scores_every_image_of_a_folder(tmp_path):
    import json

    from recipe_utils import check_ok, run_script, write_image_folder

    import timm

    folder = write_image_folder(tmp_path / "images", ["a", "b"], per_class=10)
    timm.models.save_for_hf(timm.create_model("test_resnet"), tmp_path / "source")  # a source with weights, offline
    proc = run_script(
        Path(__file__).resolve().parents[1] / "recipes" / "rank_backbones.py",
        ["--backbones", f"local-dir:{tmp_path / 'source'}", "--dataset", folder, "--image_size", "32",
         "--output_dir", tmp_path / "rank"],
        tmp_path,
    )
    check_ok(proc)
    assert json.loads((tmp_path / "rank" / "ranking.json").read_text())["n_images"] == 20  # none held out (was 16)


def test_autoimageprocessor_loads_without_a_backend_warning(tmp_path):
    from hf_tlmtl import TimmMultiTaskModel

    TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32).save_pretrained(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, hf_tlmtl, transformers; "
         f"print(type(transformers.AutoImageProcessor.from_pretrained({str(tmp_path)!r})).__name__)"],
        env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "TimmMultiTaskImageProcessor", proc.stderr[-2000:]
    assert "backend is not available" not in proc.stderr  # torchvision is installed: nothing to fall back from
