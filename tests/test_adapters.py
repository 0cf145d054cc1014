"""PEFT adapters on timm backbones (CNN, ViT, ConvNeXt): what trains, what a real Trainer step changes,
save / load / switch / merge round trips, checkpoint resume, and the errors for bad input."""

from __future__ import annotations

import logging
import os

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from timm.layers.norm_act import FrozenBatchNorm2d
from torch import nn

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.adapters import METHODS, apply_lora, auto_target_modules, load_adapter, merge_adapter, unsharded_copy
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from fake_data import random_task_dataset

IMAGE = 32
TASKS = [TaskSpec(name="c", type="classification", num_labels=3), TaskSpec(name="y", type="regression")]
FAMILIES = {
    # zero_init_last=False: timm zero-inits each block's last BatchNorm, which blocks every gradient into the
    # block's convolutions of a randomly initialised ResNet (pretrained weights do not have that).
    "cnn": ("test_resnet", {"zero_init_last": False}),
    "vit": ("test_vit", {"img_size": IMAGE}),
    # ls_init_value=1: blocks contribute at full scale (timm's 1e-6 default makes adapters nearly invisible).
    "convnext": ("test_convnext", {"ls_init_value": 1.0}),
}
ADAPTER_MARKS = ("lora_", "hada_", "lokr_", "ia3_")



def make_model(kind: str, seed: int = 0) -> TimmMultiTaskModel:
    name, kwargs = FAMILIES[kind]
    torch.manual_seed(seed)
    return TimmMultiTaskModel.from_backbone(name, TASKS, **kwargs)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    model.eval()
    return model(pixel_values=images()).logits


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor (active adapter and its heads) away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def is_adapter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_MARKS)



def training_args(out, steps: int, **kwargs) -> MultiTaskTrainingArguments:
    defaults = dict(
        output_dir=str(out), report_to="none", disable_tqdm=True, use_cpu=True, per_device_train_batch_size=8,
        max_steps=steps, learning_rate=1e-2, save_strategy="no", lr_scheduler_type="constant", seed=0,
        transfer_strategy="lora", lora_r=4, lora_alpha=8,
    )
    return MultiTaskTrainingArguments(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------- auto
def test_auto_picks_the_right_layers_per_family(caplog):
    caplog.set_level(logging.INFO, logger="hf_tlmtl.adapters")
    cnn, vit, convnext = (make_model(k) for k in ("cnn", "vit", "convnext"))
    modules = {k: dict(m.named_modules()) for k, m in (("cnn", cnn), ("vit", vit), ("convnext", convnext))}

    picked = auto_target_modules(cnn)  # ResNet: the ungrouped spatial convolutions, no 1x1 / downsample
    assert picked and all(modules["cnn"][n].kernel_size == (3, 3) and modules["cnn"][n].groups == 1 for n in picked)
    assert "backbone.layer1.0.conv1" in picked and "backbone.layer3.0.conv1" not in picked  # 1x1 left out

    picked = auto_target_modules(vit)  # ViT: attention and MLP Linear layers, not the patch embedding
    assert len(picked) == 6 * 4 and {n.rsplit(".", 1)[1] for n in picked} == {"qkv", "proj", "fc1", "fc2"}
    assert "backbone.patch_embed.proj" not in picked

    picked = auto_target_modules(convnext)  # ConvNeXt: pointwise MLP Linear layers, never depthwise conv_dw
    assert picked and all(isinstance(modules["convnext"][n], nn.Linear) for n in picked)
    assert not any("conv_dw" in n for n in picked)

    caplog.clear()
    vit_targets = auto_target_modules(vit)
    peft_model = apply_lora(vit, r=4)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(vit_targets)
    assert auto_target_modules(peft_model) == vit_targets  # a second adapter gets the same layers
    assert "24 attention and MLP Linear layers (fc1, fc2, proj, qkv)" in caplog.text
    assert "patch_embed.proj" in caplog.text  # what was left out is said too


# ---------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("kind", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["lora", "loha"])
def test_only_adapter_and_head_parameters_require_grad(kind, method):
    peft_model = apply_lora(make_model(kind), r=4, alpha=8, method=method)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if is_adapter(n)}
    heads = trainable - adapters
    assert adapters and all(".heads." in n and ".modules_to_save.default." in n for n in heads)
    assert {n.split(".heads.")[1].split(".")[0] for n in heads} == {"c", "y"}  # both heads train fully
    head_params = sum(p.numel() for p in peft_model.get_base_model().heads.parameters()) // 2  # original + copy
    assert sum(p.numel() for n, p in peft_model.named_parameters() if n in heads) == head_params
    if kind == "cnn":  # BatchNorm statistics belong to the frozen base
        assert not any(isinstance(m, nn.BatchNorm2d) for m in peft_model.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in peft_model.modules())


