"""Transferability scores: they rank informative features above uninformative ones, LogME is the evidence it
claims to be, missing labels are skipped, features come from the cache, and bad input fails early."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from scipy.stats import multivariate_normal

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.transfer import recommend_strategy
from hf_tlmtl.transferability import (
    METHODS,
    MIN_ROWS,
    h_score,
    leep,
    logme,
    logme_evidence,
    measure_similarity,
    rank_backbones,
    score_features,
    score_transferability,
    similarity_from_gain,
)

DIGIT = TaskSpec(name="digit", type="classification", num_labels=10)


def informative(n: int = 300, classes: int = 4, noise: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features that encode the class (one-hot plus noise, padded with noise dimensions) and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = np.c_[np.eye(classes)[labels] + noise * rng.normal(size=(n, classes)), rng.normal(size=(n, 8))]
    return features, labels


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    return load_embedded_dataset("digits", n_train=120, n_eval=20, image_size=32, seed=0)


# --------------------------------------------------------------------------- the estimators
@pytest.mark.parametrize("method", METHODS)
def test_each_score_prefers_labels_the_features_predict_over_shuffled_labels(method):
    features, labels = informative()
    shuffled = np.random.default_rng(1).permutation(labels)
    if method == "logme":
        scores = logme(features, labels), logme(features, shuffled)
    elif method == "h_score":
        scores = h_score(features, labels), h_score(features, shuffled)
    else:  # LEEP: the source classifier's probabilities come from the same features
        theta = softmax(3 * features[:, :4])
        scores = leep(theta, labels), leep(theta, shuffled)
    assert scores[0] > scores[1] + 0.1, scores


def test_logme_regression_prefers_the_predictable_target():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 6))
    assert logme(f, f @ rng.normal(size=6) + 0.1 * rng.normal(size=200), "regression") > logme(f, rng.normal(size=200), "regression") + 0.5


@pytest.mark.parametrize("n, d", [(40, 6), (12, 30)])  # more rows than dimensions, and fewer
def test_logme_is_the_maximised_evidence_of_the_bayesian_linear_model(n, d):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = f @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    (fit,) = logme_evidence(f, y)

    def direct(alpha: float, beta: float) -> float:  # log N(y; 0, I / beta + f f^T / alpha)
        return multivariate_normal(mean=np.zeros(n), cov=np.eye(n) / beta + f @ f.T / alpha).logpdf(y) / n

    assert fit.evidence == pytest.approx(direct(fit.alpha, fit.beta), rel=1e-9, abs=1e-9)
    # A maximum: moving away does not raise it. (With fewer rows than dimensions the fit can be exact and the
    # supremum lies at beta -> infinity: LogME stops at its precision bound, where more beta changes nothing.)
    for a, b in [(2.0, 1.0), (0.5, 1.0), (1.0, 2.0), (1.0, 0.5)]:
        assert direct(fit.alpha * a, fit.beta * b) <= fit.evidence + 1e-9
    assert logme(f, y, "regression") == pytest.approx(logme_evidence(f, (y - y.mean()) / y.std())[0].evidence)


def test_logme_stays_finite_when_the_features_can_fit_any_labels():
    rng = np.random.default_rng(0)
    for features in (rng.normal(size=(10, 1000)), np.zeros((10, 1000)), 1e-6 * rng.normal(size=(10, 1000))):
        assert math.isfinite(logme(features, np.arange(10) % 3))


def test_missing_labels_are_skipped_per_task():
    features, labels = informative(n=200)
    values = np.random.default_rng(2).normal(size=200).astype(np.float32)
    masked_class = torch.tensor(labels)
    masked_class[::4] = -100
    masked_value = torch.tensor(values)
    masked_value[1::3] = math.nan
    tasks = [TaskSpec(name="c", type="classification", num_labels=4), TaskSpec(name="v", type="regression")]
    scores = score_features(features, {"c": masked_class, "v": masked_value}, tasks)
    keep_c, keep_v = masked_class.numpy() != -100, ~np.isnan(masked_value.numpy())
    assert scores["c"] == pytest.approx(logme(features[keep_c], labels[keep_c]))
    assert scores["v"] == pytest.approx(logme(features[keep_v], values[keep_v], "regression"))


def test_multilabel_is_the_mean_of_one_binary_score_per_label():
    features, labels = informative(n=120, classes=3)
    multi_hot = torch.tensor(np.eye(3)[labels], dtype=torch.float32)
    multi_hot[0, 1] = math.nan  # label 1 of row 0 is unknown: only that label skips the row
    task = TaskSpec(name="tags", type="multilabel", labels=["a", "b", "c"])
    per_label = []
    for i in range(3):
        rows = ~torch.isnan(multi_hot[:, i]).numpy()
        per_label.append(logme(features[rows], multi_hot[rows, i].numpy()))
    assert score_features(features, {"tags": multi_hot}, [task])["tags"] == pytest.approx(np.mean(per_label))


# --------------------------------------------------------------------------- on real models
def test_score_transferability_reads_features_from_the_cache(digits, tmp_path):
    model = TimmMultiTaskModel.from_backbone("test_resnet", [DIGIT], image_size=32)
    calls = []
    handle = model.backbone.conv1.register_forward_hook(lambda *args: calls.append(1))
    first = score_transferability(model, digits, cache_dir=str(tmp_path))
    passes = len(calls)
    again = score_transferability(model, digits, cache_dir=str(tmp_path))
    handle.remove()
    assert passes > 0 and len(calls) == passes  # the second call ran no backbone pass
    assert first == again and list(first) == ["digit"] and math.isfinite(first["digit"])


def test_leep_uses_the_classifier_a_local_dir_source_still_has(digits, tmp_path):
    with_classifier, without = tmp_path / "with", tmp_path / "without"
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=5), str(with_classifier))
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=0), str(without))
    score = score_transferability(f"local-dir:{with_classifier}", digits, method="leep", image_size=32, cache_dir=str(tmp_path))
    assert -math.log(10) - 1e-6 <= score["digit"] <= 0.0  # a log-likelihood, no worse than uniform over 10 classes
    with pytest.raises(ValueError, match="no classifier"):
        score_transferability(f"local-dir:{without}", digits, method="leep", image_size=32, cache_dir=str(tmp_path))


def test_leep_on_a_saved_model_reads_its_classification_head(digits, tmp_path):
    model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="src", type="classification", num_labels=3)], image_size=32)
    score = score_transferability(model, digits, tasks=[DIGIT], method="leep", source_task="src", cache_dir=str(tmp_path))
    assert -math.log(10) - 1e-6 <= score["digit"] <= 0.0
    model.save_pretrained(tmp_path / "saved")  # the same source by its folder: the same score
    again = score_transferability(str(tmp_path / "saved"), digits, tasks=[DIGIT], method="leep", source_task="src", cache_dir=str(tmp_path))
    assert again["digit"] == pytest.approx(score["digit"], abs=1e-6)


def _constant_features(model: TimmMultiTaskModel) -> TimmMultiTaskModel:
    with torch.no_grad():  # the last block's output is zeroed: every image gets the same features
        for p in model.backbone.layer4.parameters():
            p.zero_()
    return model


def test_rank_backbones_puts_the_backbone_that_encodes_the_labels_first(digits, tmp_path):
    encodes = TimmMultiTaskModel.from_backbone("test_resnet", [DIGIT], image_size=32)
    blind = _constant_features(TimmMultiTaskModel.from_backbone("test_resnet", [DIGIT], image_size=32))
    for method in ("logme", "h_score"):
        ranked = rank_backbones([blind, encodes], digits, method=method, cache_dir=str(tmp_path))
        assert [r.name for r in ranked] == ["test_resnet#1", "test_resnet#0"], method
        assert ranked[0].normalized_score == 1.0 and ranked[1].normalized_score == 0.0
        assert ranked[0].scores["digit"] > ranked[1].scores["digit"] and ranked[0].seconds > 0


def test_measured_similarity_is_reproducible_and_says_why(digits, tmp_path):
    source = TimmMultiTaskModel.from_backbone("test_resnet", [DIGIT], image_size=32)
    first = measure_similarity(source, digits, cache_dir=str(tmp_path / "a"))
    again = measure_similarity(source, digits, cache_dir=str(tmp_path / "b"))  # recomputed, not read from a cache
    assert first == again
    assert first.gain == pytest.approx(first.source_score - first.random_score)
    assert first.similarity == pytest.approx(similarity_from_gain(first.gain))
    assert first.truncated_score is not None and set(first.per_task["digit"]) == {"source", "random", "truncated"}
    rec = recommend_strategy(120, "measured", model=source, dataset=digits, small_dataset_max_samples=500, cache_dir=str(tmp_path))
    assert rec.measurement == first
    assert "measured logme" in rec.reason and f"{first.source_score:.3f}" in rec.reason and f"Case {rec.case}" in rec.reason
    assert rec == recommend_strategy(120, first, small_dataset_max_samples=500, model=source)  # a stored measurement


def test_a_random_init_source_measures_as_no_better_than_random(digits, tmp_path):
    source = TimmMultiTaskModel.from_backbone("test_resnet", [DIGIT], image_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the seed measure_similarity draws its random reference with
        random_copy = TimmMultiTaskModel(source.config)
    source.backbone.load_state_dict(random_copy.backbone.state_dict())
    measured = measure_similarity(source, digits, cache_dir=str(tmp_path))
    assert measured.gain == pytest.approx(0.0, abs=1e-9) and measured.similarity < 0.5


# ------------------------------------------------------------------------------- bad input
def test_bad_input_gets_a_clear_early_error(digits, tmp_path):
    model = TimmMultiTaskModel.from_backbone("test_resnet", [DIGIT], image_size=32)
    features, labels = informative(n=40)
    with pytest.raises(ValueError, match="Unknown transferability method 'logmee'"):
        score_transferability(model, digits, method="logmee")
    with pytest.raises(ValueError, match="regression"):
        score_features(features, {"v": torch.randn(40)}, [TaskSpec(name="v", type="regression")], method="leep")
    with pytest.raises(ValueError, match="no labelled row"):
        score_features(features, {"c": torch.full((40,), -100)}, [TaskSpec(name="c", type="classification", num_labels=4)])
    few = torch.full((40,), -100)
    few[: MIN_ROWS - 1] = torch.tensor(labels[: MIN_ROWS - 1])
    with pytest.raises(ValueError, match=f"has {MIN_ROWS - 1} labelled rows"):
        score_features(features, {"c": few}, [TaskSpec(name="c", type="classification", num_labels=4)])
    with pytest.raises(ValueError, match="needs the source's classifier"):
        score_transferability(model, digits, method="leep", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs model="):
        recommend_strategy(100, "measured")
    with pytest.raises(ValueError, match="'similar', 'different', 'measured'"):
        recommend_strategy(100, "measurd")


def test_a_task_no_row_labels_is_named_before_any_backbone_pass(tmp_path):
    image = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)["train"][0]["image"]
    features = Features({"image": Image(), "kind": ClassLabel(names=["a", "b"]), "size": Value("float32")})
    data = Dataset.from_dict({"image": [image] * 20, "kind": [None] * 20, "size": [1.0] * 20}, features=features)
    model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="kind", type="classification", num_labels=2)], image_size=32)
    calls = []
    model.backbone.conv1.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="'kind' has no labelled row"):
        score_transferability(model, data, tasks="kind", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'size' has 20 labelled rows, but every one"):
        score_transferability(model, data, tasks="size", cache_dir=str(tmp_path))
    assert calls == []
