"""The BatchNorm policy (train / frozen / recalibrate) through a real Trainer, keep_frozen, and the
family-independent units of partial and truncate (trainable_fraction, keep_depth)."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.transfer.batch_norm import batch_norm_layers, batch_norm_state, frozen_batch_norm_layers, recalibrate_batch_norm
from hf_tlmtl.data import MultiTaskCollator
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transfer import apply_transfer_strategy, backbone_groups, resolve_keep_depth, truncation_points
from fake_data import random_task_dataset

IMAGE = 32
TASKS = [TaskSpec(name="c", type="classification", num_labels=3), TaskSpec(name="y", type="regression")]


def make_model(name: str = "test_resnet", seed: int = 0) -> TimmMultiTaskModel:
    torch.manual_seed(seed)
    return TimmMultiTaskModel.from_backbone(name, TASKS, image_size=IMAGE)


def trainer_for(model: nn.Module, tmp_path, rows: int = 16, **kwargs) -> MultiTaskTrainer:
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, use_cpu=True,
        per_device_train_batch_size=8, per_device_eval_batch_size=64, max_steps=3, learning_rate=1e-2,
        save_strategy="no", lr_scheduler_type="constant", **kwargs,
    )
    data = random_task_dataset(rows, IMAGE)
    return MultiTaskTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)


def conv_weights(model: TimmMultiTaskModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.backbone.named_parameters() if p.ndim == 4}


STRATEGY_KWARGS = {
    "fine_tune": {},
    "partial": {"trainable_groups": 2},
    "truncate": {"truncate_stage": 3},
}


@pytest.mark.parametrize("strategy", list(STRATEGY_KWARGS))
def test_frozen_batch_norm_does_not_change_in_training(strategy, tmp_path):
    model = make_model()
    trainer = trainer_for(model, tmp_path, transfer_strategy=strategy, bn="frozen", **STRATEGY_KWARGS[strategy])
    assert not batch_norm_layers(model) and frozen_batch_norm_layers(model)
    before_bn, before_conv = batch_norm_state(model), conv_weights(model)
    trainer.train()
    after_bn, after_conv = batch_norm_state(model), conv_weights(model)
    assert after_bn.keys() == before_bn.keys() and len(after_bn) > 0
    assert all(torch.equal(before_bn[k], after_bn[k]) for k in before_bn), "a BatchNorm tensor changed under bn='frozen'"
    assert any(not torch.equal(before_conv[k], after_conv[k]) for k in before_conv), "nothing trained"
    assert model.config.bn_policy == "frozen" and "BatchNorm frozen" in str(trainer.transfer_summary)


def test_batch_norm_that_trains_does_change(tmp_path):
    """The contrast that makes the frozen test meaningful: with bn='train' statistics and affine weights move."""
    model = make_model()
    trainer = trainer_for(model, tmp_path, transfer_strategy="fine_tune", bn="train")
    before = batch_norm_state(model)
    trainer.train()
    after = batch_norm_state(model)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.equal(before["layer4.0.bn1.weight"], after["layer4.0.bn1.weight"])


def direct_batch_norm_statistics(model: TimmMultiTaskModel, pixels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and unbiased variance of every BatchNorm layer's input, over all of ``pixels`` at once (train mode)."""
    stats, hooks = {}, []
    for name, layer in batch_norm_layers(model).items():
        def hook(module, inputs, name=name):
            x = inputs[0].double()
            stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True))
        hooks.append(layer.register_forward_pre_hook(hook))
    model.backbone.train()
    with torch.no_grad():
        model.backbone(pixels)
    for h in hooks:
        h.remove()
    return stats


