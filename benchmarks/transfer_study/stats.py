"""The study's statistics, all computed from ``results.json``'s runs (so ``--report_only`` recomputes them with the
calibration now in the package): each case's recommendations (measured and declared) and their verdicts against
the measured winner, Kendall's weighted tau between the scores and the best fine-tuned accuracy, the calibration
of ``similarity="measured"``, and the regret of always following one policy.
"""

from __future__ import annotations

import statistics
from typing import Any

from hf_tlmtl import transferability
from hf_tlmtl.transfer import recommend_strategy
from transfer_study.arguments import CONTENDERS, RECOMMENDED_CONTENDER, SCORE_METHODS, TRANSFER_CONTENDERS


# --------------------------------------------------------------------------- recommendations
def measured_recommendation(n_train: int, measurement: dict[str, Any], threshold: int) -> Any:
    """``recommend_strategy(rules="classic")`` on a stored measurement, re-read with the calibration now in the
    package: the classic table on the measured similarity, ``truncate`` where the top stage hurts. This study
    measured that rule; the package's default rules (``rules="study"``, derived from this study and
    ``benchmarks/bn_policies.py``) add a BatchNorm policy that this study's contenders do not vary."""
    stored = transferability.SimilarityMeasurement(**measurement)
    stored.similarity = transferability.similarity_from_gain(stored.gain)
    return recommend_strategy(n_train, stored, small_dataset_max_samples=threshold, rules="classic")


def declared_recommendation(n_train: int, declared: str, threshold: int) -> Any:
    """What the seed article's rule says when the similarity is declared instead of measured."""
    return recommend_strategy(n_train, declared, small_dataset_max_samples=threshold, rules="classic")


def _recommendation_record(rec: Any) -> dict[str, Any]:
    return {
        "case": rec.case,
        "strategy": rec.strategy,
        "contender": RECOMMENDED_CONTENDER[rec.strategy],
        "trainable_groups": rec.trainable_groups,
        "truncate_stage": rec.truncate_stage,
        "layer_decay": rec.layer_decay,
        "reason": rec.reason,
    }


# ------------------------------------------------------------------------------- summaries
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(case: dict[str, Any], recommended: str, lower_is_better: bool) -> tuple[str, float]:
    """``agrees`` (the recommended contender won), ``within noise`` (its mean is within the larger of the two
    standard deviations of the winner's), ``disagrees``, or ``not measured``; and the gap to the winner."""
    if recommended not in case["contenders"]:
        return "not measured", float("nan")
    sign = -1.0 if lower_is_better else 1.0
    best, rec = case["contenders"][case["winner"]], case["contenders"][recommended]
    gap = sign * (best["mean"] - rec["mean"])
    if recommended == case["winner"]:
        return "agrees", 0.0
    if gap <= max(best["std"], rec["std"]) and len(rec["runs"]) > 1:
        return "within noise", gap
    return "disagrees", gap


def summarize_case(case: dict[str, Any], threshold: int, lower_is_better: bool) -> None:
    """Per-contender mean/std, the measured winner, the scores' means over seeds, and both recommendations
    (measured with the current calibration, and declared) against the winner (in place)."""
    for result in case["contenders"].values():
        result["mean"], result["std"] = mean_std([r["metric"] for r in result["runs"]])
        result["wall_seconds_mean"] = statistics.fmean(r["wall_seconds"] for r in result["runs"])
        result["trainable_params"] = result["runs"][0]["trainable_params"]
        result["total_params"] = result["runs"][0]["total_params"]
    sign = -1.0 if lower_is_better else 1.0
    case["winner"] = max(case["contenders"], key=lambda c: sign * case["contenders"][c]["mean"])
    transfer = [c for c in TRANSFER_CONTENDERS if c in case["contenders"]]
    case["best_transfer"] = max((case["contenders"][c]["mean"] for c in transfer), key=lambda v: sign * v, default=None)
    case["scratch_mean"] = case["contenders"].get("scratch", {}).get("mean")
    case["score_means"] = {
        who: {m: statistics.fmean(s[who][m] for s in case["scores"]) for m in case["scores"][0][who]} for who in ("source", "random")
    }
    first = case["scores"][0]["measurement"]
    case["recommendation"] = _recommendation_record(measured_recommendation(case["n_train"], first, threshold))
    case["measured_similarity"] = transferability.similarity_from_gain(first["gain"])
    case["declared_recommendation"] = _recommendation_record(declared_recommendation(case["n_train"], case["declared"], threshold))
    for key in ("recommendation", "declared_recommendation"):
        case[key]["verdict"], case[key]["gap"] = verdict(case, case[key]["contender"], lower_is_better)


# ------------------------------------------------------------------------- score analysis
def weighted_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's weighted tau (hyperbolic weights on rank, as in the LogME paper); ``None`` below 3 points."""
    from scipy.stats import weightedtau

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(weightedtau(x, y).statistic)


