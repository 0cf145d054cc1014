"""Inference over a folder of images: the pipeline's default batching against one image per forward and a plain loop.

Three contenders predict every task of the same saved model for the same image files (PNG on disk,
read and preprocessed by each contender):

- ``pipeline default``: ``pipeline("multitask-image-classification", model=d)(paths)``, no batch size given
  (hf_tlmtl's default, ``DEFAULT_BATCH_SIZE``);
- ``pipeline batch_size=1``: what transformers' pipelines do by default, and this one did before;
- ``plain batched loop``: ``AutoImageProcessor`` + ``model(pixel_values=...)`` under ``torch.no_grad``, in
  batches of the same size, no pipeline.

Repetitions are interleaved (drift hits every contender alike); medians and ratios are printed and
written to benchmarks/RESULTS.md.

    python benchmarks/pipeline_batching.py [--backbone resnet18] [--images 256] [--size 160] [--reps 3]
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
import transformers
from PIL import Image

import hf_tlmtl  # noqa: F401  (registers the pipeline and the Auto classes)
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.hub.pipeline import DEFAULT_BATCH_SIZE, PIPELINE_TASK
from results_md import write_section  # benchmarks/ is on sys.path when run as a script

TASKS = [
    TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart"]),
    TaskSpec(name="scale", type="regression"),
    TaskSpec(name="attrs", type="multilabel", labels=["red", "big"]),
]


def write_images(folder: Path, count: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def plain_loop(model: TimmMultiTaskModel, processor, paths: list[str], batch: int, device: str) -> list[dict[str, torch.Tensor]]:
    results = []
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[start:start + batch]]
            logits = model(pixel_values=processor(images, return_tensors="pt")["pixel_values"].to(device)).logits
            results += [{name: value[i] for name, value in logits.items()} for i in range(len(images))]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=160, help="model input size (the images are this size too)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="pipeline_batching_"))
    torch.manual_seed(0)
    TimmMultiTaskModel.from_backbone(args.backbone, TASKS, image_size=args.size).save_pretrained(work / "model")
    paths = write_images(work, args.images, args.size)

    default_pipe = transformers.pipeline(PIPELINE_TASK, model=str(work / "model"), device=args.device)
    single_pipe = transformers.pipeline(PIPELINE_TASK, model=str(work / "model"), device=args.device, batch_size=1)
    model = transformers.AutoModel.from_pretrained(work / "model").eval().to(args.device)
    processor = transformers.AutoImageProcessor.from_pretrained(work / "model")

    contenders = {
        "pipeline default": lambda files: default_pipe(files),
        "pipeline batch_size=1": lambda files: single_pipe(files),
        "plain batched loop": lambda files: plain_loop(model, processor, files, DEFAULT_BATCH_SIZE, args.device),
    }
    # The contenders compute the same thing (checked on a few images), and each is warmed up once.
    answers = [run(paths[:DEFAULT_BATCH_SIZE]) for run in contenders.values()]
    for x, y, z in zip(*answers):
        assert abs(x["scale"]["value"][0] - y["scale"]["value"][0]) < 1e-4
        assert abs(x["scale"]["value"][0] - float(z["scale"][0])) < 1e-4

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(args.reps):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for name in order:
            start = time.perf_counter()
            out = contenders[name](paths)
            times[name].append(time.perf_counter() - start)
            assert len(out) == len(paths)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["pipeline default"]
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s))"
    )
    lines = [
        f"## Pipeline batching ({args.backbone}, {args.images} images, {args.size}px, {args.device})",
        "",
        f"Device: {device_name}; torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}. "
        f"`pipeline(\"{PIPELINE_TASK}\", model=d)` over {args.images} PNG files ({args.backbone}, random init, 3 heads), "
        f"read and preprocessed by each contender; the default batch size is hf_tlmtl's `DEFAULT_BATCH_SIZE` = "
        f"{DEFAULT_BATCH_SIZE}, the plain loop uses the same. {args.reps} interleaved repetitions after a warm-up, "
        f"median wall time; 1-min load average at the end {os.getloadavg()[0]:.1f} (other jobs on the machine "
        "inflate the spread).",
        "",
        "| contender | median (s) | images/s | time vs pipeline default |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {value:.2f} | {args.images / value:.0f} | {value / base:.2f}x |" for name, value in medians.items()
    ]
    raw = "; ".join(f"{name} [{', '.join(f'{v:.2f}' for v in values)}]" for name, values in times.items())
    lines += [
        "",
        f"The default pipeline is {medians['pipeline batch_size=1'] / base:.1f}x faster than one image per forward, "
        f"and takes {base / medians['plain batched loop']:.2f}x the time of the plain batched loop. Raw times (s): {raw}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(text, Path(args.results))


if __name__ == "__main__":
    main()