def test_an_adapter_for_a_subset_of_tasks_trains_only_those_heads():
    peft_model = apply_lora(make_model("vit"), r=4, tasks=["y"])
    heads = {n.split(".heads.")[1].split(".")[0] for n, p in peft_model.named_parameters() if p.requires_grad and ".heads." in n}
    assert heads == {"y"}
    with pytest.raises(ValueError, match=r"pick one or more of this model's tasks \['c', 'y'\]"):
        apply_lora(make_model("vit"), tasks=["size"])


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_trainer_step_changes_adapters_and_heads_and_leaves_the_base_bit_identical(kind, tmp_path):
    trainer = MultiTaskTrainer(model=make_model(kind), args=training_args(tmp_path, steps=2), train_dataset=random_task_dataset(16, IMAGE))
    assert isinstance(trainer.model, peft.PeftModel)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    trained = {k for k in before if is_adapter(k) or ".modules_to_save." in k}
    assert any(is_adapter(k) for k in trained) and any(".modules_to_save." in k for k in trained)
    unchanged_trained = [k for k in trained if torch.equal(before[k], after[k])]
    assert not unchanged_trained, unchanged_trained  # 2 steps: LoRA's B moves first, then A
    changed_base = [k for k in before if k not in trained and not torch.equal(before[k], after[k])]
    assert not changed_base, changed_base  # weights, BatchNorm statistics and the original heads alike


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind,method", [("cnn", "lora"), ("vit", "lora"), ("convnext", "lora"), ("vit", "ia3")])
def test_saved_adapter_loads_onto_a_fresh_base_with_identical_outputs(kind, method, tmp_path):
    peft_model = apply_lora(make_model(kind), r=4, alpha=8, method=method)
    perturb(peft_model, seed=1)
    expected = outputs(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert not any(f.startswith("model") for f in os.listdir(tmp_path))  # the base is not saved

    loaded = load_adapter(make_model(kind), tmp_path)
    got = outputs(loaded)
    for task in expected:
        assert torch.equal(got[task], expected[task]), task
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default


def test_adapter_file_is_a_small_fraction_of_the_model_file(tmp_path):
    model = make_model("vit")
    model.save_pretrained(tmp_path / "full")
    peft_model = apply_lora(model, r=4, alpha=8)
    peft_model.save_pretrained(tmp_path / "adapter")
    full = os.path.getsize(tmp_path / "full" / "model.safetensors")
    adapter = os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")
    print(f"test_vit: model.safetensors {full:,} B, LoRA r=4 adapter_model.safetensors {adapter:,} B ({adapter / full:.1%})")
    assert adapter < 0.10 * full, (adapter, full)


# ----------------------------------------------------------------------- named adapters
@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_two_named_adapters_differ_and_switching_back_restores_the_first(kind, tmp_path):
    peft_model = apply_lora(make_model(kind), r=4, alpha=8, adapter_name="first")
    perturb(peft_model, seed=1)
    first = outputs(peft_model)

    apply_lora(peft_model, r=4, alpha=8, adapter_name="second")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".second" in n for n in trainable)  # only the new adapter and its heads
    perturb(peft_model, seed=2)
    second = outputs(peft_model)
    assert not torch.allclose(second["c"], first["c"]) and not torch.allclose(second["y"], first["y"])

    peft_model.set_adapter("first")
    for task, value in outputs(peft_model).items():
        assert torch.equal(value, first[task])

    # Both saved (peft writes DIR/<name>), both loaded onto one fresh base, switching gives each one back.
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(make_model(kind), tmp_path / "first", adapter_name="first")
    load_adapter(loaded, tmp_path / "second", adapter_name="second")
    assert loaded.active_adapter == "second"
    assert torch.equal(outputs(loaded)["c"], second["c"])
    loaded.set_adapter("first")
    assert torch.equal(outputs(loaded)["c"], first["c"])


# -------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind,method", [("cnn", "lora"), ("vit", "lora"), ("convnext", "lora"), ("cnn", "lokr")])
def test_merged_model_matches_the_adapted_one_and_reloads_through_automodel(kind, method, tmp_path):
    peft_model = apply_lora(make_model(kind), r=4, alpha=8, method=method)
    perturb(peft_model, seed=1)
    adapted = outputs(peft_model)

    merged = merge_adapter(peft_model)
    assert type(merged) is TimmMultiTaskModel
    assert not any(is_adapter(n) or "modules_to_save" in n or "base_layer" in n for n in merged.state_dict())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in merged.modules())
    got = outputs(merged)
    for task in adapted:
        torch.testing.assert_close(got[task], adapted[task], rtol=1e-4, atol=1e-5)

    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is TimmMultiTaskModel
    for task, value in outputs(reloaded).items():
        torch.testing.assert_close(value, got[task], rtol=0, atol=1e-6)


