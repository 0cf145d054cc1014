"""LoRA against full fine-tuning and feature extraction: trainable parameters, peak memory, step time.

Same backbone (random init), batch, loss (cross-entropy on one classification head) and optimiser
(AdamW over the trainable parameters) for every contender. Each contender runs in its own
subprocess, so peak resident memory (RSS) is its own: the training-phase peak is read from the
kernel's high-water mark (``VmHWM``), reset after the model is built, so model construction does not
count. The children run with ``MALLOC_MMAP_THRESHOLD_=65536``: tensors of 64 KiB and more are mmapped
and given back to the kernel when freed, so RSS follows the memory actually alive (glibc's default
keeps freed heap memory resident, which hides most of the difference). Medians over the repetitions; results are printed and written to ``benchmarks/RESULTS.md``
(this benchmark's own ``## `` section, the others are kept).

    python benchmarks/adapters.py [--backbone vit_small_patch16_224] [--batch 4] [--reps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peak_memory import CHILD_ENV, reset_peak_rss, status_kib  # benchmarks/ is on sys.path when run as a script
from results_md import write_section

NUM_CLASSES = 10
CONTENDERS = ("fine_tune", "feature_extraction", "lora_r4", "lora_r8")
HEADING = "## PEFT adapters vs full fine-tuning and feature extraction"


# ----------------------------------------------------------------------------- child process
def _build(name: str, backbone: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    from hf_tlmtl.transfer import apply_transfer_strategy

    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone(
        backbone, tasks=[TaskSpec(name="label", type="classification", num_labels=NUM_CLASSES)], pretrained=False
    )
    info: dict[str, Any] = {"base_params": sum(p.numel() for p in model.parameters())}
    if name.startswith("lora"):
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            info["model_file_bytes"] = os.path.getsize(os.path.join(d, "model.safetensors"))
        model = apply_transfer_strategy(model, "lora", r=int(name.removeprefix("lora_r")), alpha=16).model
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            info["adapter_file_bytes"] = os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
        info["targets"] = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    else:
        apply_transfer_strategy(model, name)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one contender, time ``reps`` optimiser steps after ``warmup``; peak RSS of the training phase."""
    torch.set_num_threads(args.threads)
    model, info = _build(name, args.backbone)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=x, label=y).loss.backward()
        optimizer.step()

    rss_before = status_kib("VmRSS")
    info["peak_reset"] = reset_peak_rss()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    info.update(
        median_step_s=statistics.median(times),
        step_times_s=times,
        rss_before_train_mib=rss_before / 1024,
        peak_rss_train_mib=status_kib("VmHWM") / 1024,
    )
    return info


# ---------------------------------------------------------------------------- parent process
def run_contender(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", name, "--backbone", args.backbone, "--batch", str(args.batch),
        "--size", str(args.size), "--reps", str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]
    env = {**os.environ, **CHILD_ENV}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"contender {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    import timm
    import peft

    full = results["fine_tune"]
    lines = [
        f"{HEADING} ({args.backbone}, batch {args.batch}, {args.size}px, CPU fp32)",
        "",
        f"Device: CPU ({platform.processor() or platform.machine()}, {args.threads} threads); torch {torch.__version__}, "
        f"timm {timm.__version__}, peft {peft.__version__}. Random init (pretrained=False), AdamW, one classification "
        f"head. Each contender in its own subprocess; {args.reps} timed steps after {args.warmup} warm-up steps, "
        "median step time. Peak RSS: the kernel's high-water mark over the training steps only (reset after the "
        "model was built; glibc told to mmap tensors >= 64 KiB so freed memory leaves RSS). Gradients + AdamW "
        "state: exact, 12 bytes per trainable parameter. LoRA: `apply_transfer_strategy(model, 'lora', r=...)`, alpha 16, target_modules 'auto' "
        "(every attention qkv/proj and MLP fc1/fc2 Linear).",
        "",
        "| contender | trainable params | trainable fraction | grads + AdamW state (MiB) | peak RSS, training (MiB) "
        "| vs full FT | RSS growth in training (MiB) | median step (ms) | vs full FT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CONTENDERS:
        r = results[name]
        fraction = r["trainable_params"] / r["base_params"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {100 * fraction:.2f}% | {12 * r['trainable_params'] / 2**20:.1f} | "
            f"{r['peak_rss_train_mib']:.0f} | {r['peak_rss_train_mib'] / full['peak_rss_train_mib']:.2f} | "
            f"{r['peak_rss_train_mib'] - r['rss_before_train_mib']:.0f} | {1000 * r['median_step_s']:.0f} | "
            f"{r['median_step_s'] / full['median_step_s']:.2f} |"
        )
    lora = [n for n in CONTENDERS if n.startswith("lora")]
    lines += [""] + [
        f"{name}: adapter_model.safetensors {_mib(results[name]['adapter_file_bytes'])} vs model.safetensors "
        f"{_mib(results[name]['model_file_bytes'])} "
        f"({100 * results[name]['adapter_file_bytes'] / results[name]['model_file_bytes']:.1f}%; "
        f"{results[name]['targets']} target modules)."
        for name in lora
    ]
    verdicts = []
    for name in lora:
        fraction = results[name]["trainable_params"] / results[name]["base_params"]
        lower = results[name]["peak_rss_train_mib"] < full["peak_rss_train_mib"]
        verdicts.append(
            f"{name}: trainable fraction {100 * fraction:.2f}% ({'under' if fraction < 0.02 else 'NOT under'} 2%), "
            f"peak RSS {'below' if lower else 'NOT below'} full fine-tuning"
        )
    lines += ["", "Targets (trainable fraction under 2%, peak memory below full fine-tuning): " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return
    results = {}
    for name in CONTENDERS:
        results[name] = run_contender(name, args)
        print(f"{name}: {results[name]['median_step_s'] * 1000:.0f} ms, {results[name]['peak_rss_train_mib']:.0f} MiB", flush=True)
    text = render(results, args)
    print(text)
    write_section(text, Path(args.results))


if __name__ == "__main__":
    main()
