"""Training-step overhead of TimmMultiTaskModel against plain timm and transformers' TimmWrapper.

Same backbone, batch, loss (cross-entropy on one classification head) and optimiser (SGD) for
the three contenders; repetitions are interleaved so drift hits all of them alike; medians and
ratios are printed and written to benchmarks/RESULTS.md.

    python benchmarks/step_overhead.py [--backbone resnet18] [--batch 16] [--size 128] [--reps 30]
    python benchmarks/step_overhead.py --device cuda --bf16 --channels-last   # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import transformers

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from results_md import write_section  # benchmarks/ is on sys.path when run as a script

NUM_CLASSES = 10


def build_contenders(backbone: str, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    ours = TimmMultiTaskModel.from_backbone(
        backbone, tasks=[TaskSpec(name="label", type="classification", num_labels=NUM_CLASSES)]
    )
    plain = timm.create_model(backbone, pretrained=False, num_classes=NUM_CLASSES)
    wrapper = transformers.TimmWrapperForImageClassification(
        transformers.TimmWrapperConfig(architecture=backbone, num_labels=NUM_CLASSES)
    )
    # Same weights everywhere: the backbone and a head copied from ours.
    plain.load_state_dict({**ours.backbone.state_dict(), **_head_state(plain, ours)}, strict=True)
    wrapper.timm_model.load_state_dict(plain.state_dict())
    models = {"hf_tlmtl": ours, "timm": plain, "TimmWrapper": wrapper}
    for model in models.values():
        model.to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return models


def _head_state(plain: torch.nn.Module, ours: TimmMultiTaskModel) -> dict[str, torch.Tensor]:
    name = plain.pretrained_cfg.get("classifier", "fc")
    return {f"{name}.weight": ours.heads["label"].fc.weight.detach(), f"{name}.bias": ours.heads["label"].fc.bias.detach()}


def make_step(name: str, model: torch.nn.Module, autocast):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            if name == "hf_tlmtl":
                loss = model(pixel_values=x, label=y).loss
            elif name == "timm":
                loss = F.cross_entropy(model(x).float(), y)
            else:
                loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a shared CPU)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build_contenders(args.backbone, device, args.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.bf16
        else (lambda: torch.autocast(device.type, enabled=False))
    )
    steps = {name: make_step(name, model, autocast) for name, model in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for _ in range(args.warmup):
        for step in steps.values():
            step(x, y)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(args.reps):
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in order:
            sync()
            start = time.perf_counter()
            steps[name](x, y)
            sync()
            times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["timm"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"## Training-step overhead ({args.backbone}, batch {args.batch}, {args.size}px, "
        f"{'bf16' if args.bf16 else 'fp32'}{', channels_last' if args.channels_last else ''})",
        "",
        f"Device: {device_name}; torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}; "
        f"{args.reps} interleaved repetitions after {args.warmup} warm-up rounds; median step time; "
        f"1-min load average at the end {os.getloadavg()[0]:.1f} (other jobs on a CPU inflate the spread).",
        "",
        "| contender | median step (ms) | ratio vs plain timm |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {1000 * value:.1f} | {value / base:.3f} |" for name, value in medians.items()]
    overhead = medians["hf_tlmtl"] / base - 1
    lines += ["", f"hf_tlmtl overhead vs plain timm: {100 * overhead:+.1f}% (target: within 3%).", ""]
    text = "\n".join(lines)
    print(text)
    write_section(text, Path(args.results))



if __name__ == "__main__":
    main()
