"""Inputs that used to be silently wrong (issue 24, first part): now refused early, or read as the user meant.

- an infinite regression label (the weights turned NaN at the first step that read it);
- a 16-bit grayscale image (PIL's ``convert("RGB")`` clipped it: the model saw another picture);
- a model folder that asks to run its own code (``auto_map``): transformers prompted on the terminal;
- two runs started into one output folder: both finished, one model survived;
- a table whose format hides what a column is: whole numbers with a blank cell (read as floats, guessed
  regression), an integer column left out of the inferred tasks without a word, a header naming a column
  twice (trained as ``color.1``), numbers with a decimal comma (dropped).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import load_image_dataset, prepare_dataset, resolve_tasks
from hf_tlmtl.hub.pipeline import read_image
from hf_tlmtl.training.cli import UsageError
from hf_tlmtl.training.folder_lock import lock_output_dir, lock_path, unlock_output_dir

from recipe_utils import FINETUNE, PREDICT, TINY, recipe_env


def _model(tasks: list[TaskSpec]) -> TimmMultiTaskModel:
    return TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32)


# ---------------------------------------------------------------------------- non-finite labels
@pytest.mark.parametrize(
    ("task", "values", "row", "shown"),
    [
        (TaskSpec(name="age", type="regression"), [1.0, float("nan"), float("inf"), 2.0], 2, "inf"),
        (TaskSpec(name="box", type="regression", num_labels=2), [[1.0, 2.0], [3.0, float("-inf")], [0.0, 0.0]], 1, "-inf"),
        (TaskSpec(name="attrs", type="multilabel", labels=["a", "b"]), [[1.0, 0.0], [0.0, 1.0], [float("inf"), 1.0]], 2, "inf"),
    ],
)
def test_an_infinite_label_is_refused_naming_the_task_column_and_row(task, values, row, shown):
    images = [PILImage.new("RGB", (32, 32))] * len(values)
    ds = Dataset.from_dict({"image": images, task.name: values})
    with pytest.raises(ValueError, match=rf"Task '{task.name}' \(column '{task.name}'\): row {row} holds {shown} \(1 infinite value"):
        prepare_dataset(ds, _model([task]).config, train=False)


def test_nan_stays_a_missing_label():
    task = TaskSpec(name="age", type="regression")
    ds = Dataset.from_dict({"image": [PILImage.new("RGB", (32, 32))] * 3, "age": [1.0, float("nan"), 2.0]})
    rows = prepare_dataset(ds, _model([task]).config, train=False)[:]
    assert torch.isnan(rows["age"]).tolist() == [False, True, False]


def test_an_infinite_target_tensor_is_refused_by_the_model():
    model = _model([TaskSpec(name="age", type="regression")])
    with pytest.raises(ValueError, match=r"Task 'age': a target is infinite"):
        model(torch.zeros(2, 3, 32, 32), age=torch.tensor([1.0, float("inf")]))


def test_the_recipe_refuses_an_infinite_label_before_training(tmp_path):
    rows = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        PILImage.fromarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "size": "inf" if i == 7 else str(i / 10)})
    table = tmp_path / "t.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "size"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(FINETUNE), *TINY, "--dataset", str(table), "--image_column", "path", "--tasks", "size",
         "--output_dir", str(out)],
        cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Task 'size' (column 'size')" in errors[0] and "infinite" in errors[0]
    assert not out.exists()


# ---------------------------------------------------------------------------- 16-bit images
def _sixteen_and_eight_bit(tmp_path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, size=(32, 32), dtype=np.uint16)
    deep_path, shallow_path = tmp_path / "deep.png", tmp_path / "shallow.png"
    PILImage.fromarray(deep).save(deep_path)
    PILImage.fromarray(np.rint(deep / 257.0).astype(np.uint8)).save(shallow_path)
    assert PILImage.open(deep_path).mode.startswith("I")  # really 16 bits on disk
    return str(deep_path), str(shallow_path)


def test_a_16_bit_image_reaches_the_model_as_its_8_bit_picture(tmp_path):
    deep, shallow = _sixteen_and_eight_bit(tmp_path)
    task = TaskSpec(name="y", type="regression")
    ds = Dataset.from_dict({"image": [deep, shallow], "y": [0.0, 0.0]}, features=Features({"image": Image(), "y": Value("float32")}))
    pixels = prepare_dataset(ds, _model([task]).config, train=False)[:]["pixel_values"]
    torch.testing.assert_close(pixels[0], pixels[1], rtol=0, atol=0)
    clipped = np.asarray(PILImage.open(deep).convert("RGB"), dtype=np.float32)  # what PIL alone gives: clipped
    assert np.abs(clipped - np.asarray(PILImage.open(shallow).convert("RGB"), dtype=np.float32)).max() > 100


def test_the_pipeline_reads_a_16_bit_image_as_its_8_bit_picture(tmp_path):
    deep, shallow = _sixteen_and_eight_bit(tmp_path)
    assert np.array_equal(np.asarray(read_image(deep)), np.asarray(read_image(shallow)))


# ---------------------------------------------------------------------------- remote code
def _folder_that_asks_to_run_code(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "config.json").write_text(
        '{"model_type": "evil_net", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}'
    )
    (folder / "model.safetensors").write_bytes(b"")
    return folder, marker


def test_predict_never_runs_code_from_a_model_folder(tmp_path):
    folder, marker = _folder_that_asks_to_run_code(tmp_path)
    image = tmp_path / "x.png"
    PILImage.new("RGB", (32, 32)).save(image)
    proc = subprocess.run(
        [sys.executable, str(PREDICT), "--model", str(folder), "--data", str(image), "--output", str(tmp_path / "p.csv")],
        cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300, input="y\n",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "'evil_net' model, not an hf_tlmtl one" in error[0] and "never runs" in error[0]
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_from_pretrained_refuses_a_folder_of_another_model_type(tmp_path):
    folder, marker = _folder_that_asks_to_run_code(tmp_path)
    with pytest.raises(ValueError, match=r"describes a 'evil_net' model, not an hf_tlmtl one"):
        TimmMultiTaskModel.from_pretrained(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------- two runs, one folder
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    lock_output_dir(out)  # this test process is "the first run"
    try:
        proc = subprocess.run(
            [sys.executable, str(FINETUNE), *TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8",
             "--tasks", "shape", "--output_dir", str(out)],
            cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300,
        )
    finally:
        unlock_output_dir(out)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "is in use by another run" in errors[0] and f"pid {os.getpid()}" in errors[0]
    assert not out.exists()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hf_tlmtl.training.folder_lock import lock_output_dir; "
         f"lock_output_dir({str(out)!r}); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=recipe_env(tmp_path),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {holder.pid},"):
            lock_output_dir(out)
    finally:
        holder.kill()
        holder.wait()
    assert lock_output_dir(out) == lock_path(out)  # the killed holder's lock went with its process
    unlock_output_dir(out)


# ---------------------------------------------------------------------------- what a table's columns are
def _table(tmp_path, header: list[str], rows: list[list]) -> str:
    for i in range(len(rows)):
        PILImage.new("RGB", (8, 8), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    path = tmp_path / "t.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[f"{i}.png", *row] for i, row in enumerate(rows)])
    return str(path)


def test_whole_numbers_with_an_empty_cell_are_not_guessed_to_be_a_regression(tmp_path):
    table = _table(tmp_path, ["path", "cls", "size"], [[0, 0.1], [1, 0.2], ["", 0.3], [2, 0.4], [1, 0.5], [0, 0.6]])
    data = load_image_dataset(table, image_column="path")
    with pytest.raises(ValueError, match=r"Column 'cls' holds whole numbers and 1 empty cell\(s\).*--tasks cls:classification"):
        resolve_tasks(data, None, image_column="path")
    data, tasks = resolve_tasks(data, "cls:classification:3,size", image_column="path")  # stated: as the user says
    assert [(t.name, t.type) for t in tasks] == [("cls", "classification"), ("size", "regression")]


def test_an_integer_column_left_out_of_the_inferred_tasks_is_named(tmp_path, caplog):
    table = _table(tmp_path, ["path", "cls", "size"], [[i % 3, i / 10] for i in range(6)])
    with caplog.at_level("WARNING", logger="hf_tlmtl.data.task_columns"):
        _, tasks = resolve_tasks(load_image_dataset(table, image_column="path"), None, image_column="path")
    assert [t.name for t in tasks] == ["size"]
    assert "Integer column(s) ['cls'] left out of the inferred tasks" in caplog.text and "--tasks cls:classification" in caplog.text


def test_a_column_named_twice_in_the_header_is_refused(tmp_path):
    table = _table(tmp_path, ["path", "color", "color"], [["red", "x"], ["blue", "y"]] * 3)
    with pytest.raises(ValueError, match=r"t\.csv: column 'color' appears twice in the header \(columns 2 and 3\)"):
        load_image_dataset(table, image_column="path")


def test_numbers_with_a_decimal_comma_are_not_dropped_without_a_word(tmp_path):
    table = _table(tmp_path, ["path", "size", "kind"], [[f"{i},5", "ab"[i % 2]] for i in range(6)])
    with pytest.raises(ValueError, match=r"Column 'size' holds numbers written with a decimal comma"):
        resolve_tasks(load_image_dataset(table, image_column="path"), None, image_column="path")


# ---------------------------------------------------------------------------- a checkpoint cut short
def test_a_checkpoint_cut_short_is_never_resumed_and_the_previous_one_is_kept(tmp_path, monkeypatch):
    """The kill is injected at the exact point: after the Trainer's files, before the balancer state (its last file)."""
    from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
    from hf_tlmtl.training import trainer as trainer_module
    from hf_tlmtl.training.output_dir import complete_checkpoints, resolve_resume

    task = TaskSpec(name="y", type="regression")
    rows = Dataset.from_dict({"image": [PILImage.new("RGB", (32, 32), (i, 0, 0)) for i in range(8)], "y": [i / 8 for i in range(8)]})
    model = _model([task])
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2, save_steps=1, save_total_limit=1,
        per_device_train_batch_size=4, loss_balancing="uncertainty",
    )
    saved = trainer_module.save_balancer_state
    calls = []

    def killed_on_the_second_checkpoint(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing checkpoint-2")
        return saved(*a, **k)

    monkeypatch.setattr(trainer_module, "save_balancer_state", killed_on_the_second_checkpoint)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=prepare_dataset(rows, model.config, train=False))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    out = tmp_path / "out"
    first, second = out / "checkpoint-1", out / "checkpoint-2"
    assert (second / "trainer_state.json").is_file()  # looks complete to the Trainer ...
    assert (first / "balancer_state.json").is_file()  # ... and save_total_limit=1 did not remove the complete one
    assert complete_checkpoints(out) == [first]
    assert resolve_resume("true", out) == str(first)
    with pytest.raises(UsageError, match=r"checkpoint-2' is incomplete \(no balancer_state.json"):
        resolve_resume(str(second), out)
    monkeypatch.setattr(trainer_module, "save_balancer_state", saved)
    with pytest.raises(ValueError, match=r"checkpoint-2 is incomplete: it has no balancer_state.json"):
        MultiTaskTrainer(model=_model([task]), args=args, train_dataset=prepare_dataset(rows, model.config, train=False)).train(
            resume_from_checkpoint=str(second)
        )


def test_a_column_with_one_class_says_so_and_its_fix_works(tmp_path):
    table = _table(tmp_path, ["path", "kind"], [["cat"]] * 6)
    data = load_image_dataset(table, image_column="path")
    with pytest.raises(ValueError, match=r"Column 'kind' holds one value \('cat'\) in every row"):
        resolve_tasks(data, None, image_column="path")
    with pytest.raises(ValueError, match=r"Column 'kind' holds one class \('cat'\) in every row.*--tasks kind:classification:cat\|OTHER"):
        resolve_tasks(data, "kind", image_column="path")
    _, tasks = resolve_tasks(data, "kind:classification:cat|dog", image_column="path")  # the suggested fix goes through
    assert tasks[0].labels == ["cat", "dog"]


def test_a_float_image_in_0_1_is_scaled_not_blackened():
    from hf_tlmtl.image_processing import rgb_image

    values = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    image = PILImage.fromarray(values, mode="F")
    assert np.asarray(image.convert("RGB")).max() <= 1  # what PIL alone gives: black
    np.testing.assert_array_equal(np.asarray(rgb_image(image))[..., 0], np.rint(values * 255).astype(np.uint8))
