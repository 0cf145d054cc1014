"""Training images/s of the recipe's data path against a plain timm + PyTorch loop, same image folder.

Both train the same timm backbone (same initial weights, AdamW, batch, steps) on the same folder of
PNG files with the same timm training transform and the same DataLoader workers:

- recipe: ``load_image_dataset`` (datasets' imagefolder) -> ``resolve_tasks`` -> ``prepare_dataset``
  (row-seeded augmentation, as the recipe runs it) -> ``MultiTaskCollator`` -> ``MultiTaskTrainer.train``;
- plain: ``torchvision.datasets.ImageFolder(transform=...)`` -> ``DataLoader(shuffle=True)`` -> a loop of
  forward, cross-entropy, backward, ``AdamW.step``.

One repetition is one epoch of each (workers started inside the timed part for both), alternating which
goes first; medians over the repetitions, ratios as the median of each round's paired ratio. Two speeds per training epoch: the whole epoch (``train()``'s
set-up included: accelerate's preparation, the Trainer's ``gc.collect``, worker start-up) and the steady
state, the images of steps 2..N over the time from the end of step 1 to the end of step N (what a long run
sees). The ratios are recipe / plain images/s (goal >= 0.95).

    python benchmarks/data_loading.py [--images 1024] [--batch 32] [--workers 2] [--size 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from transformers import TrainerCallback

from hf_tlmtl import TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset
from hf_tlmtl.data import load_image_dataset, resolve_tasks
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from results_md import write_section  # benchmarks/ is on sys.path when run as a script

CLASSES = ("a", "b")
ROWS = {
    "recipe steady": "training, steady state (steps 2..N): recipe (datasets imagefolder + prepare_dataset + MultiTaskTrainer)",
    "plain steady": "training, steady state (steps 2..N): plain (torchvision ImageFolder + DataLoader + loop)",
    "recipe": "training, whole epoch with set-up: recipe",
    "plain": "training, whole epoch with set-up: plain",
    "recipe data": "data only: recipe (the Trainer's train dataloader, one pass)",
    "plain data": "data only: plain (the DataLoader, one pass)",
}
NOTE = (
    "The steady-state rows time steps 2..N of the epoch, what a long run sees: the goal applies to them. The "
    "whole-epoch rows add what each `train()` call does once (accelerate's preparation of model, optimizer and "
    "dataloader; the Trainer's `gc.collect()` on entry, 0.43 s even in a fresh process, whose torch + transformers "
    "imports hold some 550,000 objects) and the first batch from "
    "freshly started workers: the set-up line above. The data-only rows compare the two data paths alone "
    "(datasets' Arrow-backed imagefolder with row-seeded augmentation against torchvision's ImageFolder). Row "
    "seeding costs about 13 us per image (a hash and three generator seeds); the generators' states are saved "
    "and restored once per batch, not per image. On 2 cores the two workers and the training process share the "
    "CPUs, so a round's speed varies by about 15%; each round's recipe / plain ratio pairs contenders measured "
    "back to back."
)


def write_folder(root: Path, images: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        name = CLASSES[i % len(CLASSES)]
        (root / name).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / name / f"{i:05d}.png")
    return root


class _StepClock(TrainerCallback):
    """The time at the end of every training step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())


def steady_speed(rows: int, batch: int, stamps: list[float]) -> float:
    """Images/s of steps 2..N: every row but the first batch's, from the end of step 1 to the end of step N."""
    return (rows - batch) / (stamps[-1] - stamps[0])


def speeds_of(rows: int, seconds: float, batch: int, stamps: list[float]) -> tuple[float, float, float]:
    """(whole-epoch images/s, steady-state images/s, set-up seconds: the epoch's time beyond its rows at the steady speed)."""
    if not stamps:
        return rows / seconds, float("nan"), float("nan")
    steady = steady_speed(rows, batch, stamps)
    return rows / seconds, steady, seconds - rows / steady


def recipe_epoch(folder: Path, initial: dict, args: argparse.Namespace, out: Path, train_model: bool = True) -> tuple[float, float, float]:
    data = load_image_dataset(str(folder), validation_fraction=0.01, verify_images=False)
    data, tasks = resolve_tasks(data, "label")
    model = TimmMultiTaskModel.from_backbone(args.backbone, tasks, image_size=args.size)
    model.load_state_dict(initial)
    train = prepare_dataset(data["train"], model.config, train=True, seed=0)
    training = MultiTaskTrainingArguments(
        output_dir=str(out), report_to="none", per_device_train_batch_size=args.batch, num_train_epochs=1,
        learning_rate=1e-3, dataloader_num_workers=args.workers, save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, seed=0,
    )
    clock = _StepClock()
    trainer = MultiTaskTrainer(model=model, args=training, train_dataset=train, data_collator=MultiTaskCollator(tasks),
                               callbacks=[clock])
    start = time.perf_counter()
    if train_model:
        trainer.train()
        return speeds_of(len(train), time.perf_counter() - start, args.batch, clock.stamps)
    rows = sum(len(batch["label"]) for batch in trainer.get_train_dataloader())
    return speeds_of(rows, time.perf_counter() - start, args.batch, [])


