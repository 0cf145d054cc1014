"""Training images/s of the recipe's data path against a plain timm + PyTorch loop, same image folder.

Both train the same timm backbone (same initial weights, AdamW, batch, steps) on the same folder of
PNG files with the same timm training transform and the same DataLoader workers:

- recipe: ``load_image_dataset`` (datasets' imagefolder) -> ``resolve_tasks`` -> ``prepare_dataset``
  (row-seeded augmentation, as the recipe runs it) -> ``MultiTaskCollator`` -> ``MultiTaskTrainer.train``;
- plain: ``torchvision.datasets.ImageFolder(transform=...)`` -> ``DataLoader(shuffle=True)`` -> a loop of
  forward, cross-entropy, backward, ``AdamW.step``.

One repetition is one epoch of each (workers started inside the timed part for both), alternating which
goes first; medians over the repetitions; the ratio is recipe / plain images/s (goal >= 0.95).

    python benchmarks/data_loading.py [--images 256] [--batch 32] [--workers 2] [--size 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from hf_tlmtl import TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset
from hf_tlmtl.sources import load_image_dataset, resolve_tasks
from hf_tlmtl.trainer import MultiTaskTrainer, MultiTaskTrainingArguments
from results_md import write_section  # benchmarks/ is on sys.path when run as a script

CLASSES = ("a", "b")
NOTE = (
    "The data-only rows compare the two data paths alone (datasets' Arrow-backed imagefolder with row-seeded augmentation against torchvision's ImageFolder); the training rows add what the Trainer does around the same steps (set-up inside `train()`, accelerate's dataloader wrapper, per-step logging and per-task loss bookkeeping), which weighs most on a short epoch of small steps like this one's. Row-seeded augmentation cost about half the data throughput before this benchmark (np.random.SeedSequence and torch.manual_seed per image); it now hashes the seed and seeds only the CPU generator."
)


def write_folder(root: Path, images: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        name = CLASSES[i % len(CLASSES)]
        (root / name).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / name / f"{i:05d}.png")
    return root


def recipe_epoch(folder: Path, initial: dict, args: argparse.Namespace, out: Path, train_model: bool = True) -> float:
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
    trainer = MultiTaskTrainer(model=model, args=training, train_dataset=train, data_collator=MultiTaskCollator(tasks))
    start = time.perf_counter()
    if train_model:
        trainer.train()
        return len(train) / (time.perf_counter() - start)
    rows = sum(len(batch["label"]) for batch in trainer.get_train_dataloader())
    return rows / (time.perf_counter() - start)


def plain_epoch(folder: Path, initial: dict, transform, args: argparse.Namespace, train_model: bool = True) -> float:
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
    for x, y in loader:
        if not train_model:
            continue
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-side", type=int, default=96, help="side of the PNG files")
    parser.add_argument("--size", type=int, default=64, help="model input side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
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
    speeds: dict[str, list[float]] = {"recipe": [], "plain": [], "recipe data": [], "plain data": []}
    for rep in range(args.reps + 1):  # the first round warms caches and imports; not counted
        order = list(speeds) if rep % 2 == 0 else list(reversed(speeds))
        for name in order:
            torch.manual_seed(0)
            train_model = not name.endswith("data")
            speed = (recipe_epoch(folder, recipe_state, args, tmp / "out", train_model) if name.startswith("recipe")
                     else plain_epoch(folder, plain_state, transform, args, train_model))
            if rep:
                speeds[name].append(speed)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratio = medians["recipe"] / medians["plain"]
    data_ratio = medians["recipe data"] / medians["plain data"]
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
        f"| recipe (datasets imagefolder + prepare_dataset + MultiTaskTrainer) | {medians['recipe']:.1f} | "
        + ", ".join(f"{v:.1f}" for v in speeds["recipe"]) + " |",
        f"| plain (torchvision ImageFolder + DataLoader + loop) | {medians['plain']:.1f} | "
        + ", ".join(f"{v:.1f}" for v in speeds["plain"]) + " |",
        f"| data only: recipe (the Trainer's train dataloader, one pass) | {medians['recipe data']:.1f} | "
        + ", ".join(f"{v:.1f}" for v in speeds["recipe data"]) + " |",
        f"| data only: plain (the DataLoader, one pass) | {medians['plain data']:.1f} | "
        + ", ".join(f"{v:.1f}" for v in speeds["plain data"]) + " |",
        "",
        f"Ratio recipe / plain, training: **{ratio:.3f}** (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
        f"data only: **{data_ratio:.3f}**.",
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
