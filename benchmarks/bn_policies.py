"""BatchNorm policies side by side on a real pretrained source, for the four classic transfer cases.

    python benchmarks/bn_policies.py [benchmarks/transfer_study/config.yaml] [--key value ...]

The source is EfficientNet-Lite0 with ImageNet weights (``[study]`` extra); the targets are the transfer
study's ``photos`` (similar to ImageNet) and ``digits`` (different), each at ``--small_size`` and
``--large_size`` training images: the four cases. Every variant below runs with the transfer study's
shared settings (steps, batch, learning rate, image size; ``benchmarks/transfer_study/``) over ``--seeds``:

- ``feature_extraction`` (BatchNorm frozen with the backbone, the reference);
- ``partial`` (``trainable_fraction=0.25``: the top layer group, 30 % of EfficientNet-Lite0),
  ``truncate`` (top stage dropped, layer decay 0.75) and ``fine_tune_llrd`` (layer decay 0.9), with
  ``bn`` = ``train``, ``frozen`` or ``recalibrate``, at the study's learning rate or ``@low``
  (:data:`LOW_LR`); see :data:`DEFAULT_VARIANTS` for which combinations and why.

``--bn_variants`` picks others (``name/bn[@low]`` items; ``truncate_half`` cuts at half the depth,
``keep_depth=0.5``), ``--sizes small`` runs the small cases only (e.g. at the native 224 px). Besides ``results.md`` / ``results.json`` in
``--results_dir`` (default ``benchmarks/bn_policies``), the report marks what
``recommend_strategy(n, <measured similarity>)`` advises in each case, and whether it is the measured
best or within noise (the larger of the two standard deviations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hf_tlmtl import transferability
from hf_tlmtl.training.cli import YAML_SUFFIXES, UsageError, run_or_exit
from hf_tlmtl.transfer import LARGE_DIFFERENT_LAYER_DECAY, SMALL_DIFFERENT_LAYER_DECAY, recommend_strategy

# The study's data, sources, runs and verdicts: the transfer_study package beside this file (run as a script,
# this file's folder, benchmarks/, is the first entry of sys.path).
from transfer_study import stats
from transfer_study.arguments import RECOMMENDED_CONTENDER, check_arguments, parse_arguments, training_arguments
from transfer_study.inputs import attach_source_details, load_targets, on_disk, resolve_sources, training_subset, transfer_model
from transfer_study.units import run_once

STRATEGY_ARGS: dict[str, dict[str, Any]] = {
    "feature_extraction": {"transfer_strategy": "feature_extraction", "cache_features": True},
    "partial": {"transfer_strategy": "partial", "trainable_fraction": 0.25},
    "truncate": {"transfer_strategy": "truncate", "layer_decay": SMALL_DIFFERENT_LAYER_DECAY},
    "truncate_half": {"transfer_strategy": "truncate", "keep_depth": 0.5, "layer_decay": SMALL_DIFFERENT_LAYER_DECAY},
    "fine_tune_llrd": {"transfer_strategy": "fine_tune", "layer_decay": LARGE_DIFFERENT_LAYER_DECAY},
    "lora": {"transfer_strategy": "lora"},
}
"""What each variant's strategy is (the same settings as the transfer study, ``partial`` by parameter share)."""

LOW_LR = {"learning_rate": 1e-3, "head_lr_scale": 10.0}
"""``@low``: the backbone at a tenth of the study's learning rate, the heads at the study's (0.001, heads x10)."""

DEFAULT_VARIANTS = (
    "feature_extraction/frozen",
    "partial/train", "partial/frozen@low",
    "truncate/train", "truncate/train@low", "truncate/frozen", "truncate/frozen@low", "truncate/recalibrate",
    "fine_tune_llrd/train", "fine_tune_llrd/train@low", "fine_tune_llrd/frozen@low", "fine_tune_llrd/recalibrate",
)
"""BatchNorm frozen at the study's learning rate (0.01) diverges when the whole network or its top group trains
(training loss above chance in a first run): frozen BatchNorm no longer renormalises what the updated convolutions
produce. So the frozen variants also run at ``@low``, and the ``train`` ones too, to tell the learning rate's
effect from BatchNorm's. LoRA is left out: its BatchNorm is always frozen (:data:`hf_tlmtl.transfer.BN_FROZEN_STRATEGIES`)."""
TARGETS = {"photos": "similar", "digits": "different"}
"""The two targets and their declared similarity to ImageNet."""


