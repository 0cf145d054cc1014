import json

import pytest
import timm
import torch
import transformers

import hf_tlmtl
from hf_tlmtl import TaskSpec, TimmMultiTaskConfig, TimmMultiTaskModel

TASKS = [
    TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart"]),
    TaskSpec(name="scale", type="regression", weight=2.0),
    TaskSpec(name="attrs", type="multilabel", labels=["red", "big"], weight=0.5),
]
BACKBONES = {
    "test_resnet": {},
    "test_vit": {"img_size": 32},
    "test_convnext": {},
}


def make_model(name="test_resnet", tasks=TASKS, **kwargs):
    torch.manual_seed(0)
    return TimmMultiTaskModel.from_backbone(name, tasks=tasks, pretrained=False, **{**BACKBONES.get(name, {}), **kwargs})


def batch(n=4, size=32):
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
        "shape": torch.tensor([0, 1, 2, 1])[:n],
        "scale": torch.tensor([0.1, 0.5, 0.9, 0.3])[:n],
        "attrs": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])[:n],
    }


@pytest.mark.parametrize("name", list(BACKBONES))
def test_per_task_logit_shapes(name):
    model = make_model(name).eval()
    out = model(pixel_values=batch()["pixel_values"])
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {"shape": (4, 3), "scale": (4, 1), "attrs": (4, 2)}
    assert out.pooled.shape == (4, model.head_in_features)
    assert out.loss is None and out.task_losses is None


def test_loss_is_weighted_sum_of_task_losses():
    model = make_model().eval()
    out = model(**batch())
    logits = out.logits
    expected = {
        "shape": torch.nn.functional.cross_entropy(logits["shape"], batch()["shape"]),
        "scale": torch.nn.functional.mse_loss(logits["scale"].squeeze(1), batch()["scale"]),
        "attrs": torch.nn.functional.binary_cross_entropy_with_logits(logits["attrs"], batch()["attrs"]),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.task_losses[name], value)
    torch.testing.assert_close(out.loss, 1.0 * expected["shape"] + 2.0 * expected["scale"] + 0.5 * expected["attrs"])


def test_missing_labels_are_masked_and_all_missing_batch_is_zero():
    model = make_model().eval()
    b = batch()
    b["shape"] = torch.tensor([0, -100, -100, 1])
    b["scale"] = torch.tensor([float("nan")] * 4)
    out = model(**b)
    torch.testing.assert_close(
        out.task_losses["shape"], torch.nn.functional.cross_entropy(out.logits["shape"][[0, 3]], torch.tensor([0, 1]))
    )
    assert out.task_losses["scale"].item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.count_nonzero(model.heads["scale"].fc.weight.grad) == 0
    assert torch.count_nonzero(model.heads["shape"].fc.weight.grad) > 0


def test_only_some_tasks_labelled():
    model = make_model().eval()
    b = batch()
    out = model(pixel_values=b["pixel_values"], scale=b["scale"])
    assert set(out.task_losses) == {"scale"}
    torch.testing.assert_close(out.loss, 2.0 * out.task_losses["scale"])


