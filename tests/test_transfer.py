"""Transfer strategies (which parameters train, what a real train step changes), truncation
round trips, recommend_strategy and the errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from timm.layers.norm_act import FrozenBatchNorm2d
from torch import nn

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transferability import SimilarityMeasurement, similarity_from_gain
from hf_tlmtl.transfer import (
    LARGE_DIFFERENT_LAYER_DECAY,
    SIMILARITY_THRESHOLD,
    SMALL_DATASET_MAX_SAMPLES,
    STRATEGIES,
    apply_transfer_strategy,
    backbone_groups,
    recommend_strategy,
)
from fake_data import random_task_dataset

IMAGE = 32
TASKS = [TaskSpec(name="c", type="classification", num_labels=3), TaskSpec(name="y", type="regression")]
BACKBONES = {"cnn": ("test_resnet", {}), "vit": ("test_vit", {"img_size": IMAGE})}


def make_model(kind: str, seed: int = 0) -> TimmMultiTaskModel:
    name, kwargs = BACKBONES[kind]
    torch.manual_seed(seed)
    return TimmMultiTaskModel.from_backbone(name, TASKS, **kwargs)



def train(model: nn.Module, tmp_path, steps: int = 2, **kwargs) -> MultiTaskTrainer:
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, use_cpu=True,
        per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-2, save_strategy="no",
        lr_scheduler_type="constant", **kwargs,
    )
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=random_task_dataset(16, IMAGE))
    trainer.train()
    return trainer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def group_of(model: nn.Module) -> dict[str, int]:
    """Backbone weight name -> layer group index (timm's coarse group_matcher)."""
    return {name: g.index for g in backbone_groups(model) for name in g.names}


def trainable_backbone_groups(model: nn.Module) -> set[int]:
    params = dict(model.backbone.named_parameters())
    groups = group_of(model)
    return {groups[n] for n, p in params.items() if p.requires_grad}


# ------------------------------------------------------------------------ requires_grad
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_requires_grad_under_each_strategy(kind):
    model = make_model(kind)
    num_groups = len(backbone_groups(model))
    assert num_groups == {"cnn": 5, "vit": 7}[kind]  # stem + 4 stages / stem + 6 blocks

    summary = apply_transfer_strategy(model, "feature_extraction")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    assert summary.trainable_params == sum(p.numel() for p in model.heads.parameters())
    if kind == "cnn":  # BatchNorm became FrozenBatchNorm2d: no running-stat updates in .train()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())

    apply_transfer_strategy(model, "partial", trainable_groups=2)
    assert trainable_backbone_groups(model) == {num_groups - 2, num_groups - 1}
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(group_of(model)[n] < num_groups - 2 for n in frozen)
    assert all(p.requires_grad for p in model.heads.parameters())

    summary = apply_transfer_strategy(model, "fine_tune")  # undoes the freezing, BatchNorm included
    assert all(p.requires_grad for p in model.parameters())
    assert summary.trainable_params == summary.total_params == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())

    summary = apply_transfer_strategy(model, "truncate", trainable_groups=1)
    remaining = len(backbone_groups(model))
    assert trainable_backbone_groups(model) == {remaining - 1}
    assert all(p.requires_grad for p in model.heads.parameters())
    assert [g.name for g in summary.groups if g.trainable and g.name.startswith("heads.")] == ["heads.c", "heads.y"]


def test_summary_counts_and_text():
    model = make_model("cnn")
    summary = apply_transfer_strategy(model, "partial", trainable_groups=1)
    by_name = {g.name: g for g in summary.groups}
    assert by_name["layer4.0"].trainable == by_name["layer4.0"].total == sum(
        p.numel() for p in model.backbone.layer4.parameters()
    )
    assert by_name["layer3.0"].trainable == 0 and by_name["layer3.0"].total > 0
    # Frozen BatchNorm affine weights are buffers now, but still counted (as frozen).
    assert summary.total_params == sum(p.numel() for p in make_model("cnn").parameters())
    text = str(summary)
    assert "partial" in text and "layer4.0" in text and f"{summary.trainable_params:,}" in text


