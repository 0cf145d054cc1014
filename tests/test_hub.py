"""Model cards, adapter cards and pushing to the Hub (the Hub client is substituted at its API boundary)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, metadata_load
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from peft import LoraConfig, get_peft_model
from PIL import Image

import hf_tlmtl  # noqa: F401 - registers the Auto classes and the pipeline
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.hub import (
    PushToHubError,
    base_model_id,
    create_adapter_card,
    create_model_card,
    metrics_from_card,
    push_model_to_hub,
)
from hf_tlmtl.training import MultiTaskTrainingArguments
from hf_tlmtl.transfer import apply_transfer_strategy, recommend_strategy

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = [
    TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart"]),
    TaskSpec(name="scale", type="regression"),
    TaskSpec(name="attrs", type="multilabel", labels=["red", "big"], weight=0.5),
]
METRICS = {"shape": {"accuracy": 0.875, "macro_f1": 0.81}, "scale": {"mae": 0.125, "r2": 0.6}, "attrs": {"map": 0.7}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=32)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


def _lora_adapter(folder: Path, base: Path | TimmMultiTaskModel) -> Path:
    """A real LoRA adapter saved alone; a base loaded from a folder is recorded as base_model_name_or_path."""
    peft_model = get_peft_model(
        TimmMultiTaskModel.from_pretrained(base) if isinstance(base, Path) else base,
        LoraConfig(r=2, lora_alpha=4, target_modules=r"backbone\.layer\d\.0\.conv\d", modules_to_save=[f"heads.{t.name}" for t in TASKS]),
    )
    peft_model.save_pretrained(folder)  # peft also writes its default README.md
    return folder


# ----------------------------------------------------------------------------------- model card
def test_card_parses_back_and_model_index_round_trips(model, tmp_path):
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", learning_rate=3e-4, transfer_strategy="partial",
        trainable_groups=2, layer_decay=0.7,
    )
    summary = apply_transfer_strategy(TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=32), "partial", trainable_groups=2)
    card = create_model_card(
        model, metrics=METRICS, dataset={"id": "acme/shapes", "split": "validation"}, training_args=args,
        transfer_summary=summary, recommendation=recommend_strategy(300, "similar"), curves_image=tmp_path / "curves.png",
        delta_m=2.5, repo_id="acme/shapes-mtl",
    )
    path = tmp_path / "README.md"
    card.save(path)

    loaded = ModelCard.load(path)
    metadata = metadata_load(path)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["license"] == "apache-2.0"
    assert {"timm", "multi-task", "transfer-learning", "image-classification", "hf_tlmtl"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["acme/shapes"]
    # model-index: one metric entry per task and metric, values unchanged
    entries = [m for result in metadata["model-index"][0]["results"] for m in result["metrics"]]
    assert len(entries) == sum(len(v) for v in METRICS.values())
    assert metrics_from_card(loaded) == METRICS
    assert metrics_from_card(path) == METRICS
    assert {r.dataset_split for r in loaded.data.eval_results} == {"validation"}

    text = loaded.text
    assert "| Task | Type | Labels / outputs | Loss | Weight |" in text
    assert "| `shape` | classification | square, ellipse, heart | cross_entropy | 1.0 |" in text
    assert "| `scale` | regression | 1 value | mse | 1.0 |" in text
    assert "| `attrs` | multilabel | red, big | bce | 0.5 |" in text
    assert "| `shape` | accuracy | 0.875 |" in text and "delta_m = +2.50 %" in text
    assert 'AutoModel.from_pretrained("acme/shapes-mtl")' in text
    assert 'pipeline("multitask-image-classification", model="acme/shapes-mtl")' in text
    assert "![Training curves](curves.png)" in text
    assert "| `learning_rate` | 0.0003 |" in text and "| `layer_decay` | 0.7 |" in text
    assert "**Strategy:** `partial`" in text and "case 1" in text
    assert re.search(r"\| `layer1\.0` \| 0 \| [\d,]+ \| frozen \|", text)
    assert re.search(r"\| `layer4\.0` \| ([\d,]+) \| \1 \| trained \|", text)
    total = sum(p.numel() for p in model.parameters())
    assert f"({total:,}) in total" in text


def test_card_usage_snippets_run(saved, tmp_path, monkeypatch):
    """The card's python snippets run as written against the saved model."""
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "image.jpg")
    model = TimmMultiTaskModel.from_pretrained(saved)
    card = create_model_card(model, repo_id=str(saved))
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "card-snippet", "exec"), namespace)  # noqa: S102 - our own template
    assert namespace["shape"] in TASKS[0].labels
    assert len(namespace["attrs_probabilities"]) == 2
    assert len(namespace["predictions"]) == 1  # a list of images: one dict each, batched by the pipeline
    assert set(namespace["predictions"][0]) == {"shape", "scale", "attrs"}


