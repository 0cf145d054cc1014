"""Bad input tried as a new user would (issue 15), table-driven.

Recipes: the real scripts (``__main__``) end with exit code 2 and one ``error:`` line naming the problem
and the fix, before anything is written: a previous run in ``--output_dir`` stays intact byte for byte,
no new folder or prediction file appears. API: a ``ValueError`` naming the problem and the fix.
A run that fails *during* training, or is killed, over a previous run gives that run back as it was.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipe_utils import FINETUNE, PREDICT, TINY, check_ok, recipe_env, run_finetune, summary, write_image_folder

SMALL = [*TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8", "--tasks", "shape"]


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256 of its bytes), and every folder (-> "dir")."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The user's previous run (finished, with checkpoints and a file of their own), and model folders
    derived from it that a source model should never be: pickled, foreign, without backbone, broken JSON."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    previous = tmp / "previous"
    # 16 rows in batches of 5 would end the epoch on one image: see test_last_partial_batch_of_one_is_dropped.
    proc = check_ok(run_finetune([*SMALL, "--per_device_train_batch_size", "5", "--save_strategy", "steps",
                                  "--save_steps", "2", "--output_dir", previous], tmp))
    assert (previous / "checkpoint-3" / "trainer_state.json").is_file()  # the newest: --resume_from_checkpoint true takes it
    (previous / "notes.txt").write_text("mine")
    weights = load_file(previous / "model.safetensors")

    def model_folder(name: str) -> Path:
        folder = tmp / name
        folder.mkdir()
        for file in ("config.json", "preprocessor_config.json"):
            shutil.copy(previous / file, folder / file)
        return folder

    torch.save(weights, model_folder("pickled") / "pytorch_model.bin")
    torch.save({"unrelated.weight": torch.zeros(3)}, model_folder("foreign_pickle") / "pytorch_model.bin")
    save_file({k: v for k, v in weights.items() if k.startswith("heads.")}, model_folder("no_backbone") / "model.safetensors")
    broken = model_folder("broken_json")
    shutil.copy(previous / "model.safetensors", broken / "model.safetensors")
    (broken / "config.json").write_text((broken / "config.json").read_text().replace("{", "{,", 1))  # line 1 column 2
    images = write_image_folder(tmp / "images", ["a", "b"], per_class=2)
    return {"tmp": tmp, "previous": previous, "images": images, "stdout": proc.stdout}


def _run_in_process(script: Path, argv: list, cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The real script as ``__main__`` in this process (a new interpreter per case would cost seconds)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def _over_previous(*more: str) -> list:
    return [*SMALL, "--output_dir", "{run}", "--overwrite_output_dir", "true", *more]


def _init_from(folder: str) -> list:
    return [*SMALL, "--init_from", "{%s}" % folder, "--output_dir", "{new}"]


def _predict(model: str, *more: str) -> list:
    return ["--model", "{%s}" % model, "--data", "{images}", "--output", "{new}/predictions.csv", *more]


# case: (script, argv with {placeholders}, words the one error line must contain)
RECIPE_CASES = {
    "overwrite, negative learning rate": (
        FINETUNE, _over_previous("--learning_rate", "-0.1"), ["Invalid learning rate: -0.1", "learning_rate=-0.1"]),
    "overwrite, adam beta outside [0, 1)": (FINETUNE, _over_previous("--adam_beta1", "2"), ["beta", "adam_beta1"]),
    "overwrite, batch of one with BatchNorm on 1x1 maps": (
        FINETUNE, _over_previous("--per_device_train_batch_size", "1"),
        ["per_device_train_batch_size=1", "BatchNorm", "batch size of 2 or more", "feature_extraction"]),
    "resume a checkpoint of another task set": (
        FINETUNE, [*TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8", "--tasks", "shape,scale",
                   "--output_dir", "{run}", "--resume_from_checkpoint", "true"],
        ["/run/checkpoint-3 does not fit", "tasks shape (classification, 4):", "scale (regression, 1)", "--tasks",
         "--overwrite_output_dir true"]),
    "resume a checkpoint of another architecture": (
        FINETUNE, [*SMALL, "--backbone", "test_convnext", "--output_dir", "{run}", "--resume_from_checkpoint", "true"],
        ["/run/checkpoint-3", "'test_resnet'", "'test_convnext'", "--backbone", "another --output_dir"]),
    "init_from a folder with only pytorch_model.bin": (
        FINETUNE, _init_from("pickled"), ["--init_from", "pytorch_model.bin", "only safetensors", "use_safetensors=False"]),
    "init_from a harmless pickle of other weights": (
        FINETUNE, _init_from("foreign_pickle"), ["only safetensors", "convert it once"]),
    "init_from safetensors without the backbone": (
        FINETUNE, _init_from("no_backbone"), ["backbone weights are missing", "'test_resnet'", "save the source model again"]),
    "init_from a malformed config.json": (
        FINETUNE, _init_from("broken_json"), ["--init_from", "config.json is not valid JSON", "line 1 column 2", "fix it"]),
    "predict, model with only pytorch_model.bin": (
        PREDICT, _predict("pickled"), ["--model", "only safetensors", "use_safetensors=False"]),
    "predict, model with a malformed config.json": (
        PREDICT, _predict("broken_json"), ["--model", "config.json is not valid JSON", "line 1 column 2"]),
    "predict, threshold 2": (PREDICT, _predict("previous", "--threshold", "2"), ["--threshold", "between 0 and 1"]),
    "predict, threshold 0": (PREDICT, _predict("previous", "--threshold", "0"), ["--threshold", "between 0 and 1"]),
    "predict, top_k 0": (PREDICT, _predict("previous", "--top_k", "0"), ["--top_k must be >= 1"]),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_refuses_bad_input_before_writing(case, made, tmp_path, monkeypatch, capsys):
    script, argv, words = RECIPE_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(made["previous"], run)
    before = digest(run)
    places = {"run": run, "new": tmp_path / "new", "images": made["images"],
              **{name: made["tmp"] / name for name in ("previous", "pickled", "foreign_pickle", "no_backbone", "broken_json")}}
    code, stderr = _run_in_process(script, [str(a).format(**places) for a in argv], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    missing = [word for word in words if word not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert digest(run) == before  # the previous run, byte for byte
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------- handled, not refused
def test_last_partial_batch_of_one_is_dropped(made):
    """16 rows in batches of 5 end each epoch on one image, which test_resnet's 1x1 BatchNorm cannot train on:
    the run says so and trains 3 full batches per epoch."""
    assert "that last image is left out of each epoch (dataloader_drop_last)" in made["stdout"]
    info = summary(made["previous"])
    assert info["arguments"]["training"]["dataloader_drop_last"] is True
    assert info["train"]["epoch"] == pytest.approx(1.0)
    assert json.loads((made["previous"] / "trainer_state.json").read_text())["global_step"] == 3


# ----------------------------------------------------------------- failures after the folder was touched
def test_failure_during_training_gives_the_previous_run_back(made, tmp_path, monkeypatch, capsys):
    """A corrupt image that only training reads (--verify_images false): the run crashes, the old run is back."""
    from PIL import UnidentifiedImageError

    images = write_image_folder(tmp_path / "images", ["a", "b"], per_class=8)
    (images / "b" / "b_7.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    shutil.copytree(made["previous"], run)
    before = digest(run)
    argv = [*TINY, "--dataset", images, "--verify_images", "false", "--output_dir", run, "--overwrite_output_dir",
            "true", "--per_device_train_batch_size", "4"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(FINETUNE), *map(str, argv)])
    with pytest.raises(UnidentifiedImageError):  # a crash in training, not bad input (that would be exit 2)
        runpy.run_path(str(FINETUNE), run_name="__main__")
    stderr = capsys.readouterr().err
    assert "the previous run in" in stderr and "is back as it was" in stderr
    assert digest(run) == before


def test_killed_overwrite_is_restored_at_the_next_start(made, tmp_path, monkeypatch, capsys):
    """SIGKILL while the new run trains, before its first checkpoint: the next start in that folder puts the
    previous run back first (here a start that then refuses its arguments)."""
    run = tmp_path / "run"
    shutil.copytree(made["previous"], run)
    before = digest(run)
    proc = subprocess.Popen(
        [sys.executable, str(FINETUNE), *map(str, SMALL), "--num_train_epochs", "200", "--output_dir", str(run),
         "--overwrite_output_dir", "true"],
        cwd=tmp_path, env=recipe_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:  # the plan is printed after the previous run was set aside
            if line.startswith("== hf_tlmtl finetune =="):
                break
            assert time.monotonic() < deadline
        time.sleep(1.0)  # a few training steps
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "model.safetensors").exists() and (run / ".previous-run" / "model.safetensors").is_file()
    assert (run / "notes.txt").read_text() == "mine"  # never moved: not a run's file
    code, stderr = _run_in_process(FINETUNE, [str(a).format(run=run) for a in _over_previous("--learning_rate", "-1")],
                                   tmp_path, monkeypatch, capsys)
    assert code == 2
    assert digest(run) == before


# ------------------------------------------------------------------------------------------ API
def _trainer_check(tmp_path: Path, **kwargs) -> None:
    from datasets import Dataset

    from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments

    model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
    rows = Dataset.from_dict({"pixel_values": torch.zeros(4, 3, 32, 32).numpy(), "y": [0.0] * 4}).with_format("torch")
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True, **kwargs)
    MultiTaskTrainer(model=model, args=args, train_dataset=rows).check_can_train()


def _empty_split_prepared() -> None:
    from datasets import Dataset, Features, Image, Value

    from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    from hf_tlmtl.data import prepare_dataset

    empty = Dataset.from_dict({"image": [], "y": []}, features=Features({"image": Image(), "y": Value("float32")}))
    prepare_dataset(empty, TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")]).config,
                    train=True)


def _lora_on_depthwise_conv() -> None:
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    from hf_tlmtl.adapters import apply_lora

    model = TimmMultiTaskModel.from_backbone("test_convnext", [TaskSpec(name="y", type="regression")])
    apply_lora(model, r=24, target_modules="stages.0.blocks.0.conv_dw")  # 24 groups: the rank divides them


def _lora_on_frozen_batch_norm() -> None:
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    from hf_tlmtl.adapters import apply_lora
    from hf_tlmtl.transfer import apply_transfer_strategy

    model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    apply_transfer_strategy(model, "feature_extraction")  # BatchNorm -> FrozenBatchNorm2d
    apply_lora(model, r=4, target_modules="bn1")


def _load(folder: str, **kwargs):
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel

    if kwargs.pop("reheaded", False):
        kwargs["tasks"] = [TaskSpec(name="y", type="regression")]
    return lambda made, tmp_path: TimmMultiTaskModel.from_pretrained(made["tmp"] / folder, **kwargs)


# case: (call(made, tmp_path), words the ValueError must contain)
API_CASES = {
    "TaskSpec labels 1 and '1'": (
        lambda made, tmp_path: __import__("hf_tlmtl").TaskSpec(name="kind", type="classification", labels=[1, "1"]),
        ["labels [1, '1']", "same class name '1'", "distinct name"]),
    "prepare_dataset on an empty split": (
        lambda made, tmp_path: _empty_split_prepared(), ["empty training split", "0 rows", "n_train"]),
    "apply_lora on a grouped convolution, divisible rank": (
        lambda made, tmp_path: _lora_on_depthwise_conv(),
        ["grouped convolution (groups=24)", "cannot be merged", "Leave grouped convolutions out"]),
    "apply_lora matching only frozen BatchNorm layers": (
        lambda made, tmp_path: _lora_on_frozen_batch_norm(),
        ["target_modules='bn1' matches no Linear/Conv2d layer", "Layers that can take adapters", "or 'auto'"]),
    "from_pretrained, only pytorch_model.bin": (_load("pickled"), ["only safetensors", "use_safetensors=False"]),
    "from_pretrained(tasks=...), weights without the backbone": (
        _load("no_backbone", reheaded=True), ["backbone weights are missing", "from_backbone"]),
    "from_pretrained, weights without the backbone": (_load("no_backbone"), ["backbone weights are missing"]),
    "from_pretrained, malformed config.json": (_load("broken_json"), ["config.json is not valid JSON", "line 1 column 2"]),
    "MultiTaskTrainer, batch of one with BatchNorm": (
        lambda made, tmp_path: _trainer_check(tmp_path, per_device_train_batch_size=1),
        ["per_device_train_batch_size=1", "batch size of 2"]),
    "MultiTaskTrainer, negative learning rate": (
        lambda made, tmp_path: _trainer_check(tmp_path, learning_rate=-0.1), ["Invalid learning rate", "learning_rate=-0.1"]),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_refuses_bad_input(case, made, tmp_path):
    call, words = API_CASES[case]
    with pytest.raises(ValueError) as error:
        call(made, tmp_path)
    missing = [word for word in words if word not in str(error.value)]
    assert not missing, f"{missing} not in: {error.value}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not written, written


def test_rehead_does_not_reuse_a_same_named_head_of_another_type(made):
    """from_pretrained(tasks=...): 'shape' saved as a 3-class classification head; a 3-output multilabel
    task of that name gets a fresh head, a classification task with the same classes keeps it."""
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel

    saved = load_file(made["previous"] / "model.safetensors")["heads.shape.fc.weight"]
    names = TimmMultiTaskModel.from_pretrained(made["previous"]).tasks[0].labels
    other = TimmMultiTaskModel.from_pretrained(made["previous"], tasks=[TaskSpec(name="shape", type="multilabel", labels=names)])
    assert other.reused_heads == [] and other.new_heads == ["shape"]
    assert not torch.equal(other.heads["shape"].fc.weight, saved)
    reordered = TimmMultiTaskModel.from_pretrained(
        made["previous"], tasks=[TaskSpec(name="shape", type="classification", labels=names[::-1])])
    assert reordered.reused_heads == [] and not torch.equal(reordered.heads["shape"].fc.weight, saved)
    same = TimmMultiTaskModel.from_pretrained(made["previous"], tasks=[TaskSpec(name="shape", type="classification", labels=names)])
    assert same.reused_heads == ["shape"] and torch.equal(same.heads["shape"].fc.weight, saved)