# ---------------------------------------------------------------- what a train step changes
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_feature_extraction_train_step_changes_heads_only(kind, tmp_path):
    model = make_model(kind)
    num_batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    apply_transfer_strategy(model, "feature_extraction")
    before = snapshot(model)
    train(model, tmp_path)
    after = snapshot(model)
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    running_stats = [k for k in backbone_keys if "running_" in k]
    assert len(running_stats) == 2 * num_batch_norms and (num_batch_norms > 0) == (kind == "cnn")
    for key in backbone_keys:  # weights and BatchNorm running statistics
        assert torch.equal(before[key], after[key]), key
    for key in (k for k in before if k.startswith("heads.")):
        assert not torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_partial_train_step_changes_exactly_the_top_groups(kind, tmp_path):
    model = make_model(kind)
    num_groups = len(backbone_groups(model))
    apply_transfer_strategy(model, "partial", trainable_groups=2)
    groups = group_of(model)
    before = snapshot(model.backbone)
    train(model, tmp_path)
    after = snapshot(model.backbone)
    changed_groups, unchanged_groups = set(), set()
    for key in before:
        if key.endswith("num_batches_tracked"):
            continue
        owner = key.rpartition(".")[0]
        group = groups.get(key, groups.get(f"{owner}.weight"))  # running stats: the group of their layer
        (unchanged_groups if torch.equal(before[key], after[key]) else changed_groups).add(group)
        assert torch.equal(before[key], after[key]) == (group < num_groups - 2), key
    assert changed_groups == {num_groups - 2, num_groups - 1}
    assert unchanged_groups == set(range(num_groups - 2))


# ------------------------------------------------------------------------------ truncate
@pytest.mark.parametrize("kind,stage,width", [("cnn", 2, 48), ("cnn", None, 192), ("vit", 2, 64)])
def test_truncate_saves_and_reloads_truncated(kind, stage, width, tmp_path):
    model = make_model(kind)
    full_params = sum(p.numel() for p in model.parameters())
    summary = apply_transfer_strategy(model, "truncate", truncate_stage=stage)
    expected_stage = stage if stage is not None else len(model.backbone.feature_info) - 2
    assert model.config.truncate_stage == summary.truncate_stage == expected_stage
    assert model.head_in_features == width
    assert all(head.fc.in_features == width for head in model.heads.values())
    assert summary.total_params < full_params
    x = torch.randn(2, 3, IMAGE, IMAGE)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x)
    model.save_pretrained(tmp_path / "truncated")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "truncated").eval()
    assert reloaded.config.truncate_stage == expected_stage
    assert reloaded.head_in_features == width
    assert [h.fc.in_features for h in reloaded.heads.values()] == [width, width]
    with torch.no_grad():
        got = reloaded(pixel_values=x)
    for task in ("c", "y"):
        torch.testing.assert_close(got.logits[task], expected.logits[task], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-6, rtol=0)


def test_truncate_after_training_trains_and_is_idempotent(tmp_path):
    model = make_model("cnn")
    apply_transfer_strategy(model, "truncate", truncate_stage=3)
    heads = snapshot(model.heads)
    apply_transfer_strategy(model, "truncate", truncate_stage=3)  # same cut again: heads kept
    assert all(torch.equal(v, snapshot(model.heads)[k]) for k, v in heads.items())
    with pytest.raises(ValueError, match="already truncated at stage 3"):
        apply_transfer_strategy(model, "truncate", truncate_stage=1)