def variant_arguments(variant: str) -> dict[str, Any]:
    """``strategy/bn[@low]`` as training arguments."""
    body, _, lr = variant.partition("@")
    name, _, bn = body.partition("/")
    if name not in STRATEGY_ARGS or bn not in ("train", "frozen", "recalibrate") or lr not in ("", "low"):
        raise UsageError(f"--bn_variants: unknown variant {variant!r}; use name/bn[@low] with name in {list(STRATEGY_ARGS)}")
    return {**STRATEGY_ARGS[name], **({} if name in ("feature_extraction", "lora") else {"bn": bn}), **(LOW_LR if lr else {})}


def advised_variant(rec: Any) -> str:
    """The variant that carries out a ``Recommendation`` (strategy, BatchNorm policy, learning-rate scale)."""
    name = RECOMMENDED_CONTENDER[rec.strategy]
    if name == "feature_extraction":
        return "feature_extraction/frozen"
    low = getattr(rec, "learning_rate_scale", 1.0) < 1.0
    return f"{name}/{getattr(rec, 'bn', 'train')}" + ("@low" if low else "")


def reference_model(results: dict[str, Any]) -> Any:
    """The source's architecture at the study's input size (random init): what the advice reads off a model
    (the cut it names, the input resolution against the backbone's native one)."""
    from hf_tlmtl import TaskSpec, TimmMultiTaskModel

    architecture = results.get("architecture", "efficientnet_lite0")
    return TimmMultiTaskModel.from_backbone(architecture, [TaskSpec(name="target", type="regression")],
                                            image_size=results["study"]["image_size"])


def summarize(case: dict[str, Any], threshold: int, model: Any = None) -> None:
    for result in case["variants"].values():
        result["mean"], result["std"] = stats.mean_std([r["metric"] for r in result["runs"]])
    case["winner"] = max(case["variants"], key=lambda v: case["variants"][v]["mean"])
    measurement = transferability.SimilarityMeasurement(**case["measurement"])
    measurement.similarity = transferability.similarity_from_gain(measurement.gain)
    declared = TARGETS.get(case["target"], "different")
    for key, similarity in (("advice", measurement), ("declared_advice", declared)):
        rec = recommend_strategy(case["n_train"], similarity, small_dataset_max_samples=threshold, model=model)
        case[key] = _verdict(case, advised_variant(rec), rec)


def _verdict(case: dict[str, Any], advised: str, rec: Any) -> dict[str, Any]:
    """The transfer study's verdict (agrees / within noise / disagrees / not measured) on this case's variants."""
    verdict, gap = stats.verdict({"contenders": case["variants"], "winner": case["winner"]}, advised, lower_is_better=False)
    return {"variant": advised, "case": rec.case, "reason": rec.reason, "verdict": verdict,
            "gap": None if math.isnan(gap) else gap}