def test_card_accepts_trainer_metrics(model):
    flat = {"eval_shape_accuracy": 0.5, "eval_scale_mae": 0.25, "eval_loss": 1.3, "eval_score": 0.4, "epoch": 3.0}
    card = create_model_card(model, metrics=flat, dataset="shapes")
    assert metrics_from_card(card) == {"shape": {"accuracy": 0.5}, "scale": {"mae": 0.25}}
    assert card.data.datasets is None  # "shapes" is not an org/name Hub id


def test_card_for_a_task_the_model_lacks_is_refused(model):
    with pytest.raises(ValueError, match=r"'colour'.*\['shape', 'scale', 'attrs'\]"):
        create_model_card(model, metrics={"colour": {"accuracy": 0.9}})
    with pytest.raises(ValueError, match=r"'colour'"):
        create_model_card(model, metrics={"eval_colour_accuracy": 0.9})
    with pytest.raises(ValueError, match="finite"):
        create_model_card(model, metrics={"shape": {"accuracy": float("nan")}})


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf-hub:acme/resnet-ssl", "acme/resnet-ssl"),
        ("resnet50.a1_in1k", "timm/resnet50.a1_in1k"),
        ("resnet50", "timm/resnet50.a1_in1k"),  # timm's default pretrained tag
        ("local-dir:/somewhere", None),
        (None, None),
    ],
)
def test_base_model_from_backbone_source(model, source, expected):
    assert base_model_id(source) == expected
    model.config.backbone_source, old = source, model.config.backbone_source
    try:
        assert create_model_card(model).data.base_model == expected
    finally:
        model.config.backbone_source = old


