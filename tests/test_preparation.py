"""Model preparation is one idempotent function, the trainer only calls it, and the model owns heads and presence.

- ``prepare_model(model, TransferConfig)``: what trains afterwards, twice is once, a real Trainer's
  ``model_init`` gets its models prepared;
- ``TimmMultiTaskModel.reset_heads`` / ``truncate``: the one place heads are built;
- ``MultiTaskOutput.labelled_tasks``: the model decides which tasks a batch labels, the trainer reads it.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.adapters import AdapterConfig
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.transfer import TransferConfig, prepare_model
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments

TASKS = [TaskSpec(name="shape", type="classification", num_labels=4), TaskSpec(name="scale", type="regression")]


def make_model(seed: int = 0) -> TimmMultiTaskModel:
    torch.manual_seed(seed)
    return TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=32)


def trainable(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------ prepare_model
def test_prepare_model_applies_the_config_and_a_second_call_changes_nothing():
    config = TransferConfig(strategy="truncate", truncate_stage=2, trainable_groups=1, bn="frozen")
    model = prepare_model(make_model(), config)
    assert model.config.truncate_stage == 2 and model.head_in_features == 48
    assert model.transfer_summary.strategy == "truncate"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = trainable(model)
    again = prepare_model(model, config)
    assert again is model and trainable(model) == grads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # heads not rebuilt again


def test_prepare_model_with_lora_wraps_once_and_a_new_adapter_name_adds_one():
    config = TransferConfig(strategy="lora", adapter=AdapterConfig(r=2, alpha=4))
    model = prepare_model(make_model(), config)
    assert isinstance(model, peft.PeftModel) and sorted(model.peft_config) == ["default"]
    assert prepare_model(model, config) is model
    other = prepare_model(model, config.replace(adapter=AdapterConfig(r=2, alpha=4, adapter_name="second")))
    assert sorted(other.peft_config) == ["default", "second"] and other.active_adapter == "second"


def test_a_config_that_changes_nothing_leaves_the_model_alone():
    model = make_model()
    grads = trainable(model)
    assert prepare_model(model, TransferConfig()) is model
    assert trainable(model) == grads and model.transfer_summary is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "freeze"}, r"Unknown transfer_strategy 'freeze'"),
        ({"strategy": "fine_tune", "truncate_stage": 2}, r"truncate_stage is used by transfer_strategy='truncate' only"),
        ({"strategy": "fine_tune", "adapter": AdapterConfig()}, r"adapter= is used by transfer_strategy='lora' only"),
        ({"strategy": "partial"}, r"needs trainable_groups"),
        ({"strategy": "fine_tune", "cache_features": True}, r"cache_features=True needs transfer_strategy='feature_extraction'"),
        ({"bn": "sometimes"}, r"bn"),
    ],
)
def test_bad_transfer_configs_are_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransferConfig(**kwargs)


def test_training_arguments_carry_one_transfer_config_with_one_adapter_config(tmp_path):
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path), report_to="none", transfer_strategy="lora", lora_r=4, lora_alpha=8, lora_method="loha"
    )
    assert args.transfer_config() == TransferConfig(strategy="lora", adapter=AdapterConfig(r=4, alpha=8, method="loha"))


# ------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def shapes():
    ds = load_embedded_dataset("shapes", n_train=16, n_eval=8, image_size=32)
    return ds.select_columns(["image", "shape", "scale"])


def _args(tmp_path, **kwargs) -> MultiTaskTrainingArguments:
    return MultiTaskTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=8,
        learning_rate=0.01, save_strategy="no", seed=0, **kwargs,
    )


def test_the_trainer_prepares_models_from_model_init_and_trains_the_prepared_one(shapes, tmp_path):
    built = []

    def model_init() -> TimmMultiTaskModel:
        built.append(make_model(seed=len(built)))
        return built[-1]

    config = make_model().config
    trainer = MultiTaskTrainer(
        model_init=model_init,
        args=_args(tmp_path, transfer_strategy="partial", trainable_groups=1),
        train_dataset=prepare_dataset(shapes["train"], config, train=False),
        data_collator=MultiTaskCollator(TASKS),
    )
    assert trainer.transfer_summary.strategy == "partial"
    trainer.train()
    assert len(built) == 2 and trainer.model is built[-1]  # train() rebuilt it through model_init ...
    frozen = [n for n, p in built[-1].backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(not n.startswith("layer4") for n in frozen)  # ... and it was prepared: bottom groups frozen
    assert all(p.requires_grad for p in built[-1].backbone.layer4.parameters())


def test_the_trainer_does_not_touch_the_model_when_the_arguments_ask_for_no_strategy(tmp_path):
    model = prepare_model(make_model(), TransferConfig(strategy="feature_extraction"))
    grads = trainable(model)
    trainer = MultiTaskTrainer(model=model, args=_args(tmp_path))
    assert trainer.model is model and trainable(model) == grads and trainer.transfer_summary is None


def test_model_init_with_gradual_unfreeze_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass model= instead of model_init="):
        MultiTaskTrainer(model_init=lambda: make_model(), args=_args(tmp_path, gradual_unfreeze=True, trainable_groups=2))


# ------------------------------------------------------------------------------ heads, presence
def test_reset_heads_rebuilds_only_the_named_heads_for_the_current_width():
    model = make_model()
    kept = model.heads["scale"]
    assert model.reset_heads(["shape"]) == ["shape"]
    assert model.heads["scale"] is kept and model.heads["shape"].fc.in_features == model.head_in_features
    assert float(model.heads["shape"].fc.bias.detach().abs().sum()) == 0.0
    model.truncate(1)
    assert model.heads["scale"] is not kept
    assert {h.fc.in_features for h in model.heads.values()} == {model.head_in_features} == {32}
    with pytest.raises(ValueError, match="already truncated at stage 1"):
        model.truncate(2)


def test_the_output_names_the_labelled_tasks_and_the_tuple_form_keeps_its_fields():
    model = make_model().eval()
    x = torch.randn(4, 3, 32, 32)
    out = model(x, shape=torch.tensor([-100, -100, -100, -100]), scale=torch.tensor([0.1, math.nan, 0.3, 0.2]))
    assert out.labelled_tasks == ("scale",)
    assert float(out.task_losses["shape"]) == 0.0
    loss, logits, task_losses, pooled = model(x, shape=torch.tensor([0, 1, 2, 3]), return_dict=False)
    assert set(task_losses) == {"shape"} and pooled.shape == (4, model.head_in_features)
    assert model(x).labelled_tasks is None


@pytest.mark.parametrize("balancing", ["static", "uncertainty"])
def test_the_trainer_reads_presence_from_the_model(balancing, shapes, tmp_path):
    model = make_model()
    trainer = MultiTaskTrainer(model=model, args=_args(tmp_path, loss_balancing=balancing))
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "shape": torch.full((4,), -100), "scale": torch.rand(4)}
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    present, absent = trainer._split_by_presence(outputs)
    assert list(present) == ["scale"] and list(absent) == ["shape"]
    if balancing == "static":  # the model's own TaskSpec-weighted loss, not a recomputation
        assert loss is outputs.loss
    torch.testing.assert_close(loss, trainer.balancer.combine(present))
