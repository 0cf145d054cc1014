"""Gradual unfreezing with a real Trainer: the trainable groups follow the schedule, frozen groups
(BatchNorm statistics included) do not move, and a run resumed from a mid-schedule checkpoint
ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from timm.models import group_parameters
from transformers import TrainerCallback

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transfer import backbone_groups
from fake_data import random_task_dataset

IMAGE = 32
TASKS = [TaskSpec(name="c", type="classification", num_labels=3), TaskSpec(name="y", type="regression")]
STEPS_PER_EPOCH = 2


def make_model() -> TimmMultiTaskModel:
    torch.manual_seed(0)
    return TimmMultiTaskModel.from_backbone("test_resnet", TASKS)



class RecordTrainable(TrainerCallback):
    """After each optimizer step: which backbone groups trained during it."""

    def __init__(self, model: TimmMultiTaskModel):
        self.model, self.trained = model, {}
        self.groups = backbone_groups(model)

    def on_step_end(self, args, state, control, **kwargs):
        params = dict(self.model.backbone.named_parameters())
        self.trained[state.global_step] = {
            g.name for g in self.groups if any(params[n].requires_grad for n in g.names if n in params)
        }


def make_args(output_dir, **kwargs) -> MultiTaskTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), report_to="none", disable_tqdm=True, use_cpu=True, per_device_train_batch_size=8,
        learning_rate=1e-2, layer_decay=0.5, gradual_unfreeze=True, save_strategy="no", seed=7,
    )
    return MultiTaskTrainingArguments(**{**defaults, **kwargs})


def backbone_state(model: TimmMultiTaskModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items() if "num_batches" not in k}


def test_one_more_group_per_epoch_from_the_top(tmp_path):
    model = make_model()
    names = [g.name for g in backbone_groups(model)]
    before = backbone_state(model)
    recorder = RecordTrainable(model)
    trainer = MultiTaskTrainer(
        model=model, args=make_args(tmp_path, num_train_epochs=3), train_dataset=random_task_dataset(8 * STEPS_PER_EPOCH, IMAGE), callbacks=[recorder]
    )
    assert trainer.gradual_unfreeze.schedule_names == names[::-1]
    assert not any(p.requires_grad for p in model.backbone.parameters())  # heads only until training starts
    trainer.train()
    expected = {step: set(names[::-1][: (step - 1) // STEPS_PER_EPOCH]) for step in range(1, 3 * STEPS_PER_EPOCH + 1)}
    assert recorder.trained == expected  # epoch 0: heads only; epoch 1: + layer4; epoch 2: + layer3
    after = backbone_state(model)
    group_of = {n: g.name for g in backbone_groups(model) for n in g.names}
    for key in before:
        group = group_of.get(key) or group_of[key.rpartition(".")[0] + ".weight"]  # running stats: their layer's group
        moved = not torch.equal(before[key], after[key])
        assert moved == (group in ("layer4.0", "layer3.0")), key  # BatchNorm statistics of frozen groups stay put


def test_unfrozen_groups_were_in_the_optimizer_from_the_start_with_their_layer_lr(tmp_path):
    model = make_model()
    trainer = MultiTaskTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=random_task_dataset(8 * STEPS_PER_EPOCH, IMAGE))
    optimizer = trainer.create_optimizer()
    held = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    layer_of = group_parameters(model.backbone, model.backbone.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_of.values()) + 1
    for name, param in model.backbone.named_parameters():
        assert held[id(param)]["lr"] == pytest.approx(1e-2 * 0.5 ** (num_layers - layer_of[name]))
        assert not param.requires_grad  # still frozen: the callback unfreezes during training


def test_every_n_steps_and_max_groups(tmp_path):
    model = make_model()
    recorder = RecordTrainable(model)
    args = make_args(tmp_path, max_steps=5, unfreeze_every_n_steps=2, trainable_groups=2)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=random_task_dataset(8 * STEPS_PER_EPOCH, IMAGE), callbacks=[recorder])
    trainer.train()
    top = ["layer4.0", "layer3.0"]
    assert recorder.trained == {1: set(), 2: set(), 3: {top[0]}, 4: {top[0]}, 5: set(top)}  # capped at 2


def test_resume_from_a_mid_schedule_checkpoint_matches_an_uninterrupted_run(tmp_path):
    epochs, save_at = 3, 3  # checkpoint in the middle of epoch 1 (one group unfrozen)
    model = make_model()
    full = MultiTaskTrainer(
        model=model,
        args=make_args(tmp_path / "full", num_train_epochs=epochs, save_strategy="steps", save_steps=save_at),
        train_dataset=random_task_dataset(8 * STEPS_PER_EPOCH, IMAGE),
    )
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{save_at}"
    assert checkpoint.is_dir()

    resumed_model = make_model()
    recorder = RecordTrainable(resumed_model)
    resumed = MultiTaskTrainer(
        model=resumed_model,
        args=make_args(tmp_path / "resumed", num_train_epochs=epochs),
        train_dataset=random_task_dataset(8 * STEPS_PER_EPOCH, IMAGE),
        callbacks=[recorder],
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert recorder.trained == {4: {"layer4.0"}, 5: {"layer4.0", "layer3.0"}, 6: {"layer4.0", "layer3.0"}}
    assert resumed.gradual_unfreeze.unfrozen_names == full.gradual_unfreeze.unfrozen_names == ["layer4.0", "layer3.0"]
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(resumed_model) == trainable(model)
    expected, got = model.state_dict(), resumed_model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="needs gradual_unfreeze=True"):
        MultiTaskTrainingArguments(output_dir="unused", unfreeze_every_n_steps=2)
    with pytest.raises(ValueError, match="unfreeze_every_n_steps must be >= 1"):
        MultiTaskTrainingArguments(output_dir="unused", gradual_unfreeze=True, unfreeze_every_n_steps=0)
    with pytest.raises(ValueError, match="keeps frozen"):
        MultiTaskTrainingArguments(output_dir="unused", gradual_unfreeze=True, transfer_strategy="lora")