@pytest.mark.parametrize("name", list(BACKBONES) + ["test_vit_relpos"])
def test_save_then_automodel_gives_same_outputs(tmp_path, name):
    kwargs = {"img_size": 32} if name == "test_vit_relpos" else {}
    model = make_model(name, **kwargs).eval()
    x = batch()["pixel_values"]
    expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, TimmMultiTaskModel)
    got = reloaded(pixel_values=x).logits
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_config_json_round_trip(tmp_path):
    model = make_model("test_vit", head_hidden_size=16, head_dropout=0.1)
    model.config.save_pretrained(tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TimmMultiTaskConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    assert json.loads(loaded.to_json_string()) == json.loads(model.config.to_json_string())
    assert [t.to_dict() for t in loaded.task_specs] == [t.to_dict() for t in TASKS]
    assert loaded.data_config["input_size"] == [3, 32, 32]
    assert loaded.timm_kwargs == {"img_size": 32}


def test_reheading_keeps_backbone_and_matching_heads(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    new_tasks = [
        TASKS[0],  # same name and size: kept
        TaskSpec(name="scale", type="regression", num_labels=2),  # size changed: fresh
        TaskSpec(name="age", type="regression"),  # new: fresh
    ]
    reheaded = TimmMultiTaskModel.from_pretrained(tmp_path, tasks=new_tasks)
    assert reheaded.task_names == ["shape", "scale", "age"]
    assert reheaded.reused_heads == ["shape"] and reheaded.new_heads == ["scale", "age"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(reheaded.backbone.state_dict()[key], value), key
    for key, value in model.heads["shape"].state_dict().items():
        assert torch.equal(reheaded.heads["shape"].state_dict()[key], value)
    assert reheaded.heads["scale"].fc.weight.shape == (2, model.head_in_features)
    for name in ("scale", "age"):  # initialised like new heads (trunc-normal 0.02, zero bias), not left as raw memory
        fc = reheaded.heads[name].fc
        assert torch.isfinite(fc.weight).all() and 0.005 < fc.weight.std() < 0.05, name
        assert torch.equal(fc.bias, torch.zeros_like(fc.bias)), name
    assert "attrs" not in reheaded.heads
    assert [t.name for t in reheaded.config.task_specs] == ["shape", "scale", "age"]


def test_local_dir_backbone_loads_exact_source_weights(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False)
    timm.models.save_for_hf(source, tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    model = TimmMultiTaskModel.from_backbone(f"local-dir:{tmp_path}", tasks=TASKS)
    source_state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    model_state = model.backbone.state_dict()
    assert set(source_state) == set(model_state)
    for key, value in source_state.items():
        assert torch.equal(model_state[key], value), key
    assert model.config.backbone == "test_resnet"  # the architecture, not the path
    assert model.config.backbone_source == f"local-dir:{tmp_path}"


def test_gradient_checkpointing_reaches_timm():
    model = make_model("test_vit")
    model.gradient_checkpointing_enable()
    assert model.backbone.grad_checkpointing is True
    out = model(**batch())
    out.loss.backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None


# ------------------------------------------------------------------------------ bad input
def test_pretrained_hub_weights_offline_points_to_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local-dir:"):
        TimmMultiTaskModel.from_backbone("hf-hub:timm/resnet18.a1_in1k", tasks=TASKS, pretrained=True)
    with pytest.raises(ValueError, match="Hub is unreachable"):
        TimmMultiTaskModel.from_backbone("test_resnet.r160_in1k", tasks=TASKS, pretrained=True)


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown timm architecture 'resnet500'.*resnet50"):
        TimmMultiTaskModel.from_backbone("resnet500", tasks=TASKS)


def test_missing_local_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="config.json missing"):
        TimmMultiTaskModel.from_backbone(f"local-dir:{tmp_path / 'nope'}", tasks=TASKS)


def test_label_for_unknown_task():
    model = make_model()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['age'\]"):
        model(pixel_values=batch()["pixel_values"], age=torch.zeros(4))


def test_class_index_out_of_range_in_forward():
    model = make_model()
    with pytest.raises(ValueError, match=r"Task 'shape': class index 3 is out of range"):
        model(pixel_values=batch()["pixel_values"], shape=torch.tensor([0, 1, 2, 3]))


def test_wrong_number_of_channels():
    model = make_model()
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\).*RGB"):
        model(pixel_values=torch.randn(2, 1, 32, 32))


def test_bad_task_lists():
    with pytest.raises(ValueError, match="Duplicate task name"):
        make_model(tasks=[TASKS[0], TASKS[0]])
    with pytest.raises(ValueError, match="At least one task"):
        make_model(tasks=[])
    with pytest.raises(ValueError, match="num_classes is set by the tasks"):
        make_model(num_classes=10)


def test_auto_classes_are_registered():
    config = transformers.AutoConfig.for_model("timm_multitask", backbone="test_resnet", tasks=[TASKS[1]])
    model = transformers.AutoModel.from_config(config)
    assert isinstance(model, TimmMultiTaskModel)
    assert hf_tlmtl.TimmMultiTaskConfig is type(config)


def test_batchnorm_counters_survive_reload_and_are_zero_when_saved_frozen(tmp_path):
    from hf_tlmtl.transfer import apply_transfer_strategy

    model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
    model.train()(pixel_values=torch.randn(2, 3, 32, 32))  # one BatchNorm update: counters become 1
    model.save_pretrained(tmp_path / "trained")
    reloaded = TimmMultiTaskModel.from_pretrained(tmp_path / "trained")
    counters = {n: int(b) for n, b in reloaded.named_buffers() if n.endswith("num_batches_tracked")}
    assert counters and set(counters.values()) == {1}

    apply_transfer_strategy(model, "feature_extraction")  # FrozenBatchNorm2d: no counters in the checkpoint
    model.save_pretrained(tmp_path / "frozen")
    reloaded = TimmMultiTaskModel.from_pretrained(tmp_path / "frozen")
    assert {int(b) for n, b in reloaded.named_buffers() if n.endswith("num_batches_tracked")} == {0}


def test_reheading_says_what_happened_in_one_line_instead_of_the_load_report(tmp_path, capfd, caplog):
    from transformers.utils import logging as hf_logging

    make_model().save_pretrained(tmp_path)
    capfd.readouterr()
    with caplog.at_level("WARNING", logger="hf_tlmtl.modeling"):
        TimmMultiTaskModel.from_pretrained(tmp_path, tasks=[TASKS[0], TaskSpec(name="age", type="regression")])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Re-headed"))
    assert "reused heads ['shape']" in line and "new heads ['age']" in line and "dropped heads ['attrs', 'scale']" in line
    err = capfd.readouterr().err  # transformers' own handler writes to the real stderr
    assert "LOAD REPORT" not in err and "not sharded" not in err
    assert not hf_logging.get_logger("transformers.modeling_utils").filters  # the filter is gone afterwards


def test_a_head_missing_from_the_checkpoint_is_initialised_on_a_plain_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(head_hidden_size=8)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("heads.attrs.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    for layer in (loaded.heads["attrs"].hidden[0], loaded.heads["attrs"].fc):  # trunc-normal 0.02, zero bias
        assert torch.isfinite(layer.weight).all() and 0.005 < layer.weight.std() < 0.05
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert torch.equal(loaded.heads["shape"].fc.weight, model.heads["shape"].fc.weight)  # loaded ones untouched


@pytest.mark.parametrize("hidden", [None, 16])
def test_new_models_initialise_their_heads_with_the_config_std(hidden):
    model = make_model(head_hidden_size=hidden)
    layers = [m for head in model.heads.values() for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == len(TASKS) * (2 if hidden else 1)
    for layer in layers:  # trunc-normal(initializer_range=0.02) and zero bias, not PyTorch's default init
        assert 0.01 < layer.weight.std() < 0.03 and torch.equal(layer.bias, torch.zeros_like(layer.bias))
