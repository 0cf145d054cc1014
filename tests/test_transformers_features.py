"""The transformers features README lists as working, each checked here on the tiny timm test models.

dtype, device_map, sharded safetensors, torch.compile, gradient checkpointing, hidden states; plus
the forward contract that transformers' tooling relies on (``return_dict``, ``output_attentions``,
``labels``) and the meta-device / bare-config paths. transformers' own common tests run in
``test_transformers_conformance.py``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import unittest.mock

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_tlmtl import TaskSpec, TimmMultiTaskConfig, TimmMultiTaskModel
from hf_tlmtl.tasks import RESERVED_NAMES

TASKS = [
    TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart"]),
    TaskSpec(name="scale", type="regression"),
]
VIT = {"img_size": 32}


def bare_model(backbone="test_resnet", **timm_kwargs) -> TimmMultiTaskModel:
    torch.manual_seed(0)
    return TimmMultiTaskModel(TimmMultiTaskConfig(backbone=backbone, timm_kwargs=timm_kwargs, tasks=TASKS))


def pixels(n=2, size=32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def labels(n=2) -> dict[str, torch.Tensor]:
    return {"shape": torch.arange(n) % 3, "scale": torch.linspace(0, 1, n)}


# --------------------------------------------------------------------------- forward contract
def test_return_dict_false_gives_the_non_none_fields_in_order():
    model = bare_model().eval()
    out = model(pixels(), **labels())
    loss, logits, task_losses, pooled = model(pixels(), **labels(), return_dict=False)
    torch.testing.assert_close(loss, out.loss)
    assert list(logits) == ["shape", "scale"] and list(task_losses) == ["shape", "scale"]
    torch.testing.assert_close(pooled, out.pooled)
    logits, pooled, hidden = model(pixels(), return_dict=False, output_hidden_states=True)
    assert isinstance(logits, dict) and pooled.dim() == 2 and len(hidden) == 5
    model.config.return_dict = False  # the config's default, as every transformers model honours it
    assert isinstance(model(pixels()), tuple)


def test_labels_can_come_as_a_dict_by_task_name():
    model = bare_model().eval()
    torch.testing.assert_close(model(pixels(), labels=labels()).loss, model(pixels(), **labels()).loss)
    with pytest.raises(ValueError, match=r"labels must map task names to targets.*shape=y"):
        model(pixels(), labels=torch.zeros(2))


def test_output_attentions_is_refused_clearly():
    with pytest.raises(ValueError, match="do not return attention weights.*output_attentions=False"):
        bare_model()(pixels(), output_attentions=True)


def test_every_forward_keyword_is_a_reserved_task_name():
    params = inspect.signature(TimmMultiTaskModel.forward).parameters.values()
    named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"self"}
    assert named <= RESERVED_NAMES
    for name in ("pixel_values", "features", "labels", "return_dict", "output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=rf"keyword argument of TimmMultiTaskModel.forward.*name='{name}_task', column='{name}'"):
            TaskSpec(name=name, type="regression")


# ------------------------------------------------------------------------------ hidden states
@pytest.mark.parametrize("backbone,kwargs,shapes", [
    ("test_resnet", {}, [(32, 16, 16), (32, 8, 8), (48, 4, 4), (192, 2, 2), (96, 1, 1)]),
    ("test_vit", VIT, [(64, 2, 2)] * 6),
])
def test_hidden_states_are_the_stage_features_and_leave_the_outputs_unchanged(backbone, kwargs, shapes):
    model = bare_model(backbone, **kwargs).eval()
    plain = model(pixels())
    out = model(pixels(), output_hidden_states=True)
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == shapes
    torch.testing.assert_close(out.pooled, plain.pooled)
    for task in plain.logits:
        torch.testing.assert_close(out.logits[task], plain.logits[task])
    chosen = model(pixels(), output_hidden_states=[0, -1]).hidden_states
    torch.testing.assert_close(chosen[0], out.hidden_states[0])
    torch.testing.assert_close(chosen[1], out.hidden_states[-1])


def test_hidden_states_of_a_truncated_model_stop_at_the_kept_stage():
    config = TimmMultiTaskConfig(backbone="test_resnet", tasks=TASKS, truncate_stage=2)
    model = TimmMultiTaskModel(config).eval()
    hidden = model(pixels(), output_hidden_states=True).hidden_states
    assert [tuple(h.shape[1:]) for h in hidden] == [(32, 16, 16), (32, 8, 8), (48, 4, 4)]
    with pytest.raises(ValueError, match=r"indices \[3\] are out of range; the backbone has 3 stages"):
        model(pixels(), output_hidden_states=[3])
    with pytest.raises(ValueError, match="features= are already pooled"):
        model(features=torch.zeros(2, 48), output_hidden_states=True)


# ------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_take_fp32_pixels(tmp_path, dtype):
    bare_model("test_vit", **VIT).save_pretrained(tmp_path)
    model = TimmMultiTaskModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert model.dtype == dtype
    out = model(pixels(), **labels())  # fp32 images, as an image processor gives them
    assert out.logits["shape"].dtype == dtype and torch.isfinite(out.loss)
    resnet = bare_model().to(dtype).eval()
    assert resnet(pixels()).pooled.dtype == dtype


# ------------------------------------------------------------------ device_map, sharded weights
@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loads(tmp_path, device_map):
    model = bare_model().eval()
    model.save_pretrained(tmp_path)
    loaded = TimmMultiTaskModel.from_pretrained(tmp_path, device_map=device_map).eval()
    assert loaded.device.type == "cpu"
    torch.testing.assert_close(loaded(pixels()).logits["shape"], model(pixels()).logits["shape"])


def test_disk_offloaded_model_runs(tmp_path):
    model = bare_model().eval()
    model.save_pretrained(tmp_path / "model")
    loaded = TimmMultiTaskModel.from_pretrained(tmp_path / "model", device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    assert loaded.device.type == "meta"  # accelerate's hooks bring the weights in; the inputs stay where they are
    torch.testing.assert_close(loaded.eval()(pixels()).logits["shape"], model(pixels()).logits["shape"])


def test_attn_implementation_sdpa_is_accepted(tmp_path):
    bare_model("test_vit", **VIT).save_pretrained(tmp_path)
    loaded = TimmMultiTaskModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert loaded.config._attn_implementation == "sdpa"  # timm's attention uses F.scaled_dot_product_attention


def test_sharded_safetensors_round_trip(tmp_path):
    model = bare_model().eval()
    model.save_pretrained(tmp_path, max_shard_size="500KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------ torch.compile
def test_torch_compile_traces_the_whole_forward():
    # aot_eager traces like inductor without its minute of C++ codegen; inductor itself was checked by hand (README).
    model = bare_model().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected, got = model(pixels()).logits, compiled(pixels()).logits
    for task in expected:
        torch.testing.assert_close(got[task], expected[task])
    torch._dynamo.reset()


def test_torch_compile_trains():
    model = bare_model().train()
    compiled = torch.compile(model, backend="aot_eager")  # graph breaks at the label checks, not failures
    compiled(pixels(), **labels()).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


# ---------------------------------------------------------------------- gradient checkpointing
def _grads(model: TimmMultiTaskModel) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model(pixels(), **labels()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone,kwargs", [("test_resnet", {}), ("test_vit", VIT)])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_the_transformers_way(backbone, kwargs, use_reentrant):
    model = bare_model(backbone, **kwargs).train()
    reference = _grads(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_activation_checkpointing and model.backbone.grad_checkpointing
    real_checkpoint = torch.utils.checkpoint.checkpoint
    with unittest.mock.patch("torch.utils.checkpoint.checkpoint", side_effect=real_checkpoint) as timm_calls:
        checkpointed = _grads(model)
    assert timm_calls.call_count > 1  # timm checkpointed its blocks ...
    assert {c.kwargs["use_reentrant"] for c in timm_calls.call_args_list} == {use_reentrant}  # ... as asked
    assert timm.layers.use_reentrant_ckpt() is False  # and timm's process-wide default is back
    assert set(checkpointed) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not model.backbone.grad_checkpointing


@pytest.mark.parametrize("strategy", ["feature_extraction", "partial"])
def test_reentrant_checkpointing_trains_whatever_is_trainable_above_frozen_layers(strategy):
    from hf_tlmtl.transfer import apply_transfer_strategy

    model = bare_model()
    apply_transfer_strategy(model, strategy, **({"trainable_groups": 1} if strategy == "partial" else {}))
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model(pixels(), **labels()).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    model.zero_grad()
    model(features=model.forward_features(pixels()).detach(), **labels()).loss.backward()  # cached features
    assert all(p.grad is not None for p in model.heads.parameters())


def test_gradient_checkpointing_from_the_config():
    config = TimmMultiTaskConfig(backbone="test_resnet", tasks=TASKS)
    config.gradient_checkpointing = True  # what older configs set
    assert TimmMultiTaskModel(config).is_activation_checkpointing


def test_trainer_gradient_checkpointing_flag(tmp_path):
    from fake_data import random_task_dataset

    from hf_tlmtl.data import MultiTaskCollator

    tasks = [TaskSpec(name="c", type="classification", num_labels=3), TaskSpec(name="y", type="regression")]
    model = TimmMultiTaskModel(TimmMultiTaskConfig(backbone="test_resnet", tasks=tasks))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, label_names=["c", "y"], remove_unused_columns=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=random_task_dataset(8),
                                   data_collator=MultiTaskCollator(tasks))
    trainer.train()
    assert model.is_activation_checkpointing and model.backbone.grad_checkpointing
    assert model._checkpoint_use_reentrant is True


# ----------------------------------------------------------------- initialisation, bare configs
def test_a_fresh_model_keeps_timms_own_backbone_initialisation():
    model = bare_model()  # post_init runs _init_weights on every module: it must only touch the heads
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", num_classes=0)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_meta_device_init_gives_sane_batchnorm_statistics():
    config = TimmMultiTaskConfig(backbone="test_resnet", tasks=TASKS)
    with torch.device("meta"):
        model = TimmMultiTaskModel(config)
    model.to_empty(device="cpu")
    model.init_weights()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_a_checkpoint_without_batchnorm_statistics_loads_finite(tmp_path):
    model = bare_model()
    model.train()(pixels(4))  # the running statistics move away from 0 / 1
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "running_" not in k}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = TimmMultiTaskModel.from_pretrained(tmp_path).eval()
    bn = loaded.backbone.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert torch.equal(bn.weight, model.backbone.bn1.weight)  # what the checkpoint had stays
    assert torch.isfinite(loaded(pixels()).logits["shape"]).all()


def test_a_bare_config_model_saves_with_timms_data_config(tmp_path):
    model = TimmMultiTaskModel(TimmMultiTaskConfig(backbone="test_vit", timm_kwargs=VIT, tasks=TASKS))
    assert model.config.data_config["input_size"] == [3, 32, 32] and model.config.data_config["mean"]
    model.save_pretrained(tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.data_config["input_size"] == (3, 32, 32)


def test_base_model_is_the_model_itself():
    model = bare_model()
    assert model.base_model is model and model.base_model_prefix not in dict(model.named_children())


# ------------------------------------------------------------------- loading without the import
def test_config_json_and_the_error_without_import_say_what_to_do(tmp_path):
    bare_model().save_pretrained(tmp_path)
    assert "pip install hf_tlmtl; import hf_tlmtl" in json.loads((tmp_path / "config.json").read_text())["how_to_load"]
    code = f"import transformers; transformers.AutoModel.from_pretrained({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0  # transformers' own message, quoted in README and the model card
    assert "model type `timm_multitask` but Transformers does not recognize this architecture" in done.stderr


def test_missing_backbone_weights_are_an_error_unless_the_loading_info_is_asked_for(tmp_path):
    bare_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("backbone.conv1")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="backbone weights are missing"):
        TimmMultiTaskModel.from_pretrained(tmp_path)
    model, info = TimmMultiTaskModel.from_pretrained(tmp_path, output_loading_info=True)  # the caller inspects
    assert {k for k in info["missing_keys"] if k.startswith("backbone.conv1")} and isinstance(model, TimmMultiTaskModel)