# -------------------------------------------------------------------------------- lora
def test_lora_goes_through_the_adapters_module():
    adapters = pytest.importorskip("hf_tlmtl.adapters", reason="hf_tlmtl.adapters (issue: adapters) not written yet")
    if not hasattr(adapters, "apply_lora"):
        pytest.skip("hf_tlmtl.adapters.apply_lora not written yet")
    import peft

    model = make_model("vit")
    summary = apply_transfer_strategy(model, "lora", r=4, alpha=8)
    assert isinstance(summary.model, peft.PeftModel)
    trainable = {n for n, p in summary.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or ".heads." in n for n in trainable)
    assert 0 < summary.trainable_params < summary.total_params
    with pytest.raises(ValueError, match="already carries peft adapters"):
        apply_transfer_strategy(summary.model, "feature_extraction")


def test_trainer_lora_wraps_once(tmp_path):
    adapters = pytest.importorskip("hf_tlmtl.adapters", reason="hf_tlmtl.adapters (issue: adapters) not written yet")
    if not hasattr(adapters, "apply_lora"):
        pytest.skip("hf_tlmtl.adapters.apply_lora not written yet")
    import peft

    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, transfer_strategy="lora", lora_r=4
    )
    trainer = MultiTaskTrainer(model=make_model("cnn"), args=args)
    assert isinstance(trainer.model, peft.PeftModel)
    again = MultiTaskTrainer(model=trainer.model, args=args)  # already wrapped: taken as it is
    assert again.model is trainer.model
    assert again.transfer_summary.trainable_params == trainer.transfer_summary.trainable_params


# ------------------------------------------------------------------------- bad input
def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        apply_transfer_strategy(make_model("cnn"), "freeze_all")
    assert all(s in str(err.value) for s in STRATEGIES)
    with pytest.raises(ValueError, match="valid strategies"):
        MultiTaskTrainingArguments(output_dir="unused", transfer_strategy="freeze_all")


@pytest.mark.parametrize("kind,groups", [("cnn", 5), ("vit", 7)])
def test_trainable_groups_above_the_number_of_groups(kind, groups):
    with pytest.raises(ValueError, match=f"has {groups} layer groups"):
        apply_transfer_strategy(make_model(kind), "partial", trainable_groups=groups + 1)
    apply_transfer_strategy(make_model(kind), "partial", trainable_groups=groups)  # the maximum is fine


def test_partial_needs_trainable_groups():
    with pytest.raises(ValueError, match="needs trainable_groups"):
        apply_transfer_strategy(make_model("cnn"), "partial")
    with pytest.raises(ValueError, match="needs trainable_groups"):
        MultiTaskTrainingArguments(output_dir="unused", transfer_strategy="partial")


def test_truncate_without_prune_intermediate_layers_names_supported_families():
    # Every timm 1.0 family has prune_intermediate_layers; a plain torch backbone stands in for one without.
    model = make_model("cnn")
    model.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no prune_intermediate_layers.*ResNet, ConvNeXt"):
        apply_transfer_strategy(model, "truncate")


def test_truncate_stage_out_of_range():
    with pytest.raises(ValueError, match="has 5 stages"):
        apply_transfer_strategy(make_model("cnn"), "truncate", truncate_stage=4)


def test_options_for_the_wrong_strategy():
    with pytest.raises(ValueError, match="trainable_groups / trainable_fraction apply to"):
        apply_transfer_strategy(make_model("cnn"), "fine_tune", trainable_groups=2)
    with pytest.raises(ValueError, match="only apply to strategy='lora'"):
        apply_transfer_strategy(make_model("cnn"), "fine_tune", r=8)
    with pytest.raises(ValueError, match="gradual_unfreeze"):
        MultiTaskTrainingArguments(output_dir="unused", transfer_strategy="feature_extraction", gradual_unfreeze=True)
    with pytest.raises(ValueError, match="truncate_stage"):
        MultiTaskTrainingArguments(output_dir="unused", transfer_strategy="partial", trainable_groups=1, truncate_stage=2)