def test_peft_merge_and_unload_gives_a_plain_model():
    peft_model = apply_lora(make_model("vit"), r=4, alpha=8)
    perturb(peft_model, seed=1)
    adapted = outputs(peft_model)
    plain = peft_model.merge_and_unload()
    assert type(plain) is TimmMultiTaskModel
    assert set(plain.state_dict()) == set(make_model("vit").state_dict())  # heads.<task>.* keys again
    torch.testing.assert_close(outputs(plain)["c"], adapted["c"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ unsharded copy
@pytest.mark.parametrize("kind,method", [("cnn", "lora"), ("vit", "loha")])
def test_unsharded_copy_holds_the_given_weights_and_every_adapter(kind, method, tmp_path):
    # What recipes/finetune.py does with FSDP2's gathered weights (the 2-process run: test_recipe_fsdp_lora.py).
    peft_model = apply_lora(make_model(kind), r=4, alpha=8, method=method, adapter_name="first")
    apply_lora(peft_model, r=4, alpha=8, method=method, adapter_name="second")
    perturb(peft_model, seed=1)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    rng = torch.get_rng_state()
    copied = unsharded_copy(peft_model, state)
    assert torch.equal(torch.get_rng_state(), rng)  # building the copy does not shift the run's random stream
    assert copied.active_adapter == "second" and sorted(copied.peft_config) == ["first", "second"]
    assert copied.state_dict().keys() == state.keys()
    assert all(torch.equal(copied.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(v, outputs(peft_model)[t]) for t, v in outputs(copied).items())
    # It saves the adapters peft_model saves, and merges into the model peft_model merges into.
    copied.save_pretrained(tmp_path / "copy")
    peft_model.save_pretrained(tmp_path / "own")
    for name in ("first", "second"):
        a = load_file(tmp_path / "copy" / name / "adapter_model.safetensors")
        b = load_file(tmp_path / "own" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged, own = merge_adapter(copied).state_dict(), merge_adapter(peft_model).state_dict()
    assert merged.keys() == own.keys() and all(torch.equal(merged[k], own[k]) for k in own)


def test_unsharded_copy_refuses_a_state_dict_of_another_model():
    peft_model = apply_lora(make_model("vit"), r=4, alpha=8)
    state = apply_lora(make_model("vit"), r=8, alpha=8, target_modules="qkv").state_dict()
    with pytest.raises(ValueError, match="does not fit a copy of this peft model: .* missing"):
        unsharded_copy(peft_model, state)


# ------------------------------------------------------------------------------- trainer
def test_trainer_checkpoints_adapters_and_resumes_like_an_uninterrupted_run(tmp_path):
    kwargs = dict(save_strategy="steps", save_steps=2, adapter_name="shapes")
    straight = MultiTaskTrainer(
        model=make_model("cnn"), args=training_args(tmp_path / "a", steps=4, **kwargs), train_dataset=random_task_dataset(8, IMAGE)
    )
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(checkpoint / "shapes"))  # peft saves a named adapter in its own folder
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not (checkpoint / "model.safetensors").exists()

    resumed = MultiTaskTrainer(
        model=make_model("cnn"), args=training_args(tmp_path / "b", steps=4, **kwargs), train_dataset=random_task_dataset(8, IMAGE)
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert resumed.model.active_adapter == "shapes"


def test_trainer_adds_a_second_named_adapter_to_a_peft_model(tmp_path):
    first = MultiTaskTrainer(model=make_model("vit"), args=training_args(tmp_path, steps=1, adapter_name="shapes"))
    second = MultiTaskTrainer(model=first.model, args=training_args(tmp_path, steps=1, adapter_name="colors"))
    assert second.model is first.model and sorted(second.model.peft_config) == ["colors", "shapes"]
    assert second.model.active_adapter == "colors"
    trainable = [n for n, p in second.model.named_parameters() if p.requires_grad]
    assert trainable and all(".colors." in n or n.endswith(".colors") for n in trainable)
    third = MultiTaskTrainer(model=first.model, args=training_args(tmp_path, steps=1, adapter_name="shapes"))
    assert third.model.active_adapter == "shapes" and sorted(third.model.peft_config) == ["colors", "shapes"]


# ----------------------------------------------------------------------------- bad input
def test_target_modules_matching_nothing_lists_what_exists():
    with pytest.raises(ValueError) as err:
        apply_lora(make_model("vit"), target_modules=["query", "value"])
    message = str(err.value)
    assert "['query', 'value']" in message and "test_vit" in message
    assert "blocks.0.attn.qkv (Linear)" in message and "'fc1'" in message
    with pytest.raises(ValueError, match="matches no Linear/Conv2d layer"):
        MultiTaskTrainer(model=make_model("cnn"), args=training_args("unused", steps=1, lora_target_modules="qkv"))


def test_explicit_targets_names_suffixes_and_regex():
    model = make_model("vit")
    peft_model = apply_lora(model, r=2, target_modules="qkv,fc2")
    assert len(peft_model.peft_config["default"].target_modules) == 12
    model = make_model("vit")
    peft_model = apply_lora(model, r=2, target_modules=r"blocks\.5\..*")  # regex over backbone-relative names
    assert sorted(peft_model.peft_config["default"].target_modules) == [
        "backbone.blocks.5.attn.proj", "backbone.blocks.5.attn.qkv", "backbone.blocks.5.mlp.fc1", "backbone.blocks.5.mlp.fc2",
    ]


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        apply_lora(make_model("cnn"), method="adalora2")
    assert all(method in str(err.value) for method in METHODS)
    with pytest.raises(ValueError, match="valid methods"):
        MultiTaskTrainer(model=make_model("cnn"), args=training_args("unused", steps=1, lora_method="dora?"))


def test_lora_on_a_depthwise_conv_needs_a_divisible_rank():
    with pytest.raises(ValueError, match="grouped convolution .*groups=24.*r divisible by 24"):
        apply_lora(make_model("convnext"), r=4, target_modules="stages.0.blocks.0.conv_dw")


def test_adapter_on_a_different_backbone_names_both(tmp_path):
    make_model("vit").save_pretrained(tmp_path / "base")
    base = TimmMultiTaskModel.from_pretrained(tmp_path / "base")  # records where the base lives
    apply_lora(base, r=4).save_pretrained(tmp_path / "adapter")
    target = make_model("cnn")
    with pytest.raises(ValueError) as err:
        load_adapter(target, tmp_path / "adapter")
    assert "'test_vit'" in str(err.value) and "'test_resnet'" in str(err.value)
    assert not any(is_adapter(n) for n, _ in target.named_modules())  # refused before touching the model


def test_adapter_on_the_same_family_with_another_width_is_refused(tmp_path):
    torch.manual_seed(0)
    apply_lora(TimmMultiTaskModel.from_backbone("test_vit2", TASKS, img_size=IMAGE), r=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"differs from this model's backbone 'test_vit'.*shapes"):
        load_adapter(make_model("vit"), tmp_path)


def test_adapter_for_other_tasks_is_refused(tmp_path):
    apply_lora(make_model("vit"), r=4).save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="c", type="classification", num_labels=5),
                                                          TaskSpec(name="y", type="regression")], img_size=IMAGE)
    with pytest.raises(ValueError, match="other heads than this model's tasks"):
        load_adapter(other, tmp_path)


def test_duplicate_adapter_name_and_mixed_methods_are_refused():
    peft_model = apply_lora(make_model("cnn"), r=4, adapter_name="shapes")
    with pytest.raises(ValueError, match="already has an adapter named 'shapes'"):
        apply_lora(peft_model, r=4, adapter_name="shapes")
    with pytest.raises(ValueError, match="peft combines adapters of one method only"):
        apply_lora(peft_model, r=4, adapter_name="colors", method="loha")


def test_unwrap_unwraps_the_peft_wrapper():
    from hf_tlmtl.backbone import unwrap
    from hf_tlmtl.transfer import base_model  # its name before it moved to the backbone floor

    assert base_model is unwrap
    model = make_model("vit")
    peft_model = apply_lora(model, r=2, alpha=4)
    assert unwrap(peft_model) is model and type(unwrap(peft_model)) is TimmMultiTaskModel


def test_summary_counts_each_head_once_under_lora():
    from hf_tlmtl.transfer import apply_transfer_strategy

    model = make_model("cnn")
    before = sum(p.numel() for p in model.parameters())
    summary = apply_transfer_strategy(model, "lora", r=2, alpha=4)
    adapter = sum(p.numel() for n, p in summary.model.named_parameters() if is_adapter(n))
    assert adapter > 0 and summary.total_params == before + adapter  # peft's frozen head copies not counted twice
    heads = sum(p.numel() for p in model.heads.parameters()) // 2  # wrapper holds original + trained copy
    assert summary.trainable_params == adapter + heads


def test_training_arguments_check_the_peft_method_early_and_pass_dropout(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown lora_method 'magic'; valid methods: \['ia3', 'loha', 'lokr', 'lora'\]"):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), transfer_strategy="lora", lora_method="magic", report_to="none")
    args = training_args(tmp_path, steps=1, transfer_strategy="lora", lora_r=2, lora_dropout=0.25)
    trainer = MultiTaskTrainer(model=make_model("vit"), args=args)
    assert trainer.model.peft_config[args.adapter_name].lora_dropout == 0.25
