"""Loss balancers: hand-computed combined losses, learnable / epoch state through checkpoints,
and torchjd gradient aggregation inside the real Trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.multitask.balancing import BALANCERS, build_balancer
from hf_tlmtl.training.balancer_state import (
    BALANCER_STATE_NAME,
    BALANCER_WEIGHTS_NAME,
    load_balancer_state,
    save_balancer_state,
)
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments

IMAGE_SIZE = 32
LOSSES = {"shape": torch.tensor(1.5), "scale": torch.tensor(0.8), "marks": torch.tensor(0.6)}


def _tasks(weights=(1.0, 1.0, 1.0)):
    return [
        TaskSpec(name="shape", type="classification", num_labels=4, weight=weights[0]),
        TaskSpec(name="scale", type="regression", weight=weights[1]),
        TaskSpec(name="marks", type="multilabel", num_labels=3, weight=weights[2]),
    ]



# ------------------------------------------------------------------ combined loss by hand
def test_static_is_weighted_sum():
    balancer = build_balancer("static", _tasks(weights=(2.0, 0.5, 0.0)))
    assert float(balancer.combine(LOSSES)) == pytest.approx(2.0 * 1.5 + 0.5 * 0.8 + 0.0)
    assert balancer.weights() == {"shape": 2.0, "scale": 0.5, "marks": 0.0}


def test_uncertainty_follows_kendall_formulation():
    balancer = build_balancer("uncertainty", _tasks(weights=(1.0, 2.0, 1.0)))
    s = {"shape": 0.3, "scale": -0.2, "marks": 0.1}
    with torch.no_grad():
        for name, value in s.items():
            balancer.log_vars[name].fill_(value)
    # classification / multilabel: exp(-s) L + s/2; regression: 0.5 exp(-s) L + s/2; times the task weight.
    expected = (
        math.exp(-0.3) * 1.5 + 0.15
        + 2.0 * (0.5 * math.exp(0.2) * 0.8 - 0.1)
        + math.exp(-0.1) * 0.6 + 0.05
    )
    assert float(balancer.combine(LOSSES).detach()) == pytest.approx(expected, rel=1e-6)
    assert balancer.weights()["scale"] == pytest.approx(2.0 * 0.5 * math.exp(0.2), rel=1e-6)
    # An absent task is left out: its log-variance gets no gradient.
    balancer.combine({"shape": LOSSES["shape"]}).backward()
    assert balancer.log_vars["shape"].grad is not None and balancer.log_vars["scale"].grad is None


def test_dwa_weights_from_previous_two_epochs():
    balancer = build_balancer("dwa", _tasks(weights=(1.0, 2.0, 1.0)))
    assert float(balancer.combine(LOSSES)) == pytest.approx(1.5 + 2.0 * 0.8 + 0.6)  # epoch 1: all weights 1
    balancer.on_epoch_end({"shape": 2.0, "scale": 1.0, "marks": 0.9})
    assert set(balancer.dwa_weights.values()) == {1.0}  # epoch 2: still 1
    balancer.on_epoch_end({"shape": 1.0, "scale": 0.9, "marks": 0.9})
    ratios = {"shape": 0.5, "scale": 0.9, "marks": 1.0}
    denominator = sum(math.exp(r / 2) for r in ratios.values())
    lambdas = {n: 3 * math.exp(r / 2) / denominator for n, r in ratios.items()}
    expected = lambdas["shape"] * 1.5 + 2.0 * lambdas["scale"] * 0.8 + lambdas["marks"] * 0.6
    assert float(balancer.combine(LOSSES)) == pytest.approx(expected, rel=1e-6)
    assert balancer.weights()["scale"] == pytest.approx(2.0 * lambdas["scale"], rel=1e-6)
    # A third epoch drops the oldest one.
    balancer.on_epoch_end({"shape": 1.0, "scale": 0.9, "marks": 0.45})
    assert balancer.dwa_weights["marks"] < balancer.dwa_weights["shape"] == pytest.approx(balancer.dwa_weights["scale"])


def test_dwa_task_without_history_gets_neutral_ratio():
    balancer = build_balancer("dwa", _tasks())
    balancer.on_epoch_end({"shape": 1.0, "scale": 1.0})  # marks never labelled in epoch 1
    balancer.on_epoch_end({"shape": 1.0, "scale": 1.0, "marks": 0.1})
    assert balancer.dwa_weights["marks"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["upgrad", "mgda", "pcgrad", "imtlg"])
def test_gradient_aggregation_methods_report_static_sum(method):
    balancer = build_balancer(method, _tasks(weights=(2.0, 1.0, 1.0)))
    assert balancer.requires_grad_aggregation
    assert float(balancer.combine(LOSSES)) == pytest.approx(2.0 * 1.5 + 0.8 + 0.6)


def test_balancer_state_round_trip_and_mismatch(tmp_path):
    dwa = build_balancer("dwa", _tasks())
    dwa.on_epoch_end({"shape": 2.0, "scale": 1.0, "marks": 1.0})
    dwa.on_epoch_end({"shape": 1.0, "scale": 1.0, "marks": 1.0})
    save_balancer_state(dwa, tmp_path)
    assert not (tmp_path / BALANCER_WEIGHTS_NAME).exists()  # DWA has no tensors
    restored = build_balancer("dwa", _tasks())
    load_balancer_state(restored, tmp_path)
    assert restored.history == dwa.history and restored.weights() == dwa.weights()
    with pytest.raises(ValueError, match="loss_balancing='dwa'"):
        load_balancer_state(build_balancer("uncertainty", _tasks()), tmp_path)


# ------------------------------------------------------------------------------- bad input
def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="valid methods: .*'dwa'.*'upgrad'"):
        MultiTaskTrainingArguments(output_dir="unused", loss_balancing="gradnorm")
    with pytest.raises(ValueError, match="Unknown loss_balancing 'uw'"):
        build_balancer("uw", _tasks())
    assert {"static", "uncertainty", "dwa", "upgrad", "mgda", "pcgrad", "imtlg"} <= set(BALANCERS)


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_negative_or_nan_task_weight_rejected(weight):
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        TaskSpec(name="y", type="regression", weight=weight)


# ------------------------------------------------------------------- real Trainer runs
@pytest.fixture(scope="module")
def shapes():
    ds = load_embedded_dataset("shapes", n_train=32, n_eval=8, image_size=IMAGE_SIZE, seed=0)
    return ds["train"].select_columns(["image", "shape", "scale"])


def _shape_scale_tasks():
    return [TaskSpec(name="shape", type="classification", num_labels=4), TaskSpec(name="scale", type="regression")]


def _trainer(output_dir, method, train, **overrides):
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", _shape_scale_tasks(), image_size=IMAGE_SIZE)
    options = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, per_device_train_batch_size=8,
        learning_rate=0.05, loss_balancing=method, seed=0, disable_tqdm=True, logging_steps=1,
        save_strategy="steps", save_steps=2,
    )
    options.update(overrides)
    args = MultiTaskTrainingArguments(**options)
    dataset = prepare_dataset(train, model.config, train=False)
    return MultiTaskTrainer(model=model, args=args, train_dataset=dataset, data_collator=MultiTaskCollator(model.tasks))


def _log_vars(trainer):
    return {n: float(p.detach()) for n, p in trainer.balancer.log_vars.items()}


def test_uncertainty_params_train_are_checkpointed_and_resume_identically(shapes, tmp_path):
    full = _trainer(tmp_path / "full", "uncertainty", shapes, max_steps=4)
    params = list(full.balancer.parameters())
    full.train()
    # The log-variances are in the optimizer and moved away from their initial 0.
    held = {id(p) for group in full.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in params)
    final = _log_vars(full)
    assert all(abs(v) > 1e-3 for v in final.values())
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = load_file(str(checkpoint / BALANCER_WEIGHTS_NAME))
    assert set(saved) == {"log_vars.shape", "log_vars.scale"}
    assert json.loads((checkpoint / BALANCER_STATE_NAME).read_text())["method"] == "uncertainty"
    assert {n: float(saved[f"log_vars.{n}"]) for n in final} != final

    # On resume, before the first step, the values are exactly the saved ones; training on then
    # reaches the uninterrupted run's values (the optimizer state for them was restored too).
    resumed = _trainer(tmp_path / "full", "uncertainty", shapes, max_steps=4, save_strategy="no")
    seen_at_start = {}

    class RecordAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen_at_start.update(_log_vars(resumed))

    resumed.add_callback(RecordAtStart())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert seen_at_start == {n: float(saved[f"log_vars.{n}"]) for n in final}
    assert _log_vars(resumed) == pytest.approx(final, abs=1e-6)


class SaveAt(TrainerCallback):
    """Checkpoint at the given steps only (fewer writes than a save_steps grid)."""

    def __init__(self, *steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps


def test_dwa_history_survives_resume_mid_epoch_and_at_epoch_boundary(shapes, tmp_path):
    # 24 rows / batch 8 = 3 steps per epoch: checkpoint-5 is mid epoch 2; checkpoint-6 is saved on
    # epoch 2's last step, before that epoch ends (the resumed run must close it).
    rows = shapes.select(range(24))
    full = _trainer(tmp_path / "full", "dwa", rows, num_train_epochs=3, save_strategy="no")
    full.add_callback(SaveAt(5, 6))
    full.train()
    history = full.balancer.history
    assert len(history) == 2 and history[0] != history[1]
    epoch3_weights = [log["weight_shape"] for log in full.state.log_history if "weight_shape" in log][-1]
    assert epoch3_weights != 1.0  # epoch 3 used weights from epochs 1 and 2
    for step in (5, 6):
        resumed = _trainer(tmp_path / "full", "dwa", rows, num_train_epochs=3, save_strategy="no")
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
        assert len(resumed.balancer.history) == 2
        for got, want in zip(resumed.balancer.history, history):
            assert got == pytest.approx(want, rel=1e-5), step
        assert resumed.balancer.weights() == pytest.approx(full.balancer.weights(), rel=1e-5)


def _conflicting_setup():
    """Two regression heads reading nearly opposite directions of the shared features, both pushed
    the same way: their backbone gradients conflict, and the weighted sum favours task "up"."""
    torch.manual_seed(0)
    tasks = [TaskSpec(name="up", type="regression", weight=3.0), TaskSpec(name="down", type="regression")]
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=IMAGE_SIZE)
    with torch.no_grad():
        up, down = model.heads["up"].fc, model.heads["down"].fc
        down.weight.copy_(-up.weight + 0.5 * torch.randn_like(up.weight) * up.weight.std())
        up.bias.zero_()
        down.bias.zero_()
    pixel_values = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = {"pixel_values": pixel_values, "up": torch.full((8,), 5.0), "down": torch.full((8,), 5.0)}
    return model, batch


def _flat_backbone_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.backbone.parameters() if p.grad is not None])


def _per_task_backbone_grads(model, batch):
    model.train()
    out = model(**batch)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    grads = {}
    for name, weight in (("up", 3.0), ("down", 1.0)):
        g = torch.autograd.grad(weight * out.task_losses[name], params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)])
    return grads


@pytest.mark.parametrize("method", ["upgrad", "mgda", "pcgrad", "imtlg"])
def test_aggregating_training_step_resolves_conflict_unlike_plain_sum(method, tmp_path):
    model, batch = _conflicting_setup()
    grads = _per_task_backbone_grads(model, batch)
    plain_sum = grads["up"] + grads["down"]
    assert float(plain_sum @ grads["down"]) < 0  # the weighted sum works against task "down"

    args = MultiTaskTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_balancing=method)
    trainer = MultiTaskTrainer(model=model, args=args)
    model.zero_grad(set_to_none=True)
    loss = trainer.training_step(model, dict(batch))
    aggregated = _flat_backbone_grad(model)

    assert not torch.allclose(aggregated, plain_sum, rtol=1e-3, atol=1e-6)
    # What these aggregators guarantee for two tasks: the update conflicts with neither (to first order).
    tolerance = 1e-4 * float(aggregated.norm() * grads["down"].norm())
    assert float(aggregated @ grads["up"]) > -tolerance and float(aggregated @ grads["down"]) > -tolerance
    with torch.no_grad():
        task_losses = model(**batch).task_losses
    assert float(loss) == pytest.approx(float(3.0 * task_losses["up"] + task_losses["down"]), rel=1e-4)
    # Each head got its own task's gradient only.
    out = model(**batch)
    head_grad = torch.autograd.grad(3.0 * out.task_losses["up"], model.heads["up"].fc.weight)[0]
    assert torch.allclose(model.heads["up"].fc.weight.grad, head_grad, rtol=1e-4, atol=1e-7)
    assert set(trainer.balancer.weights()) == {"up", "down"}


def test_upgrad_trains_in_trainer_and_logs_its_weights(shapes, tmp_path):
    trainer = _trainer(tmp_path, "upgrad", shapes, max_steps=3, save_strategy="no", gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.backbone.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    logged = [log for log in trainer.state.log_history if "weight_shape" in log]
    assert logged and all(math.isfinite(log["loss"]) for log in logged)
    assert any(log["weight_shape"] != 1.0 for log in logged)  # the aggregator's weights, not the static ones