def test_trainer_applies_the_strategy_from_the_arguments(tmp_path):
    model = make_model("cnn")
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, transfer_strategy="partial", trainable_groups=1
    )
    trainer = MultiTaskTrainer(model=model, args=args)
    assert trainable_backbone_groups(model) == {4}
    assert trainer.transfer_summary.strategy == "partial"
    assert trainer.transfer_summary.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- recommend_strategy
@pytest.mark.parametrize(
    "samples,similarity,case,strategy",
    [
        (100, "similar", 1, "feature_extraction"),
        (100, "different", 2, "truncate"),
        (50_000, "similar", 3, "partial"),
        (50_000, "different", 4, "fine_tune"),
        (100, 0.9, 1, "feature_extraction"),
        (100, 0.1, 2, "truncate"),
        (50_000, 1.0, 3, "partial"),
        (50_000, 0.0, 4, "fine_tune"),
    ],
)
def test_recommend_strategy_four_cases(samples, similarity, case, strategy):
    rec = recommend_strategy(samples, similarity, rules="classic")
    assert (rec.case, rec.strategy) == (case, strategy)
    assert rec.reason.startswith(f"Case {case},")
    assert rec.strategy in STRATEGIES
    if case == 3:
        assert rec.trainable_groups == 2
    if case == 4:
        assert rec.layer_decay == LARGE_DIFFERENT_LAYER_DECAY


def test_recommend_strategy_boundaries_and_overrides():
    n, s = SMALL_DATASET_MAX_SAMPLES, SIMILARITY_THRESHOLD
    assert recommend_strategy(n - 1, s).case == 1  # small below the threshold, similar at it
    assert recommend_strategy(n, s).case == 3  # the threshold itself is large
    assert recommend_strategy(n - 1, math.nextafter(s, 0.0)).case == 2
    assert recommend_strategy(n, math.nextafter(s, 0.0)).case == 4
    assert recommend_strategy(200, "similar", small_dataset_max_samples=100).case == 3
    assert recommend_strategy(200, 0.6, similarity_threshold=0.7).case == 2
    assert recommend_strategy(50_000, "similar", top_groups=3, rules="classic").trainable_groups == 3


def _measurement(gain: float, top_stage_hurts: bool) -> SimilarityMeasurement:
    source = -0.2
    return SimilarityMeasurement(
        similarity=similarity_from_gain(gain), gain=gain, source_score=source, random_score=source - gain,
        truncated_score=source + (0.1 if top_stage_hurts else -0.1), method="logme",
    )


def test_measured_top_stage_evidence_makes_every_case_truncate():
    model = make_model("cnn")
    for samples, gain, case in ((100, 1.0, 1), (100, -1.0, 2), (50_000, 1.0, 3), (50_000, -1.0, 4)):
        rec = recommend_strategy(samples, _measurement(gain, top_stage_hurts=True), model=model, rules="classic")
        assert (rec.case, rec.strategy, rec.layer_decay) == (case, "truncate", 0.75)
        assert rec.truncate_stage == len(model.backbone.feature_info) - 2 and "top stage too specific" in rec.reason
        # Without that evidence the classic table decides, on the measured similarity.
        table = recommend_strategy(samples, _measurement(gain, top_stage_hurts=False), model=model, rules="classic")
        assert (table.case, table.strategy) == (case, {1: "feature_extraction", 2: "truncate", 3: "partial", 4: "fine_tune"}[case])
        assert "from measured logme" in table.reason


def test_recommendation_applies_to_a_model():
    model = make_model("cnn")
    rec = recommend_strategy(100, "different", model=model)
    assert rec.truncate_stage == len(model.backbone.feature_info) - 2
    kwargs = rec.training_kwargs()
    summary = apply_transfer_strategy(model, kwargs["transfer_strategy"], truncate_stage=kwargs["truncate_stage"])
    assert summary.truncate_stage == rec.truncate_stage
    assert recommend_strategy(50_000, "similar", top_groups=9, model=make_model("vit"), rules="classic").trainable_groups == 7
    classic = recommend_strategy(50_000, "similar", rules="classic").training_kwargs()
    args = MultiTaskTrainingArguments(output_dir="unused", **classic)
    assert (args.transfer_strategy, args.trainable_groups, args.bn) == ("partial", 2, "train")


