"""Shared helpers of the recipe tests (tests/test_recipe_*.py, test_predict.py, test_task_groups.py) and of the
experiments' tests (test_mtl_vs_single.py, test_transfer_study.py: their code lives under benchmarks/).

The recipes run for real, in a subprocess, the way a user runs them: ``python recipes/finetune.py``
or ``accelerate launch recipes/finetune.py``, on timm's ``test_resnet`` (random init) and tiny
images, offline.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "recipes" / "finetune.py"
PREDICT = REPO / "recipes" / "predict.py"
BENCHMARKS = REPO / "benchmarks"
ACCELERATE = Path(sys.executable).parent / "accelerate"

# A run of a few seconds: test_resnet at 32 px, tens of rows, one epoch, no checkpoints.
TINY = [
    "--backbone", "test_resnet",
    "--pretrained", "false",
    "--image_size", "32",
    "--embedded_image_size", "32",
    "--num_train_epochs", "1",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16",
    "--learning_rate", "0.003",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--dataloader_num_workers", "0",
    "--seed", "0",
]


def recipe_env(tmp: Path) -> dict[str, str]:
    """Offline, one thread per process, a private datasets cache (other test workers run beside us)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_DATASETS_CACHE=str(tmp / "hf_datasets_cache"),
        MPLBACKEND="Agg",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(
    script: Path, args: Sequence[str], tmp: Path, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=str(cwd or tmp),
        env=recipe_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_finetune(args: Sequence[str], tmp: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_script(FINETUNE, args, tmp, **kwargs)


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


# accelerate launchers of two CPU processes (gloo): command-line flags, and the shipped FSDP2 config file.
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]
ACCELERATE_CONFIGS = REPO / "recipes" / "configs" / "accelerate"
FSDP2_CONFIG = ["--config_file", str(ACCELERATE_CONFIGS / "fsdp2.yaml")]


def launch_command(launcher: Sequence[str], args: Sequence, output_dir: Path) -> list[str]:
    """``accelerate launch LAUNCHER recipes/finetune.py ARGS --output_dir OUTPUT_DIR`` on a free port."""
    return [str(ACCELERATE), "launch", *launcher, "--main_process_port", "0", str(FINETUNE), *map(str, args),
            "--output_dir", str(output_dir)]


def run_launch(launcher: Sequence[str], args: Sequence, output_dir: Path, tmp: Path) -> subprocess.CompletedProcess:
    """:func:`launch_command` run to its end (5 minutes at most), checked with :func:`check_ok`."""
    return check_ok(subprocess.run(launch_command(launcher, args, output_dir), cwd=tmp, env=recipe_env(tmp),
                                   capture_output=True, text=True, timeout=300))


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


def assert_same_tensors(got: Path, expected: Path, name: str = "model.safetensors") -> dict:
    """The safetensors file ``name`` holds bit-identical tensors under ``got`` and ``expected`` (a resumed run
    against the uninterrupted one); returns ``got``'s tensors."""
    import torch
    from safetensors.torch import load_file

    want, have = load_file(expected / name), load_file(got / name)
    assert want.keys() == have.keys(), name
    different = [key for key in want if not torch.equal(have[key], want[key])]
    assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    return have


def assert_same_training(run: Path, reference: Path, atol: float, tasks: Sequence[str] = ("shape", "scale")) -> dict:
    """``run``'s final weights (``model.safetensors``) and eval loss and metrics equal ``reference``'s within ``atol``.

    Returns ``run``'s weights. For a multi-process run against one process at the same global batch.
    """
    import torch
    from safetensors.torch import load_file

    weights, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], expected[key], rtol=0, atol=atol, msg=key)
    metrics, expected_metrics = summary(run)["eval"], summary(reference)["eval"]
    compared = [k for k in expected_metrics if k.startswith(("eval_loss", *(f"eval_{t}_" for t in tasks)))]
    assert len(compared) >= 2 * len(tasks)
    for key in compared:
        assert abs(metrics[key] - expected_metrics[key]) <= atol, (key, metrics[key], expected_metrics[key])
    return weights


def random_image(rng: np.random.Generator, size: int = 32, tint: int = 0) -> Image.Image:
    """A noisy image whose mean colour depends on ``tint`` (so classes are learnable)."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., tint % 3] = 160.0
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_image_folder(root: Path, classes: Sequence[str], per_class: int, size: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: the layout of datasets' ``imagefolder``."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            random_image(rng, size, tint=c).save(root / name / f"{name}_{i}.png")
    return root


def write_image_table(root: Path, rows: int = 24, size: int = 32, seed: int = 0) -> "tuple[Path, list[dict]]":
    """Images under ``root/images`` and the records of a table describing them (relative paths).

    Columns: ``path``, ``kind`` (class names as text: classification), ``brightness`` (float:
    regression), ``tags`` (list of text: multilabel; Parquet only), ``id`` (int, not a task).
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    kinds = ["cat", "dog", "fox"]
    records = []
    for i in range(rows):
        kind = i % 3
        image = random_image(rng, size, tint=kind)
        name = f"images/img_{i:03d}.png"
        image.save(root / name)
        records.append(
            {
                "path": name,
                "kind": kinds[kind],
                "brightness": float(np.asarray(image).mean() / 255.0),
                "tags": [t for t, on in (("round", i % 2 == 0), ("small", i % 4 < 2)) if on],
                "id": 1000 + i,
            }
        )
    return root, records


def load_script(path: Path, name: str) -> ModuleType:
    """The file ``path`` imported as module ``name`` (registered in ``sys.modules``: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str) -> ModuleType:
    """``recipes/<name>.py`` imported as a module (registered in ``sys.modules``: its dataclasses need that)."""
    return load_script(REPO / "recipes" / f"{name}.py", f"hf_tlmtl_recipe_{name}")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>/run.py``, an experiment's entry point, imported from its path as a module of another
    name (``hf_tlmtl_benchmark_<name>``), the way :func:`load_recipe` imports a recipe."""
    return load_script(BENCHMARKS / name / "run.py", f"hf_tlmtl_benchmark_{name}")


def write_csv(path: Path, records: Sequence[dict], columns: Sequence[str] = ("path", "kind", "brightness", "id")) -> Path:
    """The ``columns`` of ``records`` as a CSV file (list-valued columns such as ``tags`` do not fit CSV)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in records)
    return path
