"""Epoch time of head training with the feature cache vs recomputing the frozen backbone each epoch.

Feature extraction (frozen backbone, heads train) on embedded shapes: the same heads, data,
batch size and optimizer, trained either

- *recompute*: images -> eval transform -> frozen backbone -> heads, every epoch (what a plain
  training loop does), or
- *cached*: :func:`hf_tlmtl.data.cache_features` ran the backbone once; each epoch reads the
  pooled features from the Arrow cache -> heads.

Epochs of the two are interleaved (recompute, cached, recompute, ...) so machine load hits both
alike; the table reports medians and their ratio, plus the one-off cost of building the cache
and of reopening it (fingerprint + memory-mapped Arrow file, no backbone run).

    python benchmarks/feature_cache.py                  # resnet18, 2000 images at 64 px, 5 repeats
    python benchmarks/feature_cache.py --no-write       # print only, leave RESULTS.md alone
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, cache_features, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.transfer import apply_transfer_strategy
from results_md import write_section  # benchmarks/ is on sys.path when run as a script

SECTION = "## Feature cache (benchmarks/feature_cache.py)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved epochs of each kind")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for both kinds (default: torch's). 1 is steadier on a loaded machine.",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    return parser.parse_args()


def build_model(backbone: str, features, image_size: int) -> TimmMultiTaskModel:
    tasks = [
        TaskSpec(name="shape", type="classification", labels=features["shape"].names),
        TaskSpec(name="color", type="classification", labels=features["color"].names),
        TaskSpec(name="scale", type="regression"),
        TaskSpec(name="rotation", type="regression"),
        TaskSpec(name="marks", type="multilabel", labels=features["marks"].feature.names),
    ]
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone(backbone, tasks, pretrained=False, image_size=image_size)
    apply_transfer_strategy(model, "feature_extraction")
    return model


def train_epoch(model: TimmMultiTaskModel, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    """One epoch of head training; returns seconds."""
    model.train()
    start = time.perf_counter()
    for batch in loader:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def loader_for(dataset, model: TimmMultiTaskModel, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=MultiTaskCollator(model.tasks)
    )



def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_embedded_dataset("shapes", n_train=args.n_train, n_eval=16, image_size=args.image_size, seed=0)
    train = data["train"]
    generate_s = time.perf_counter() - t0
    model = build_model(args.backbone, train.features, args.image_size)
    heads = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(heads, lr=1e-3)

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cached = cache_features(model, train, batch_size=args.batch_size, cache_dir=cache_dir)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = cache_features(model, train, batch_size=args.batch_size, cache_dir=cache_dir)
        reopen_s = time.perf_counter() - start

        recompute_loader = loader_for(prepare_dataset(train, model.config, train=False), model, args.batch_size)
        cached_loader = loader_for(cached, model, args.batch_size)
        train_epoch(model, cached_loader, optimizer)  # warm-up (allocator, first-call overheads)
        recompute_s, cached_s = [], []
        for repeat in range(args.repeats):
            recompute_s.append(train_epoch(model, recompute_loader, optimizer))
            cached_s.append(train_epoch(model, cached_loader, optimizer))
            print(f"repeat {repeat + 1}/{args.repeats}: recompute {recompute_s[-1]:.2f} s, cached {cached_s[-1]:.3f} s", flush=True)

    load = os.getloadavg()[0]
    recompute, cache = statistics.median(recompute_s), statistics.median(cached_s)
    ratio = recompute / cache
    first_epoch = build_s + cache
    rows = [
        ("recompute frozen backbone, per epoch", f"{recompute:.2f} s", "1.0x"),
        ("cached features, per epoch (after the first)", f"{cache:.3f} s", f"{ratio:.1f}x faster"),
        ("first epoch with cache (build + epoch)", f"{first_epoch:.2f} s", f"{recompute / first_epoch:.2f}x"),
        ("reopen an existing cache (hash + mmap)", f"{reopen_s:.2f} s", ""),
    ]
    table = "| | median | vs recompute |\n|---|---:|---:|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    target = "met" if ratio >= 20 else "NOT met"
    text = (
        f"{SECTION}\n\n"
        f"Feature extraction on embedded shapes: `{args.backbone}` (pretrained=False, frozen, 5 heads: 2 classification, "
        f"2 regression, 1 multilabel), {args.n_train} images at {args.image_size} px, batch {args.batch_size}, AdamW on the "
        f"heads; {args.repeats} interleaved epochs of each kind, medians. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__} on CPU; 1-min load average {load:.1f} at the end, "
        f"this job included (other jobs inflate the many tiny ops of the cached epochs most).\n\n"
        f"{table}\n"
        f"Target >= 20x per epoch after the first: **{target}** ({ratio:.1f}x). Raw epochs (s): recompute "
        f"{[round(s, 2) for s in recompute_s]}, cached {[round(s, 3) for s in cached_s]}. Dataset generation took "
        f"{generate_s:.1f} s. The cache is an Arrow file written by `datasets.Dataset.map`, fingerprinted by backbone "
        "weights + dataset fingerprint + eval transform; reopening it runs no backbone.\n"
    )
    print()
    print(text)
    if not args.no_write:
        write_section(text)
        print("Updated benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
