"""The study's report: ``results.md`` (accuracy per case x contender, the recommendations against the winners, the
scores, tau, the calibration), ``results.png`` (one panel per case), ``scores.png`` (score vs best accuracy), and
:func:`write_outputs`, which recomputes the statistics and writes them all with ``results.json``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from hf_tlmtl import transferability
from hf_tlmtl.multitask.metrics import LOWER_IS_BETTER
from transfer_study.arguments import CONTENDERS, DECLARED_SIMILAR, SCORE_METHODS
from transfer_study.stats import calibration, regret_summary, score_points, summarize_case, tau_table


def _params(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if n >= 1_000 else str(n)


def _table(header: list[str], aligns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"] + ["| " + " | ".join(r) + " |" for r in rows]


def _tau(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def case_label(case: dict[str, Any]) -> str:
    return f"{case['source']} → {case['target']}, {case['size']} ({case['n_train']})"


def markdown_report(results: dict[str, Any]) -> str:
    """The Markdown report: accuracy per case x contender, recommendations vs winners, scores, tau, calibration."""
    cases, contenders, metric = results["cases"], results["contenders"], results["metric"]
    arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
    study, training = results["study"], results["training"]
    lines = [
        "# Transfer study: the four cases with real sources, and what transferability scores predict",
        "",
        "Sources: " + "; ".join(f"**{s['name']}** = {s['description']}" for s in results["sources"]) + ". "
        "Random init of each source's architecture is the third source (the `scratch` contender; its features are scored too).",
        "Targets: " + "; ".join(f"**{t['name']}** = `{t['dataset']}` ({t['n_eval']} validation images)" for t in results["targets"]) + ".",
        f"Same budget for every contender of a case: {study['small_steps']} optimiser steps on the small cases "
        f"({study['small_size']} images), {study['large_steps']} on the large ones ({study['large_size']} images); "
        f"{study['image_size']} px; batch {training['per_device_train_batch_size']}, learning rate {training['learning_rate']}, "
        f"{training['optim']}; {len(results['seeds'])} seed(s) ({', '.join(map(str, results['seeds']))}: "
        "training subset, head init, batch order). Deterministic eval transform for training (no augmentation).",
        f"`recommend_strategy(n, ..., small_dataset_max_samples={results['small_dataset_max_samples']})`: the threshold is "
        "the midpoint of the two sizes, not the default 5,000, which would call both sizes small. "
        "*Measured*: `similarity=` the LogME measurement on the case's first training subset, read with the calibration "
        f"in the package (gain threshold {results['calibration_in_code']['threshold']}, scale {results['calibration_in_code']['scale']}). "
        f"*Declared*: the seed article's similar / different ({', '.join(f'{s} ~ {sorted(t)}' for s, t in DECLARED_SIMILAR.items())}).",
        f"Wall time: {results['total_wall_seconds'] / 60:.1f} min on {results['environment']['cpu_count']} CPU cores "
        f"({results['environment'].get('workers', 1)} worker process(es), torch threads: {results['environment']['torch_threads']} each).",
        "",
        f"## {metric} {arrow} per case (mean ± std over seeds; **bold** best, † measured recommendation, ‡ declared)",
        "",
    ]
    rows = []
    for case in cases:
        row = [case_label(case)]
        for contender in contenders:
            r = case["contenders"][contender]
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
            if contender == case["winner"]:
                cell = f"**{cell}**"
            cell += (" †" if contender == case["recommendation"]["contender"] else "") + (
                " ‡" if contender == case["declared_recommendation"]["contender"] else "")
            row.append(cell)
        rows.append(row)
    lines += _table(["case"] + contenders, ["---"] + ["---:"] * len(contenders), rows)

    lines += ["", "## recommend_strategy vs the measured winner", ""]
    rows = []
    for case in cases:
        m, d = case["recommendation"], case["declared_recommendation"]
        gain = case["scores"][0]["measurement"]["gain"]
        rows.append([
            case_label(case), f"{gain:+.3f} → {case['measured_similarity']:.2f}",
            f"{m['case']}: `{m['contender']}` ({m['verdict']}, {m['gap']:.3f})",
            f"{case['declared']} → {d['case']}: `{d['contender']}` ({d['verdict']}, {d['gap']:.3f})",
            f"`{case['winner']}` ({case['contenders'][case['winner']]['mean']:.3f})",
        ])
    lines += _table(["case", "LogME gain → similarity", "measured: case, advice (verdict, gap)", "declared: case, advice (verdict, gap)", "measured best"],
                    ["---", "---:", "---", "---", "---"], rows)
    regret = results["regret"]
    lines += ["", f"Mean {metric} lost against each case's winner when always following a policy: "
              + "; ".join(f"{k} {v:.3f}" for k, v in sorted(regret.items(), key=lambda kv: kv[1])) + "."]

    lines += ["", "## Transferability scores (frozen features of the training images, mean over seeds) and best fine-tuned accuracy", ""]
    rows = []
    for case in cases:
        src, rnd = case["score_means"]["source"], case["score_means"]["random"]
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "n/a"  # noqa: E731
        rows.append([case_label(case), fmt(src, "logme"), fmt(rnd, "logme"), fmt(src, "h_score"), fmt(rnd, "h_score"), fmt(src, "leep"),
                     f"{case['best_transfer']:.3f}", f"{case['scratch_mean']:.3f}" if case["scratch_mean"] is not None else "n/a"])
    lines += _table(["case", "LogME source", "LogME random", "H-score source", "H-score random", "LEEP source", "best transfer", "scratch"],
                    ["---"] + ["---:"] * 7, rows)

    tau = results["tau"]
    lines += ["", "## Do the scores predict the fine-tuned ranking? (Kendall's weighted tau)", "",
              "Across backbones for one target (the sources and random init of each architecture; n = backbones):", ""]
    rows = [[t["method"], t["target"], t["size"], str(t["n"]), _tau(t["tau"])] for t in tau["per_target"]]
    lines += _table(["score", "target", "size", "n", "tau"], ["---", "---", "---", "---:", "---:"], rows)
    means = {m: [t["tau"] for t in tau["per_target"] if t["method"] == m and t["tau"] is not None] for m in SCORE_METHODS}
    lines += ["", "Mean over the targets and sizes: " + "; ".join(
        f"{m} {_tau(statistics.fmean(v)) if v else 'n/a'} ({len(v)} of them)" for m, v in means.items()) + "."]
    lines += ["", "Across every (backbone, target) pair of a size (scores of different targets mixed):", ""]
    rows = [[t["method"], t["size"], str(t["n"]), _tau(t["tau"])] for t in tau["all_pairs"]]
    rows += [["LogME gain over random init vs accuracy gain over scratch", t["size"], str(t["n"]), _tau(t["tau"])] for t in tau["gain"]]
    lines += _table(["score", "size", "n", "tau"], ["---", "---", "---:", "---:"], rows)

    cal = results["calibration"]
    lines += ["", "## Calibration of `similarity=\"measured\"`", "",
              "Per case: did the *similar* branch of the rules (feature extraction when small, partial when large) do at least "
              "as well as the *different* branch (truncate / fine_tune_llrd)? The measured rule calls a case similar when its "
              "LogME gain over random init reaches the threshold.", ""]
    rows = [[f"{r['source']} → {r['target']}, {r['size']}", f"{r['gain']:+.3f}", f"{r['similar_side']:.3f}", f"{r['different_side']:.3f}",
             "similar" if r["similar_wins"] else "different", r["declared"]] for r in cal["rows"]]
    lines += _table(["case", "LogME gain", "similar branch", "different branch", "better", "declared"], ["---", "---:", "---:", "---:", "---", "---"], rows)
    if cal["threshold"] is not None:
        lines += ["", f"Best threshold on this run: gain ≥ {cal['threshold']:+.3f} ({cal['correct']}/{len(cal['rows'])} cases right); "
                  f"the package's threshold {cal['in_code_threshold']:+.3f}: {cal['in_code_correct']}/{len(cal['rows'])}; "
                  f"declared similarity: {cal['declared_correct']}/{len(cal['rows'])}."]
    lines += ["", "Verdict: *agrees* = the recommended contender measured best; *within noise* = its mean is within the larger "
              "standard deviation of the two; *disagrees* otherwise. Contenders: "
              + "; ".join(f"`{c}`: {CONTENDERS[c]}" for c in contenders) + ".", ""]
    return "\n".join(lines)


_COLORS = {
    "scratch": "#8c8c8c",
    "feature_extraction": "#4c72b0",
    "partial": "#55a868",
    "truncate": "#dd8452",
    "fine_tune_llrd": "#c44e52",
    "lora": "#8172b3",
}


def plot_results(results: dict[str, Any], path: Path) -> None:
    """One panel per case (rows: source -> target, columns: small / large): mean ± std per contender, seeds as
    dots, the measured best outlined, the measured recommendation hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cases = results["cases"]
    pairs = list(dict.fromkeys((c["source"], c["target"]) for c in cases))
    by_key = {(c["source"], c["target"], c["size"]): c for c in cases}
    contenders, metric = results["contenders"], results["metric"]
    bounded = metric not in LOWER_IS_BETTER and metric != "r2"
    fig, axes = plt.subplots(len(pairs), 2, figsize=(13, 3.3 * len(pairs)), sharey=bounded, squeeze=False)
    for row, (source, target) in enumerate(pairs):
        for col, size in enumerate(("small", "large")):
            ax = axes[row][col]
            case = by_key.get((source, target, size))
            if case is None:
                ax.axis("off")
                continue
            for i, contender in enumerate(contenders):
                r = case["contenders"][contender]
                winner = contender == case["winner"]
                ax.bar(i, r["mean"], yerr=r["std"], capsize=3, color=_COLORS.get(contender, "#999999"), alpha=0.9,
                       edgecolor="black" if winner else "white", linewidth=2.5 if winner else 0.5,
                       hatch="//" if contender == case["recommendation"]["contender"] else None)
                seeds = [run["metric"] for run in r["runs"]]
                ax.scatter(np.full(len(seeds), i) + np.linspace(-0.15, 0.15, len(seeds)), seeds, s=8, color="black", zorder=3)
                ax.annotate(f"{r['mean']:.2f}", (i, r["mean"] + r["std"]), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=8, fontweight="bold" if winner else "normal")
            ax.set_xticks(np.arange(len(contenders)))
            ax.set_xticklabels(contenders, fontsize=7, rotation=15)
            ax.set_title(f"{source} → {target}, {size} (n={case['n_train']}): similarity {case['measured_similarity']:.2f}, "
                         f"advice {case['recommendation']['contender']}", fontsize=9)
            if case.get("chance") is not None and metric == "accuracy":
                ax.axhline(case["chance"], color="black", linestyle="--", linewidth=1, alpha=0.6)
            if bounded:
                ax.set_ylim(0, 1.1)
            ax.grid(axis="y", alpha=0.3)
    handles = [
        Patch(facecolor="white", edgecolor="black", linewidth=2.5, label="measured best (mean)"),
        Patch(facecolor="white", edgecolor="grey", hatch="//", label="recommend_strategy(similarity='measured')"),
        Line2D([0], [0], color="black", linestyle="--", linewidth=1, alpha=0.6, label="chance"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Transfer study: {metric}, mean ± std over {len(results['seeds'])} seed(s), dots = seeds", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores(results: dict[str, Any], path: Path) -> None:
    """LogME of each backbone's frozen features against its best fine-tuned accuracy, one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = score_points(results["cases"], "logme")
    targets = list(dict.fromkeys(p["target"] for p in points))
    fig, axes = plt.subplots(1, max(len(targets), 1), figsize=(5 * max(len(targets), 1), 4.2), squeeze=False)
    markers = {"small": "o", "large": "s"}
    for ax, target in zip(axes[0], targets):
        for p in (p for p in points if p["target"] == target):
            ax.scatter(p["score"], p["accuracy"], marker=markers[p["size"]], s=50,
                       color="#c44e52" if not p["backbone"].startswith("random") else "#8c8c8c")
            ax.annotate(f"{p['backbone']} ({p['size']})", (p["score"], p["accuracy"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        taus = [t for t in results["tau"]["per_target"] if t["method"] == "logme" and t["target"] == target]
        ax.set_title(f"{target}: weighted tau " + ", ".join(f"{t['size']} {_tau(t['tau'])}" for t in taus), fontsize=9)
        ax.set_xlabel("LogME of frozen features (training images)")
        ax.set_ylabel(f"best fine-tuned {results['metric']}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results: dict[str, Any], results_dir: Path, lower_is_better: bool) -> str:
    """Summaries with the current calibration, then results.json / results.md / results.png / scores.png."""
    for case in results["cases"]:
        summarize_case(case, results["small_dataset_max_samples"], lower_is_better)
    results["tau"] = tau_table(results["cases"])
    results["calibration"] = calibration(results["cases"])
    results["calibration_in_code"] = {"threshold": transferability.MEASURED_GAIN_THRESHOLD, "scale": transferability.MEASURED_GAIN_SCALE}
    results["regret"] = regret_summary(results["cases"], lower_is_better)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = markdown_report(results)
    (results_dir / "results.md").write_text(report)
    plot_results(results, results_dir / "results.png")
    plot_scores(results, results_dir / "scores.png")
    return report
