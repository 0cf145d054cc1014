"""Layer-wise LR decay: group learning rates read back from the Trainer's optimizer, frozen
parameters left out, weight-decay exclusions, --optim still honoured, bad layer_decay."""

from __future__ import annotations

import pytest
import torch
from timm.models import group_parameters
from torch import nn

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.transfer.layer_decay import layer_decay_param_groups
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transfer import backbone_groups
from fake_data import random_task_dataset

IMAGE = 32
TASKS = [TaskSpec(name="c", type="classification", num_labels=3), TaskSpec(name="y", type="regression")]
BACKBONES = {"cnn": ("test_resnet", {}), "vit": ("test_vit", {"img_size": IMAGE})}
LR, DECAY, HEAD_SCALE, WD = 1e-3, 0.6, 4.0, 0.05


def make_model(kind: str) -> TimmMultiTaskModel:
    name, kwargs = BACKBONES[kind]
    torch.manual_seed(0)
    return TimmMultiTaskModel.from_backbone(name, TASKS, **kwargs)



def make_trainer(model: nn.Module, tmp_path, **kwargs) -> MultiTaskTrainer:
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no",
        per_device_train_batch_size=8, learning_rate=LR, weight_decay=WD, layer_decay=DECAY, head_lr_scale=HEAD_SCALE,
    )
    args = MultiTaskTrainingArguments(**{**defaults, **kwargs})
    return MultiTaskTrainer(model=model, args=args, train_dataset=random_task_dataset(8, IMAGE))


def expected_backbone_lr(model: nn.Module) -> dict[str, float]:
    """lr * layer_decay ** (num_layers - layer_id), layer ids from timm's fine group_matcher."""
    layer_of = group_parameters(model.backbone, model.backbone.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_of.values()) + 1
    return {f"backbone.{n}": LR * DECAY ** (num_layers - i) for n, i in layer_of.items()}


def optimizer_view(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names.get(id(p), f"<extra {id(p)}>"): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_group_lrs_follow_layer_decay_after_a_scheduler_step(kind, tmp_path):
    model = make_model(kind)
    trainer = make_trainer(model, tmp_path, lr_scheduler_type="linear", max_steps=4)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    trainer.optimizer.step()  # no gradients yet: a no-op step, so the scheduler may step
    trainer.lr_scheduler.step()
    factor = 3 / 4  # linear decay, no warmup, after 1 of 4 steps
    view = optimizer_view(trainer.optimizer, model)
    assert set(view) == {n for n, _ in model.named_parameters()}
    expected = expected_backbone_lr(model)
    layers = len(set(expected.values()))
    assert layers == {"cnn": 5, "vit": 7}[kind]
    for name, group in view.items():
        want = expected[name] if name.startswith("backbone.") else LR * HEAD_SCALE
        assert group["lr"] == pytest.approx(want * factor, rel=1e-9), name
        assert group["initial_lr"] == pytest.approx(want, rel=1e-9), name
    # The top backbone layer is one decay step below the heads, the stem `layers` steps below.
    lrs = sorted({round(g["initial_lr"] / LR, 12) for n, g in view.items() if n.startswith("backbone.")})
    assert lrs == pytest.approx([DECAY ** k for k in range(layers, 0, -1)])


def test_lrs_after_a_real_training_step_with_a_constant_schedule(tmp_path):
    model = make_model("vit")
    trainer = make_trainer(model, tmp_path, lr_scheduler_type="constant", max_steps=1)
    trainer.train()
    expected = expected_backbone_lr(model)
    for name, group in optimizer_view(trainer.optimizer, model).items():
        assert group["lr"] == pytest.approx(expected.get(name, LR * HEAD_SCALE), rel=1e-9), name


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_weight_decay_skips_norms_biases_and_no_weight_decay_names(kind, tmp_path):
    model = make_model(kind)
    view = optimizer_view(make_trainer(model, tmp_path).create_optimizer(), model)
    norm_types = (nn.BatchNorm2d, nn.LayerNorm)
    norm_params = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, norm_types) for p, _ in mod.named_parameters()}
    assert norm_params
    for name, param in model.named_parameters():
        no_decay = name.endswith(".bias") or name in norm_params or name in ("backbone.cls_token", "backbone.pos_embed")
        assert view[name]["weight_decay"] == (0.0 if no_decay else WD), name
        assert no_decay == (param.ndim <= 1 or name in ("backbone.cls_token", "backbone.pos_embed")), name


def test_frozen_parameters_are_absent_from_the_optimizer(tmp_path):
    model = make_model("cnn")
    trainer = make_trainer(model, tmp_path, transfer_strategy="partial", trainable_groups=1)
    view = optimizer_view(trainer.create_optimizer(), model)
    top = backbone_groups(model)[-1].names
    assert set(view) == {f"backbone.{n}" for n in top} | {n for n, _ in model.heads.named_parameters(prefix="heads")}
    assert all(p.requires_grad for n, p in model.named_parameters() if n in view)

    model = make_model("vit")
    view = optimizer_view(make_trainer(model, tmp_path, transfer_strategy="feature_extraction").create_optimizer(), model)
    assert set(view) == {n for n, _ in model.heads.named_parameters(prefix="heads")}


def test_without_layer_decay_all_backbone_layers_share_the_base_lr(tmp_path):
    model = make_model("cnn")
    view = optimizer_view(make_trainer(model, tmp_path, layer_decay=None).create_optimizer(), model)
    assert {g["lr"] for n, g in view.items() if n.startswith("backbone.")} == {LR}
    assert {g["lr"] for n, g in view.items() if n.startswith("heads.")} == {LR * HEAD_SCALE}


def test_optim_argument_still_chooses_the_optimizer_class(tmp_path):
    model = make_model("cnn")
    optimizer = make_trainer(model, tmp_path, optim="sgd").create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert len({round(g["lr"], 12) for g in optimizer.param_groups}) == 6  # 5 backbone layers + heads


def test_learnable_balancer_parameters_join_the_optimizer(tmp_path):
    model = make_model("cnn")
    trainer = make_trainer(model, tmp_path, loss_balancing="uncertainty")
    balancer_params = [p for p in trainer.balancer.parameters() if p.requires_grad]
    if not balancer_params:
        pytest.skip("the 'uncertainty' balancer registers no learnable parameters")
    optimizer = trainer.create_optimizer()
    held = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held and held[id(p)]["weight_decay"] == 0.0 for p in balancer_params)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(held)  # nothing twice


def test_extra_params_get_base_lr_without_decay():
    model = make_model("cnn")
    extra = nn.Parameter(torch.zeros(3))
    head_weight = model.heads["c"].fc.weight
    groups = layer_decay_param_groups(model, LR, WD, DECAY, extra_params=[extra, extra, head_weight])
    extra_groups = [g for g in groups if g["param_kind"] == "extra"]
    assert len(extra_groups) == 1 and extra_groups[0]["params"] == [extra]
    assert (extra_groups[0]["lr"], extra_groups[0]["weight_decay"]) == (LR, 0.0)
    assert sum(p is head_weight for g in groups for p in g["params"]) == 1


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_layer_decay_outside_zero_one(bad):
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        MultiTaskTrainingArguments(output_dir="unused", layer_decay=bad)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        layer_decay_param_groups(make_model("cnn"), LR, WD, bad)
    assert MultiTaskTrainingArguments(output_dir="unused", layer_decay=1.0).layer_decay == 1.0