def test_recalibrate_gives_the_training_set_statistics(tmp_path):
    model = make_model()
    trainer = trainer_for(model, tmp_path, rows=24, transfer_strategy="fine_tune", bn="recalibrate")
    trainer.train()
    rng_before = torch.get_rng_state()
    assert trainer.recalibrate_batch_norm() == 24  # 24 rows: one batch of the eval batch size
    assert torch.equal(torch.get_rng_state(), rng_before), "recalibration moved the training RNG"
    recalibrated = {n: (l.running_mean.clone(), l.running_var.clone()) for n, l in batch_norm_layers(model).items()}
    pixels = MultiTaskCollator(model.tasks)([trainer.train_dataset[i] for i in range(24)])["pixel_values"]
    direct = direct_batch_norm_statistics(model, pixels)
    assert direct.keys() == recalibrated.keys() and len(direct) == 15
    for name, (mean, var) in direct.items():
        torch.testing.assert_close(recalibrated[name][0].double(), mean, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(recalibrated[name][1].double(), var, atol=1e-5, rtol=1e-4, msg=name)
    # Evaluating and saving at the same step use these statistics: no second pass.
    trainer.evaluate()
    assert trainer._bn_recalibrated_at == trainer.state.global_step and trainer.recalibrate_batch_norm() == 0


def test_recalibrate_runs_before_evaluation(tmp_path):
    model = make_model()
    trainer = trainer_for(model, tmp_path, transfer_strategy="fine_tune", bn="recalibrate")
    trainer.train()
    stale = model.backbone.bn1.running_mean.clone()
    trainer.evaluate()
    assert not torch.equal(model.backbone.bn1.running_mean, stale)
    assert trainer._bn_recalibrated_at == trainer.state.global_step == 3


def test_recalibrate_over_several_batches_averages_batches():
    """With equal batches, running_mean is the exact mean over all images (first layer: input independent of BN)."""
    model = make_model()
    x = torch.randn(12, 3, IMAGE, IMAGE)
    assert recalibrate_batch_norm(model, [x[:4], x[4:8], x[8:]]) == 12
    with torch.no_grad():
        direct = model.backbone.conv1[0](x).mean(dim=(0, 2, 3))  # test_resnet's deep stem: conv, BN, ...
    torch.testing.assert_close(model.backbone.conv1[1].running_mean, direct, atol=1e-5, rtol=1e-5)
    assert model.backbone.training  # modes restored (from_backbone models start in train mode)


def test_fine_tune_keeps_a_users_freeze_when_asked(caplog):
    model = make_model()
    model.backbone = freeze_batch_norm_2d(model.backbone)  # the user's own freeze
    frozen = set(frozen_batch_norm_layers(model))
    assert len(frozen) == 15
    summary = apply_transfer_strategy(model, "fine_tune", keep_frozen=True)
    assert set(frozen_batch_norm_layers(model)) == frozen
    assert any("stay frozen" in note for note in summary.notes)

    unasked = make_model()
    unasked.backbone = freeze_batch_norm_2d(unasked.backbone)
    with caplog.at_level(logging.WARNING, logger="hf_tlmtl.transfer"):
        summary = apply_transfer_strategy(unasked, "fine_tune")
    assert not frozen_batch_norm_layers(unasked), "fine_tune unfreezes by default"
    assert "15 frozen BatchNorm layers" in caplog.text and "keep_frozen=True" in caplog.text


def test_bn_policy_is_saved_and_in_the_model_card(tmp_path):
    from hf_tlmtl.hub import create_model_card

    model = make_model()
    apply_transfer_strategy(model, "partial", trainable_groups=1, bn="frozen")
    model.save_pretrained(tmp_path / "m")
    reloaded = TimmMultiTaskModel.from_pretrained(tmp_path / "m")
    assert reloaded.config.bn_policy == "frozen"
    x = torch.randn(2, 3, IMAGE, IMAGE)
    torch.testing.assert_close(reloaded.eval()(x).logits["c"], model.eval()(x).logits["c"])
    assert "BatchNorm: frozen" in create_model_card(reloaded).text


# --------------------------------------------------------------------------- family-independent units
FRACTIONS = [
    ("test_resnet", 0.25, ["layer4.0"]),
    ("test_resnet", 0.9, ["layer2.0", "layer3.0", "layer4.0"]),
    ("test_vit", 0.25, ["blocks.4", "blocks.5+norm"]),
    ("test_vit", 0.5, ["blocks.2", "blocks.3", "blocks.4", "blocks.5+norm"]),
    ("test_convnext", 0.25, ["stages.3", "head.norm"]),
    ("test_convnext", 0.8, ["stages.2", "stages.3", "head.norm"]),
    ("efficientnet_lite0", 0.25, ["blocks.6.0+conv_head+bn2"]),
    ("efficientnet_lite0", 0.75, ["blocks.5", "blocks.6.0+conv_head+bn2"]),
]


@pytest.mark.parametrize("backbone,fraction,expected", FRACTIONS, ids=[f"{b}-{f}" for b, f, _ in FRACTIONS])
def test_trainable_fraction_resolves_to_whole_top_groups(backbone, fraction, expected):
    model = TimmMultiTaskModel.from_backbone(backbone, TASKS[:1], **({"img_size": IMAGE} if "vit" in backbone else {}))
    summary = apply_transfer_strategy(model, "partial", trainable_fraction=fraction)
    trainable = [g.name for g in summary.groups if g.trainable and not g.name.startswith("heads.")]
    assert trainable == expected
    names = {g.name for g in backbone_groups(model)}
    shares = {g.name: g.total for g in summary.groups if g.name in names}
    share = sum(shares[n] for n in expected) / sum(shares.values())
    assert f"{100 * share:.1f}% of the backbone's parameters" in summary.notes[0]


def test_keep_depth_picks_the_nearest_cut_and_reports_what_was_dropped():
    model = make_model()
    points = truncation_points(model)
    assert [p.module for p in points] == ["act1", "layer1", "layer2", "layer3"]
    assert [round(p.kept_depth, 2) for p in points] == [0.2, 0.4, 0.6, 0.8]
    assert resolve_keep_depth(model, 0.55) == 2
    summary = apply_transfer_strategy(model, "truncate", keep_depth=0.55)
    assert model.config.truncate_stage == 2 and summary.truncate_stage == 2
    dropped = [n for n in summary.notes if n.startswith("truncation dropped")]
    assert dropped and "layer3.0, layer4.0" in dropped[0]


def test_efficientnet_cuts_are_timms_feature_taps():
    model = TimmMultiTaskModel.from_backbone("efficientnet_lite0", TASKS[:1])
    points = truncation_points(model)
    assert [p.module for p in points] == ["blocks.0", "blocks.1", "blocks.2", "blocks.4"]
    # The default cut (drop the top stage) keeps 71 % of the depth but only about a fifth of the parameters.
    assert points[-1].kept_depth == pytest.approx(12 / 17) and points[-1].kept_params < 0.25


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strategy": "fine_tune", "bn": "sometimes"}, "Unknown BatchNorm policy"),
        ({"strategy": "feature_extraction", "bn": "recalibrate"}, "nothing to re-estimate"),
        ({"strategy": "lora", "bn": "recalibrate"}, "nothing to re-estimate under lora"),
        ({"strategy": "partial", "trainable_groups": 1, "trainable_fraction": 0.5}, "not both"),
        ({"strategy": "partial", "trainable_fraction": 0.0}, r"trainable_fraction must be a number in \(0, 1\]"),
        ({"strategy": "fine_tune", "trainable_fraction": 0.5}, "apply to 'partial' and 'truncate'"),
        ({"strategy": "truncate", "keep_depth": 1.0}, r"keep_depth must be a number in \(0, 1\)"),
        ({"strategy": "truncate", "keep_depth": 0.5, "truncate_stage": 1}, "not both"),
    ],
)
def test_bad_transfer_options_are_refused(kwargs, match):
    strategy = kwargs.pop("strategy")
    with pytest.raises(ValueError, match=match):
        apply_transfer_strategy(make_model(), strategy, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bn": "off"}, "Unknown BatchNorm policy"),
        ({"transfer_strategy": "feature_extraction", "bn": "recalibrate"}, "nothing to re-estimate"),
        ({"transfer_strategy": "partial", "trainable_fraction": 1.5}, r"trainable_fraction must be in \(0, 1\]"),
        ({"transfer_strategy": "fine_tune", "keep_depth": 0.5}, "keep_depth is used by transfer_strategy='truncate'"),
    ],
)
def test_bad_training_arguments_are_refused_early(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)