def test_template_ships_in_the_wheel(tmp_path):
    """Build a wheel offline from a copy of the sources, unpack it, import hf_tlmtl.hub from there."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "hf_tlmtl", source / "hf_tlmtl", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True, env=env, cwd=tmp_path, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("hf_tlmtl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"hf_tlmtl/model_cards/model_card.md", "hf_tlmtl/model_cards/adapter_card.md"} <= names
        archive.extractall(tmp_path / "installed")
    probe = (
        "import hf_tlmtl.hub as hub\n"
        "with hub.template_path() as p, hub.template_path('adapter_card.md') as q:\n"
        "    print(hub.__file__); print(p); print(q.is_file())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path / "installed")},
    ).stdout.split()
    installed = str(tmp_path / "installed")
    assert out[0].startswith(installed) and out[1].startswith(installed) and out[1].endswith("model_card.md")
    assert out[2] == "True"


# --------------------------------------------------------------------------------- adapter card
def test_adapter_card_names_its_base_model(saved, tmp_path):
    adapter = _lora_adapter(tmp_path / "adapter", saved)
    card = create_adapter_card(adapter, base_model="acme/shapes-mtl", metrics={"shape": {"accuracy": 0.5}}, tasks=TASKS)
    loaded = ModelCard.load(adapter / "README.md")  # peft's default card was replaced
    assert loaded.data.base_model == "acme/shapes-mtl" and loaded.data.library_name == "peft"
    assert "Model Card for Model ID" not in loaded.text
    assert metrics_from_card(loaded) == {"shape": {"accuracy": 0.5}}
    assert 'AutoModel.from_pretrained("acme/shapes-mtl")' in card.text
    assert "rank `r=2`, `lora_alpha=4`" in card.text and "`heads.shape`" in card.text
    assert "| `attrs` | multilabel |" in card.text


def test_adapter_card_snippet_loads_the_adapter(saved, tmp_path):
    adapter = _lora_adapter(tmp_path / "adapter", saved)
    card = create_adapter_card(adapter, base_model=str(saved))  # local base: tasks read from its config
    assert card.data.base_model is None  # a local path is not Hub metadata, but the body names it
    assert f"`{saved}` (local path)" in card.text and "| `shape` | classification |" in card.text
    (block,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "adapter-snippet", "exec"), namespace)  # noqa: S102 - our own template
    assert type(namespace["merged"]).__name__ == "TimmMultiTaskModel"


def test_adapter_card_bad_input(saved, tmp_path):
    adapter = _lora_adapter(tmp_path / "adapter", TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=32))
    with pytest.raises(ValueError, match="base_model="):
        create_adapter_card(adapter)  # adapter_config.json has base_model_name_or_path: null
    (adapter / "README.md").write_text("# my notes\n")
    with pytest.raises(ValueError, match="overwrite=True"):
        create_adapter_card(adapter, base_model="acme/base")
    assert (adapter / "README.md").read_text() == "# my notes\n"
    create_adapter_card(adapter, base_model="acme/base", overwrite=True)
    assert ModelCard.load(adapter / "README.md").data.base_model == "acme/base"
    with pytest.raises(ValueError, match="adapter_config.json"):
        create_adapter_card(saved, base_model="acme/base")


# ----------------------------------------------------------------------------------------- push
@pytest.fixture
def hub_calls(monkeypatch):
    """Substitute the Hub at HfApi's API boundary; record what would be sent."""
    calls: dict = {"files": {}}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            calls["files"][op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else bytes(source)
        calls["commit"] = (repo_id, kwargs)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message=kwargs.get("commit_message", ""),
            commit_description="", oid="1" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def test_push_sends_model_card_preprocessor_curves_and_adapters(saved, tmp_path, hub_calls):
    folder = _copy(saved, tmp_path)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"pickle")
    (folder / "training_args.bin").write_bytes(b"pickle")
    curves = tmp_path / "training_curves.png"
    Image.new("RGB", (8, 8)).save(curves)
    adapter = _lora_adapter(tmp_path / "lora_adapter", saved)

    push_model_to_hub(folder, "acme/shapes-mtl", token="hf_test", curves_image=curves, adapters={"lora": adapter}, private=True)

    assert set(hub_calls["files"]) == {
        "config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_curves.png",
        "adapters/lora/adapter_config.json", "adapters/lora/adapter_model.safetensors", "adapters/lora/README.md",
    }
    assert hub_calls["create_repo"] == ("acme/shapes-mtl", {"token": "hf_test", "private": True, "exist_ok": True})
    assert hub_calls["files"]["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    card = ModelCard(hub_calls["files"]["README.md"].decode())
    assert 'AutoModel.from_pretrained("acme/shapes-mtl")' in card.text
    adapter_card = ModelCard(hub_calls["files"]["adapters/lora/README.md"].decode())
    assert adapter_card.data.base_model == "acme/shapes-mtl"
    assert 'subfolder="adapters/lora"' in adapter_card.text
    # the local folder is complete too
    assert {"README.md", "training_curves.png", "preprocessor_config.json"} <= set(os.listdir(folder))


def test_push_a_model_object_with_its_card(model, tmp_path, hub_calls):
    card = create_model_card(model, metrics=METRICS, repo_id="acme/m")
    push_model_to_hub(model, "acme/m", token="hf_test", card=card, save_dir=tmp_path / "staged")
    assert set(hub_calls["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    assert metrics_from_card(ModelCard(hub_calls["files"]["README.md"].decode())) == METRICS


def test_push_regenerates_a_missing_preprocessor_config(saved, tmp_path, hub_calls):
    folder = _copy(saved, tmp_path)
    (folder / "preprocessor_config.json").unlink()
    push_model_to_hub(folder, "acme/m", token="hf_test")
    sent = json.loads(hub_calls["files"]["preprocessor_config.json"])
    assert sent == json.loads((saved / "preprocessor_config.json").read_text())


def test_transformers_push_to_hub_includes_preprocessor_config(model, hub_calls, monkeypatch):
    """PreTrainedModel.push_to_hub goes through save_pretrained, which writes the preprocessor config."""

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md on the Hub yet")

    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, *a, **k: no_remote_card()))
    model.push_to_hub("acme/m", token="hf_test")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(hub_calls["files"])


def test_push_without_network_fails_clearly_and_keeps_the_folder(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real client, told it is offline
    with pytest.raises(PushToHubError) as error:
        push_model_to_hub(folder, "acme/shapes-mtl", token="hf_test")
    message = str(error.value)
    assert "acme/shapes-mtl" in message and "unreachable" in message and "Nothing was lost" in message
    assert str(folder) in message and f"hf upload acme/shapes-mtl {folder}" in message
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(os.listdir(folder))


def test_push_bad_input(saved, tmp_path, monkeypatch, hub_calls):
    folder = _copy(saved, tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="hf auth login"):
        push_model_to_hub(folder, "acme/m")
    assert not (folder / "README.md").exists()  # nothing written before the token check
    with pytest.raises(ValueError, match="repo_id"):
        push_model_to_hub(folder, "not a repo id!", token="hf_test")
    with pytest.raises(ValueError, match="config.json"):
        push_model_to_hub(tmp_path, "acme/m", token="hf_test")
    (folder / "README.md").write_text("# my card\n")
    with pytest.raises(ValueError, match="overwrite=True"):
        push_model_to_hub(folder, "acme/m", token="hf_test", card=ModelCard("---\nlicense: mit\n---\nother"))
    assert (folder / "README.md").read_text() == "# my card\n"
    assert hub_calls["files"] == {}
