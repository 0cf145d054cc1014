"""Gradient checkpointing on vs off: peak memory and time of a TimmMultiTaskModel training step.

"on" is ``model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant":
False})`` (what ``TrainingArguments(gradient_checkpointing=True)`` calls): timm checkpoints the
backbone's blocks, transformers the task heads. Same backbone (random init), batch, two heads
(classification + regression) and AdamW for both. Each repetition is a fresh subprocess, "off" and
"on" interleaved so drift on a shared machine hits both alike; each child runs one warm-up step
(it allocates the AdamW state), resets the kernel's RSS high-water mark, then runs the timed steps:
its peak RSS is that of a steady-state training step (weights, gradients, optimiser state and the
activations kept for backward). glibc is told to mmap tensors >= 64 KiB so freed memory leaves RSS
(``peak_memory.CHILD_ENV``). Medians over the repetitions are printed and written to
``benchmarks/RESULTS.md`` (this benchmark's own ``## `` section, the others are kept).

    python benchmarks/gradient_checkpointing.py [--backbones resnet50 vit_small_patch16_224] [--batch 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peak_memory import CHILD_ENV, reset_peak_rss, status_kib  # benchmarks/ is on sys.path when run as a script
from results_md import write_section

MODES = ("off", "on")
HEADING = "## Gradient checkpointing: peak memory of a training step"


# ----------------------------------------------------------------------------- child process
def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training setup: a warm-up step, then ``steps`` timed steps; the peak RSS of those steps."""
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tasks = [TaskSpec(name="label", type="classification", num_labels=10), TaskSpec(name="value", type="regression")]
    model = TimmMultiTaskModel.from_backbone(args.child_backbone, tasks=tasks, pretrained=False).train()
    if mode == "on":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = {"label": torch.randint(0, 10, (args.batch,), generator=g), "value": torch.rand(args.batch, generator=g)}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=x, **labels).loss.backward()
        optimizer.step()

    step()  # warm-up: allocates the optimiser state, which both modes share
    rss_before = status_kib("VmRSS")
    peak_reset = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "checkpointing": bool(model.is_activation_checkpointing and model.backbone.grad_checkpointing),
        "peak_reset": peak_reset,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": status_kib("VmHWM") / 1024,
        "median_step_s": statistics.median(times),
    }


# ---------------------------------------------------------------------------- parent process
def run_one(backbone: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", mode, "--child-backbone", backbone, "--batch", str(args.batch),
        "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"{backbone} with checkpointing {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one backbone and mode."""
    return {
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "growth_mib": statistics.median(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs),
        "step_s": statistics.median(r["median_step_s"] for r in runs),
        "peaks": [round(r["peak_rss_mib"]) for r in runs],
        "checkpointing": {r["checkpointing"] for r in runs},
        "peak_reset": all(r["peak_reset"] for r in runs),
    }


def render(results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    import timm
    import transformers

    lines = [
        f"{HEADING} ({', '.join(results)}, batch {args.batch}, {args.size}px, CPU fp32)",
        "",
        f"Device: CPU ({platform.processor() or platform.machine()}, {args.threads} threads); torch {torch.__version__}, "
        f"timm {timm.__version__}, transformers {transformers.__version__}. Random init, two heads (classification + "
        "regression), AdamW. \"on\" = `model.activation_checkpointing_enable(activation_checkpointing_kwargs="
        "{\"use_reentrant\": False})` (timm checkpoints the backbone blocks, transformers the heads). "
        f"{args.reps} repetitions per mode, each a fresh subprocess, off/on interleaved; each runs a warm-up step, "
        f"then {args.steps} timed step{'s' if args.steps != 1 else ''}. Peak RSS: the kernel's high-water mark over the timed steps (reset after "
        "the warm-up; glibc told to mmap tensors >= 64 KiB so freed memory leaves RSS); growth = peak minus RSS "
        f"before the steps (about the activations kept for backward). Medians; 1-min load average at the end "
        f"{os.getloadavg()[0]:.1f} (other jobs on the CPU stretch the times, not the memory).",
        "",
        "| backbone | checkpointing | peak RSS, training step (MiB) | vs off | growth in the step (MiB) | vs off "
        "| median step (ms) | vs off | peaks per repetition (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for backbone, modes in results.items():
        off = modes["off"]
        for mode in MODES:
            r = modes[mode]
            lines.append(
                f"| {backbone} | {mode} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / off['peak_rss_mib']:.2f} "
                f"| {r['growth_mib']:.0f} | {r['growth_mib'] / off['growth_mib']:.2f} | {1000 * r['step_s']:.0f} "
                f"| {r['step_s'] / off['step_s']:.2f} | {r['peaks']} |"
            )
        on = modes["on"]
        saved = off["peak_rss_mib"] - on["peak_rss_mib"]
        verdicts.append(
            f"{backbone}: {'lower' if saved > 0 else 'NOT lower'} by {saved:.0f} MiB "
            f"({100 * saved / off['peak_rss_mib']:.0f}% of the peak), step {on['step_s'] / off['step_s']:.2f}x the time"
        )
    lines += ["", "Target (checkpointing lowers the measured peak): " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per repetition (the peak is per step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--child-backbone", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return
    results = {}
    for backbone in args.backbones:
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for rep in range(args.reps):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                runs[mode].append(run_one(backbone, mode, args))
                print(f"{backbone} {mode} #{rep}: {runs[mode][-1]['peak_rss_mib']:.0f} MiB, "
                      f"{1000 * runs[mode][-1]['median_step_s']:.0f} ms", flush=True)
        results[backbone] = {mode: summarise(r) for mode, r in runs.items()}
        if results[backbone]["on"]["checkpointing"] != {True} or results[backbone]["off"]["checkpointing"] != {False}:
            raise RuntimeError(f"{backbone}: checkpointing was not in the state asked for; the numbers would mislead.")
    text = render(results, args)
    print(text)
    write_section(text, Path(args.results))


if __name__ == "__main__":
    main()