def score_points(cases: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """(backbone, target, size, score, best accuracy) per source and per random-init architecture.

    A source's best accuracy is the best of its transfer contenders; random init's is its ``scratch`` run.
    """
    points = []
    for case in cases:
        source_score = case["score_means"]["source"].get(method)
        if source_score is not None and case["best_transfer"] is not None:
            points.append({"backbone": case["source"], "target": case["target"], "size": case["size"],
                           "score": source_score, "accuracy": case["best_transfer"]})
        random_score = case["score_means"]["random"].get(method)
        key = f"random {case['architecture']}"
        seen = any(p["backbone"] == key and p["target"] == case["target"] and p["size"] == case["size"] for p in points)
        if random_score is not None and case["scratch_mean"] is not None and not seen:
            points.append({"backbone": key, "target": case["target"], "size": case["size"],
                           "score": random_score, "accuracy": case["scratch_mean"]})
    return points


def tau_table(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Weighted tau between each score and the best fine-tuned accuracy: per (target, size) across backbones,
    across every (backbone, target) pair of a size, and (gain over random init vs accuracy gain over scratch)
    across every (source, target) pair."""
    table: dict[str, Any] = {"per_target": [], "all_pairs": [], "gain": []}
    for method in SCORE_METHODS:
        points = score_points(cases, method)
        for size in ("small", "large"):
            sized = [p for p in points if p["size"] == size]
            for target in dict.fromkeys(p["target"] for p in sized):
                group = [p for p in sized if p["target"] == target]
                table["per_target"].append({"method": method, "size": size, "target": target, "n": len(group),
                                            "tau": weighted_tau([p["score"] for p in group], [p["accuracy"] for p in group])})
            table["all_pairs"].append({"method": method, "size": size, "n": len(sized),
                                       "tau": weighted_tau([p["score"] for p in sized], [p["accuracy"] for p in sized])})
    for size in ("small", "large"):
        sized = [c for c in cases if c["size"] == size and c["best_transfer"] is not None and c["scratch_mean"] is not None]
        gains = [c["score_means"]["source"]["logme"] - c["score_means"]["random"]["logme"] for c in sized]
        accuracy_gains = [c["best_transfer"] - c["scratch_mean"] for c in sized]
        table["gain"].append({"size": size, "n": len(sized), "tau": weighted_tau(gains, accuracy_gains)})
    return table


def calibration(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Which gain threshold best separates the cases where the "similar" branch of the rules (feature extraction
    when small, partial when large) did at least as well as the "different" branch (truncate / fine_tune_llrd).

    The threshold returned is the midpoint of the widest interval of gains that classifies most cases right.
    """
    rows = []
    for case in cases:
        similar_side, different_side = ("feature_extraction", "truncate") if case["size"] == "small" else ("partial", "fine_tune_llrd")
        if similar_side not in case["contenders"] or different_side not in case["contenders"]:
            continue
        gain = case["scores"][0]["measurement"]["gain"]
        rows.append({
            "source": case["source"], "target": case["target"], "size": case["size"], "gain": gain,
            "similar_side": case["contenders"][similar_side]["mean"], "different_side": case["contenders"][different_side]["mean"],
            "similar_wins": case["contenders"][similar_side]["mean"] >= case["contenders"][different_side]["mean"],
            "declared": case["declared"],
        })
    if not rows:
        return {"rows": [], "threshold": None}
    gains = sorted({r["gain"] for r in rows})
    candidates = [gains[0] - 1.0] + [(a + b) / 2 for a, b in zip(gains, gains[1:])] + [gains[-1] + 1.0]

    def correct(threshold: float) -> int:
        return sum((r["gain"] >= threshold) == r["similar_wins"] for r in rows)

    best = max(correct(t) for t in candidates)
    winners = [t for t in candidates if correct(t) == best]
    threshold = statistics.median(winners)
    in_code = transferability.MEASURED_GAIN_THRESHOLD
    return {
        "rows": rows,
        "threshold": threshold,
        "correct": best,
        "in_code_threshold": in_code,
        "in_code_correct": correct(in_code),
        "declared_correct": sum((r["declared"] == "similar") == r["similar_wins"] for r in rows),
    }


def regret_summary(cases: list[dict[str, Any]], lower_is_better: bool) -> dict[str, float]:
    """Mean accuracy lost against each case's winner when always following one policy."""
    sign = -1.0 if lower_is_better else 1.0
    policies = {"measured recommend_strategy": "recommendation", "declared recommend_strategy": "declared_recommendation"}
    choices = {label: [(c, c[key]["contender"]) for c in cases] for label, key in policies.items()}
    choices.update({f"always {contender}": [(c, contender) for c in cases] for contender in CONTENDERS})
    out = {}
    for label, chosen in choices.items():
        lost = [sign * (c["contenders"][c["winner"]]["mean"] - c["contenders"][x]["mean"]) for c, x in chosen if x in c["contenders"]]
        if lost:  # a policy whose contender was not run has no regret to report
            out[label] = statistics.fmean(lost)
    return out
