"""hf_tlmtl.training.distributed in one process: FSDP wrap units from timm's blocks, refused FSDP combinations,
and the shipped accelerate configs (parsed by accelerate itself). The 2-process runs are in
test_recipe_fsdp.py / test_recipe_distributed.py."""

from __future__ import annotations

import pytest
import timm
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.multitask.balancing import build_balancer
from hf_tlmtl.backbone import block_class_names
from hf_tlmtl.training.distributed import check_fsdp_setup
from hf_tlmtl.training import MultiTaskTrainingArguments
from recipe_utils import REPO

TASKS = [TaskSpec(name="a", type="regression"), TaskSpec(name="b", type="classification", num_labels=3)]
CONFIGS = REPO / "recipes" / "configs" / "accelerate"


@pytest.mark.parametrize(
    "name, blocks",
    [("test_vit", ["Block"]), ("test_resnet", ["BasicBlock", "Bottleneck"]), ("test_efficientnet", ["ConvBnAct", "EdgeResidual", "InvertedResidual"])],
)
def test_wrap_units_are_the_blocks_of_timms_layer_groups(name, blocks):
    backbone = timm.create_model(name, pretrained=False)
    assert block_class_names(backbone) == blocks
    # Every unit class exists in the model, and no generic container (nn.Sequential) is one.
    present = {type(m).__name__ for m in backbone.modules()}
    assert set(blocks) <= present and "Sequential" not in block_class_names(backbone)


def test_model_declares_its_blocks_as_no_split_modules():
    model = TimmMultiTaskModel.from_backbone("test_vit", TASKS, img_size=32)
    assert sorted(model._no_split_modules) == ["Block"]


def _args(tmp_path, **kwargs) -> MultiTaskTrainingArguments:
    return MultiTaskTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_learnable_balancer_weights_need_fsdp2(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = _args(tmp_path, loss_balancing="uncertainty")
    check_fsdp_setup(args, build_balancer("uncertainty", TASKS), cpu=True)  # FSDP2: trained (test_recipe_fsdp.py)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="'uncertainty' learns its task weights .* FSDP2 only: .*--fsdp_version 2"):
        check_fsdp_setup(args, build_balancer("uncertainty", TASKS), cpu=False)  # GPUs: accelerate's FSDP1
    check_fsdp_setup(args, build_balancer("dwa", TASKS), cpu=False)  # no parameters: accepted
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_fsdp_setup(args, build_balancer("uncertainty", TASKS), cpu=True)  # DDP keeps it


def test_fsdp_accepts_every_transfer_strategy(tmp_path, monkeypatch):
    # Run for real: LoRA in test_recipe_fsdp_lora.py, bn recalibrate in test_recipe_fsdp_full.py.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for strategy, kwargs in (("lora", {}), ("partial", {"trainable_groups": 2}), ("feature_extraction", {}),
                             ("fine_tune", {}), ("fine_tune", {"bn": "recalibrate"}), ("truncate", {})):
        check_fsdp_setup(_args(tmp_path, transfer_strategy=strategy, **kwargs), build_balancer("static", TASKS), cpu=True)


def test_fsdp1_on_cpu_is_refused_with_the_fsdp2_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP on CPU runs with FSDP2 .*--fsdp_version 2"):
        check_fsdp_setup(_args(tmp_path), build_balancer("static", TASKS), cpu=True)
    check_fsdp_setup(_args(tmp_path), build_balancer("static", TASKS), cpu=False)  # GPUs: accelerate's FSDP1


@pytest.mark.parametrize(
    "name, kind, processes",
    [("single_cpu", DistributedType.NO, 1), ("multi_cpu_ddp", DistributedType.MULTI_GPU, 2),
     ("multi_gpu_ddp", DistributedType.MULTI_GPU, 8), ("multi_node_ddp", DistributedType.MULTI_GPU, 16),
     ("fsdp2", DistributedType.FSDP, 2), ("deepspeed_zero2", DistributedType.DEEPSPEED, 8)],
)
def test_shipped_accelerate_configs_parse(name, kind, processes):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind and config.num_processes == processes
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "multi_node_ddp":
        assert config.num_machines == 2 and config.main_process_ip