def plain_epoch(folder: Path, initial: dict, transform, args: argparse.Namespace, train_model: bool = True) -> tuple[float, float, float]:
    images = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    # The recipe's training split leaves out its 1% validation rows: train on as many here.
    rows = max(1, round(len(images) * 0.99))
    subset = torch.utils.data.Subset(images, range(rows))
    model = timm.create_model(args.backbone, pretrained=False, num_classes=len(CLASSES))
    model.load_state_dict(initial)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    stamps = []
    for x, y in loader:
        if not train_model:
            continue
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return speeds_of(rows, time.perf_counter() - start, args.batch, stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-side", type=int, default=96, help="side of the PNG files")
    parser.add_argument("--size", type=int, default=64, help="model input side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hf_tlmtl_data_loading_"))
    folder = write_folder(tmp / "images", args.images, args.image_side)
    reference = TimmMultiTaskModel.from_backbone(
        args.backbone, resolve_tasks(load_image_dataset(str(folder), verify_images=False), "label")[1], image_size=args.size
    )
    transform = build_transforms(reference.config, train=True)
    recipe_state = reference.state_dict()
    plain_state = {**reference.backbone.state_dict(), **_head(reference, args.backbone)}
    contenders = ("recipe", "plain", "recipe data", "plain data")
    speeds: dict[str, list[float]] = {name: [] for name in (*contenders, "recipe steady", "plain steady")}
    setup: dict[str, list[float]] = {"recipe": [], "plain": []}
    for rep in range(args.reps + 1):  # the first round warms caches and imports; not counted
        order = contenders if rep % 2 == 0 else tuple(reversed(contenders))
        for name in order:
            torch.manual_seed(0)
            train_model = not name.endswith("data")
            speed, steady, setup_seconds = (recipe_epoch(folder, recipe_state, args, tmp / "out", train_model) if name.startswith("recipe")
                             else plain_epoch(folder, plain_state, transform, args, train_model))
            if rep:
                speeds[name].append(speed)
                if train_model:
                    speeds[f"{name} steady"].append(steady)
                    setup[name].append(setup_seconds)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    # Paired: each round's recipe / plain, then the median over rounds (a slow round slows both contenders).
    ratios = {kind: [r / p for r, p in zip(speeds[f"recipe{kind}"], speeds[f"plain{kind}"])]
              for kind in ("", " steady", " data")}
    ratio, steady_ratio, data_ratio = (statistics.median(ratios[kind]) for kind in ("", " steady", " data"))
    spread = {kind: f"{min(values):.2f}-{max(values):.2f}" for kind, values in ratios.items()}
    lines = [
        f"## Data loading: recipe vs plain timm + PyTorch loop ({args.backbone}, {args.images} PNG {args.image_side}px "
        f"-> {args.size}px, batch {args.batch}, {args.workers} workers, CPU)",
        "",
        f"`python benchmarks/data_loading.py` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"timm {timm.__version__}; one epoch of training per repetition and contender (same initial weights, AdamW, "
        f"timm train transform, DataLoader workers started inside the timed part), {args.reps} interleaved repetitions "
        f"after a warm-up round, medians; 1-min load average at the end {os.getloadavg()[0]:.1f} (other jobs share this "
        "machine).",
        "",
        "| contender | median images/s | runs (images/s) |",
        "|---|---:|---|",
        *(f"| {label} | {medians[name]:.1f} | " + ", ".join(f"{v:.1f}" for v in speeds[name]) + " |"
          for name, label in ROWS.items()),
        "",
        f"Ratio recipe / plain (median of the {args.reps} rounds' paired ratios, range in brackets), training at steady "
        f"state: **{steady_ratio:.3f}** ({spread[' steady']}; goal >= 0.95: {'met' if steady_ratio >= 0.95 else 'NOT met'}); "
        f"whole epoch with set-up: **{ratio:.3f}** ({spread['']}); data only: **{data_ratio:.3f}** ({spread[' data']}). "
        f"Set-up per epoch (its time beyond its rows at the steady speed; median): recipe "
        f"{statistics.median(setup['recipe']):.2f} s, plain {statistics.median(setup['plain']):.2f} s.",
        "",
        NOTE,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(text, Path(args.results))


def _head(model: TimmMultiTaskModel, backbone: str) -> dict[str, torch.Tensor]:
    name = timm.create_model(backbone, pretrained=False).pretrained_cfg.get("classifier", "fc")
    head = model.heads["label"].fc
    return {f"{name}.weight": head.weight.detach(), f"{name}.bias": head.bias.detach()}


if __name__ == "__main__":
    main()