def markdown(results: dict[str, Any]) -> str:
    cases, variants = results["cases"], results["variants"]
    lines = [
        "# BatchNorm policies on a real pretrained source (EfficientNet-Lite0, ImageNet)",
        "",
        f"Accuracy, mean ± std over seeds {results['seeds']}; **bold** = best in the case, † = `recommend_strategy`'s "
        "advice with the measured similarity, ‡ with the declared one (photos similar, digits different). Rows: variants "
        "(`strategy/bn`, `@low`: backbone at lr 0.001, heads at the study's); columns: the cases.",
        "",
        "| variant | " + " | ".join(f"{c['label']}" for c in cases) + " |",
        "| --- | " + " | ".join("---:" for _ in cases) + " |",
    ]
    for variant in variants:
        cells = []
        for case in cases:
            r = case["variants"][variant]
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
            if variant == case["winner"]:
                cell = f"**{cell}**"
            if variant == case["advice"]["variant"]:
                cell += " †"
            if variant == case["declared_advice"]["variant"]:
                cell += " ‡"
            cells.append(cell)
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    for key, what in (("advice", "measured similarity"), ("declared_advice", "declared similarity")):
        agree = sum(c[key]["verdict"] in ("agrees", "within noise") for c in cases)
        lines += ["", f"Advice from the {what} best or within noise of the best in **{agree} of {len(cases)}** cases:", ""]
        for case in cases:
            a = case[key]
            gap = "" if a["gap"] is None else f" (gap {a['gap']:.3f})"
            lines.append(f"- {case['label']}: case {a['case']}, advised `{a['variant']}`, best `{case['winner']}`: {a['verdict']}{gap}.")
    lines += [
        "",
        f"Setting: {results['setting']}. Wall time {results['total_wall_seconds'] / 60:.1f} min on "
        f"{results['environment']['cpu_count']} CPU cores ({results['environment']['torch_threads']} torch threads).",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], results_dir: Path) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    report = markdown(results)
    (results_dir / "results.md").write_text(report)
    (results_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return report


def rerender(results_dir: Path) -> dict[str, Any]:
    path = results_dir / "results.json"
    if not path.is_file():
        raise UsageError(f"--rerender needs {path} from an earlier run")
    results = json.loads(path.read_text())
    model = reference_model(results)
    for case in results["cases"]:
        summarize(case, results["small_dataset_max_samples"], model)
    print(write(results, results_dir))
    return results


def main(argv: list[str]) -> dict[str, Any]:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--bn_variants", default=",".join(DEFAULT_VARIANTS))
    own.add_argument("--sizes", default="small,large", help="Which training-set sizes to run: small, large or both.")
    own.add_argument("--rerender", default=None, metavar="RESULTS_DIR",
                     help="Re-read RESULTS_DIR/results.json, re-derive the advice with the package as it is now, rewrite results.md.")
    known, rest = own.parse_known_args(argv)
    if known.rerender:
        return rerender(Path(known.rerender))
    variants = [v.strip() for v in known.bn_variants.split(",") if v.strip()]
    for v in variants:
        variant_arguments(v)
    defaults = ["--sources", "imagenet", "--targets", ",".join(TARGETS), "--results_dir", "benchmarks/bn_policies",
                "--output_dir", "outputs/bn_policies"]
    study, training_argv, output_dir, _ = parse_arguments(rest[:1] + defaults + rest[1:] if rest[:1] and rest[0].endswith(YAML_SUFFIXES) else defaults + rest)
    study.contenders = "feature_extraction"  # checked by the study; the variants are this script's
    _, seeds, threshold, results_dir = check_arguments(study, output_dir)
    if study.num_threads:
        torch.set_num_threads(study.num_threads)
    started = time.perf_counter()
    cache: dict[str, Any] = {}
    targets = load_targets(study, output_dir, cache)
    (source,) = resolve_sources(study, training_argv, output_dir, cache)
    attach_source_details(study, source, targets[0].task)
    cases = []
    for target in targets:
        for size, n_train, steps in (("small", study.small_size, study.small_steps), ("large", study.large_size, study.large_steps)):
            if size not in known.sizes.split(","):
                continue
            label = f"{size} {TARGETS.get(target.name, '?')} ({target.name}, {n_train})"
            case: dict[str, Any] = {"label": label, "target": target.name, "size": size, "n_train": n_train, "steps": steps,
                                    "variants": {v: {"runs": []} for v in variants}}
            for seed in seeds:
                train = training_subset(target.train, target.task, n_train, seed)
                train = on_disk(train, output_dir / "data" / target.name / f"{size}-seed{seed}")
                if "measurement" not in case:
                    measurement = transferability.measure_similarity(
                        transfer_model(study, source, target.task), train, [target.task],
                        cache_dir=str(output_dir / "features"), image_column=study.image_column,
                    )
                    case["measurement"] = asdict(measurement)
                for variant in variants:
                    print(f"== {label}, seed {seed}: {variant}", flush=True)
                    name = variant.partition("/")[0]
                    run = run_once(study, name, source, target, train, steps, seed, training_argv,
                                   output_dir / "runs" / target.name / size / variant.replace("/", "-") / f"seed{seed}",
                                   contender_args=variant_arguments(variant))
                    if not math.isfinite(run["metric"]):
                        raise RuntimeError(f"{label} {variant} seed {seed}: non-finite metric")
                    case["variants"][variant]["runs"].append(run)
            cases.append(case)
    first = training_arguments(training_argv, output_dir / "runs", seeds[0], 1, "scratch", study)
    results = {
        "seeds": seeds,
        "variants": variants,
        "small_dataset_max_samples": threshold,
        "setting": (f"{study.image_size} px, {study.small_steps} / {study.large_steps} steps, batch "
                    f"{first.per_device_train_batch_size}, AdamW lr {first.learning_rate:g}, {study.small_size} / "
                    f"{study.large_size} training images, {targets[0].validation.num_rows} / {targets[-1].validation.num_rows} "
                    "validation images"),
        "study": asdict(study),
        "training_argv": training_argv,
        "cases": cases,
        "environment": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    results["architecture"] = source.architecture[0]
    model = reference_model(results)
    for case in cases:
        summarize(case, threshold, model)
    results["total_wall_seconds"] = time.perf_counter() - started
    print(write(results, results_dir))
    return results


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
