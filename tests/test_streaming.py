"""--streaming: datasets' IterableDataset through prepare_dataset, the collator, the Trainer and 2 processes.

The data is a folder of Parquet files written by ``datasets`` (images as bytes, a ClassLabel ``label``,
a float ``row`` = the row's id), named by datasets' split convention (train-*, validation-*).
"""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value

from hf_tlmtl.data.streaming import load_streaming_dataset
from recipe_utils import ACCELERATE, REPO, TINY, check_ok, load_recipe, random_image, recipe_env, run_finetune, summary

PROBE = REPO / "tests" / "stream_epoch_probe.py"
FEATURES = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"]), "row": Value("float32")})


def _rows(first: int, n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        buffer = io.BytesIO()
        random_image(rng, 16, tint=i).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    return Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(n)], "row": [float(first + i) for i in range(n)]}, features=FEATURES
    )


def write_parquet_stream(folder, files: int, rows_per_file: int, validation: int = 4):
    folder.mkdir(parents=True)
    for k in range(files):
        _rows(k * rows_per_file, rows_per_file, seed=k).to_parquet(folder / f"train-{k:05d}-of-{files:05d}.parquet")
    _rows(1000, validation, seed=99).to_parquet(folder / "validation-00000-of-00001.parquet")
    return folder


CASES = {"per_process": (2, 12, False), "dispatched": (3, 8, True)}  # files, rows per file, dispatch expected


@pytest.fixture(scope="module")
def passes(tmp_path_factory):
    """One 2-process launch reads one pass of each stream: 2 files (each process reads its own file) and 3 files
    (the main process reads and dispatches)."""
    tmp = tmp_path_factory.mktemp("stream_passes")
    folders = [write_parquet_stream(tmp / name, files, rows) for name, (files, rows, _) in CASES.items()]
    out = tmp / "probe"
    out.mkdir()
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(PROBE), str(out),
              *map(str, folders)]
    check_ok(subprocess.run(launch, cwd=tmp, env=recipe_env(tmp), capture_output=True, text=True, timeout=300))
    return {name: [json.loads((out / f"{name}_rank{k}.json").read_text()) for k in range(2)] for name in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_read_every_row_once_per_pass(passes, case):
    files, rows_per_file, dispatch = CASES[case]
    ranks = passes[case]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["dispatch"] for r in ranks] == [dispatch, dispatch]
    seen = ranks[0]["rows"] + ranks[1]["rows"]
    assert len(ranks[0]["rows"]) == len(ranks[1]["rows"]) == files * rows_per_file // 2
    assert sorted(seen) == list(range(files * rows_per_file))  # none twice, none left out
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])


def test_recipe_trains_on_a_stream_for_max_steps(tmp_path):
    folder = write_parquet_stream(tmp_path / "stream", 2, 8)
    out = tmp_path / "run"
    args = [*TINY, "--image_size", "16", "--dataset", folder, "--streaming", "true", "--max_steps", "3",
            "--tasks", "label", "--per_device_train_batch_size", "4", "--output_dir", out]
    proc = check_ok(run_finetune(args, tmp_path))
    assert "streamed (2 file(s)) train / 4 validation rows" in proc.stdout
    info = summary(out)
    assert info["data"]["streaming"] is True and info["data"]["train_rows"] is None
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "eval_label_accuracy" in info["eval"]


def test_streaming_without_max_steps_is_refused_before_reading(tmp_path):
    finetune = load_recipe("finetune")
    argv = ["--dataset", str(tmp_path / "not_read"), "--streaming", "true", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(finetune.UsageError, match="--streaming true needs --max_steps N"):
        finetune.setup(argv)
    assert not (tmp_path / "o").exists()


def test_stream_without_validation_split_or_with_text_classes_is_refused(tmp_path):
    folder = tmp_path / "no_validation"
    folder.mkdir()
    _rows(0, 4, seed=0).to_parquet(folder / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"has no validation split .*\(validation-\*\.parquet"):
        load_streaming_dataset(str(folder), tasks="label")
    text = tmp_path / "text_classes"
    text.mkdir()
    for split in ("train", "validation"):
        rows = _rows(0, 4, seed=0)
        rows = rows.cast_column("label", Value("int64")).map(lambda r: {"label": "abc"[r["label"]]})
        rows.cast_column("label", Value("string")).to_parquet(text / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="column 'label' holds .*string.* a stream is not re-encoded"):
        load_streaming_dataset(str(text), tasks="label")