@pytest.mark.parametrize("samples,similarity,case", [(100, "similar", 1), (100, 0.0, 2), (50_000, 0.9, 3), (50_000, "different", 4)])
def test_study_rules_truncate_with_the_measured_batch_norm_policy(samples, similarity, case):
    small_input = TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=IMAGE)  # 0.2x its native 160 px
    rec = recommend_strategy(samples, similarity, model=small_input)
    small = samples < SMALL_DATASET_MAX_SAMPLES
    assert (rec.case, rec.strategy, rec.layer_decay) == (case, "truncate", 0.75)
    assert (rec.bn, rec.learning_rate_scale) == (("recalibrate", 1.0) if small else ("frozen", 0.1))
    assert rec.reason.startswith(f"Case {case},") and f"BatchNorm {rec.bn}" in rec.reason
    kwargs = rec.training_kwargs(learning_rate=0.01)
    if small:
        assert "learning_rate" not in kwargs
    else:
        assert kwargs["learning_rate"] == pytest.approx(0.001) and kwargs["head_lr_scale"] == pytest.approx(10.0)


def test_following_the_large_case_advice_trains_a_truncated_model_with_frozen_batch_norm(tmp_path):
    from hf_tlmtl.transfer.batch_norm import batch_norm_layers, frozen_batch_norm_layers

    model = make_model("cnn")
    rec = recommend_strategy(50_000, "similar", model=model)
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, use_cpu=True, per_device_train_batch_size=8,
        max_steps=1, save_strategy="no", lr_scheduler_type="constant", **rec.training_kwargs(learning_rate=0.01),
    )
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=random_task_dataset(16, IMAGE))
    trainer.train()
    assert model.config.truncate_stage == rec.truncate_stage and model.config.bn_policy == "frozen"
    assert not batch_norm_layers(model) and frozen_batch_norm_layers(model)
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert rates[-1] == pytest.approx(0.01)  # heads at the given rate, the backbone below it
    assert max(r for r in rates if r < 0.01 - 1e-12) <= 0.001 + 1e-12


def test_study_rules_extract_features_for_a_small_similar_target_at_native_resolution():
    native = make_model("cnn")  # test_resnet at its own 160 px
    rec = recommend_strategy(100, "similar", model=native)
    assert (rec.case, rec.strategy, rec.bn) == (1, "feature_extraction", "frozen") and "native" in rec.reason
    # Only case 1 depends on the resolution; without a model the 48 px evidence (truncate) decides.
    assert recommend_strategy(100, "different", model=native).strategy == "truncate"
    assert recommend_strategy(100, "similar").strategy == "truncate"


def test_unknown_rules():
    with pytest.raises(ValueError, match="rules must be one of"):
        recommend_strategy(100, "similar", rules="article")


@pytest.mark.parametrize(
    "samples,similarity,message",
    [
        (-1, "similar", "num_train_samples must be >= 1"),
        (0, "similar", "num_train_samples must be >= 1"),
        (10.5, "similar", "must be an int"),
        (100, 1.5, r"must be in \[0, 1\]"),
        (100, -0.1, r"must be in \[0, 1\]"),
        (100, float("nan"), "'similar', 'different', 'measured' or a number"),
        (100, "same", "'similar', 'different', 'measured' or a number"),
        (100, True, "'similar', 'different', 'measured' or a number"),
    ],
)
def test_recommend_strategy_bad_input(samples, similarity, message):
    with pytest.raises(ValueError, match=message):
        recommend_strategy(samples, similarity)
