"""recipes/finetune.py end to end: YAML + overrides, outputs, transfer configs, bad input (exit 2, nothing written)."""

from __future__ import annotations

import runpy
import sys

import datasets
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_tlmtl.training.cli import parse_run_argv
from recipe_utils import FINETUNE, REPO, TINY, check_ok, load_recipe, run_finetune, summary, write_csv, write_image_table

CONFIGS = REPO / "recipes" / "configs"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("finetune")


# ------------------------------------------------------------------------- one trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A YAML config + command-line overrides, trained once on embedded shapes (3 task types)."""
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backbone": "test_resnet",
                "dataset": "shapes",
                "n_train": 48,
                "n_eval": 16,
                "tasks": ["shape", "color"],  # overridden below
                "learning_rate": 0.05,  # overridden below
                "weight_decay": 0.03,  # kept: only in the YAML
                "warmup_steps": 2,  # kept
                "output_dir": str(tmp / "out"),
            }
        )
    )
    args = [config, *TINY, "--tasks", "shape,scale,marks", "--learning_rate", "0.004", "--eval_strategy", "epoch"]
    proc = check_ok(run_finetune(args, tmp))
    return tmp / "out", proc


def test_yaml_values_and_command_line_overrides(trained):
    out, _ = trained
    arguments = summary(out)["arguments"]
    assert arguments["training"]["learning_rate"] == pytest.approx(0.004)  # command line beats YAML
    assert arguments["data"]["tasks"] == "shape,scale,marks"
    assert arguments["training"]["weight_decay"] == pytest.approx(0.03)  # YAML beats the default (0.0)
    assert arguments["training"]["warmup_steps"] == 2
    assert arguments["data"]["n_train"] == 48 and arguments["model"]["backbone"] == "test_resnet"


def test_outputs_model_loads_with_automodel_and_matches_summary(trained):
    import transformers

    import hf_tlmtl  # noqa: F401  (registers AutoModel)
    from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
    from hf_tlmtl.data import load_image_dataset, resolve_tasks

    out, _ = trained
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_summary.json"):
        assert (out / name).is_file(), name
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert type(model).__name__ == "TimmMultiTaskModel"
    assert [(t.name, t.type) for t in model.tasks] == [
        ("shape", "classification"), ("scale", "regression"), ("marks", "multilabel")
    ]
    saved = load_file(out / "model.safetensors")
    for key, value in model.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key])
    assert transformers.AutoImageProcessor.from_pretrained(out) is not None

    # The saved model scores on the validation rows what the summary says it scored.
    data = load_image_dataset("shapes", n_train=48, n_eval=16, image_size=32, seed=0)
    data, _ = resolve_tasks(data, "shape,scale,marks")
    batch = MultiTaskCollator(model.tasks)(list(prepare_dataset(data["validation"], model.config, train=False)))
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    accuracy = (logits["shape"].argmax(-1) == batch["shape"]).float().mean().item()
    mae = (logits["scale"].squeeze(-1) - batch["scale"].squeeze(-1)).abs().mean().item()
    per_task = summary(out)["per_task"]
    assert per_task["shape"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert per_task["scale"]["mae"] == pytest.approx(mae, abs=1e-4)
    assert 0.0 <= per_task["marks"]["map"] <= 1.0


def test_summary_curves_and_readable_report(trained):
    from PIL import Image

    out, proc = trained
    info = summary(out)
    assert info["data"] == {"source": "shapes", "train_rows": 48, "streaming": False, "validation_rows": 16}
    assert set(info["per_task"]) == {"shape", "scale", "marks"}
    assert {"accuracy", "macro_f1"} <= set(info["per_task"]["shape"])
    assert {"mae", "rmse", "r2"} <= set(info["per_task"]["scale"])
    assert np.isfinite(info["eval"]["eval_loss"]) and info["world_size"] == 1
    assert info["transfer"]["trainable_params"] == info["transfer"]["total_params"] > 0
    curves = out / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    with Image.open(curves) as image:
        assert image.width > 600 and image.height > 300
        assert len(set(image.convert("L").getdata())) > 20  # drawn, not blank
    # What a person reads on stdout: the plan, per-task metrics, where the files are.
    text = proc.stdout
    assert "== hf_tlmtl finetune ==" in text and "input 32x32" in text
    assert "trainable 3" in text or "trainable" in text
    assert "== Results on the validation split (16 rows) ==" in text
    for task in ("shape", "scale", "marks"):
        assert any(line.strip().startswith(task) for line in text.splitlines()), task
    assert f"Files in {out.resolve()}" in text
    assert "README.md" in text


def test_init_from_saved_model_with_transfer_local_config(trained, tmp_path):
    """recipes/configs/transfer_local.yaml: the saved shapes model -> digits; here with a frozen backbone."""
    source, _ = trained
    out = tmp_path / "digits"
    args = [CONFIGS / "transfer_local.yaml", *TINY, "--init_from", source, "--n_train", "40", "--n_eval", "20",
            "--transfer_strategy", "feature_extraction", "--output_dir", out]
    proc = check_ok(run_finetune(args, tmp_path))
    assert f"transferred from {source}" in proc.stdout
    assert "strategy feature_extraction" in proc.stdout
    assert "advice" in proc.stdout  # task_similarity: different -> recommend_strategy's advice
    info = summary(out)
    assert [t["name"] for t in info["tasks"]] == ["digit"]
    assert info["transfer"]["trainable_params"] < info["transfer"]["total_params"] / 10
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    backbone = [k for k in before if k.startswith("backbone.") and k in after and before[k].is_floating_point()]
    assert len(backbone) > 10
    for key in backbone:  # feature extraction: backbone (BatchNorm statistics too) untouched
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert "heads.digit.fc.weight" in after or any(k.startswith("heads.digit") for k in after)


# --------------------------------------------------------------------- parsing (in process)
def test_yaml_list_and_bool_values_parse_like_the_command_line(recipe, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("tasks: [shape, scale]\naugment: false\nnum_train_epochs: 2\noutput_dir: x\n")
    model_args, data_args, run_args, training_args = parse_run_argv(
        [str(config), "--num_train_epochs", "3", "--augment", "true"], *recipe.ARGUMENT_CLASSES
    )
    assert data_args.tasks == '["shape", "scale"]'
    assert data_args.augment is True and training_args.num_train_epochs == 3
    assert training_args.remove_unused_columns is False


@pytest.mark.parametrize("name", ["default.yaml", "transfer_hub.yaml", "transfer_local.yaml"])
def test_shipped_configs_parse(recipe, name):
    model_args, data_args, run_args, training_args = parse_run_argv([str(CONFIGS / name)], *recipe.ARGUMENT_CLASSES)
    assert training_args.output_dir.startswith("outputs/")
    if name == "transfer_hub.yaml":
        assert model_args.backbone.startswith("hf-hub:timm/") and model_args.pretrained
    if name == "transfer_local.yaml":
        assert model_args.init_from == "outputs/demo"
        assert training_args.transfer_strategy == "truncate" and training_args.layer_decay == 0.75


# ---------------------------------------------------------------------------- bad input
def _run_in_process(argv, tmp_path, monkeypatch, capsys):
    """The real script (``__main__``), in this process: much faster than a new interpreter."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(FINETUNE), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(FINETUNE), run_name="__main__")
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root, records = write_image_table(tmp_path_factory.mktemp("badtable"), rows=12)
    write_csv(root / "t.csv", records)
    corrupt = root / "corrupt"
    (corrupt / "images").mkdir(parents=True)
    rows = (root / "t.csv").read_text().splitlines()
    for i, line in enumerate(rows[1:]):
        name = line.split(",")[0]
        (corrupt / name).write_bytes(b"not an image" if i == 5 else (root / name).read_bytes())
    (corrupt / "t.csv").write_text((root / "t.csv").read_text())
    return root


BAD_INPUT = {
    "missing dataset path": (["--dataset", "{tmp}/no_such_folder"], ["no_such_folder", "not found"]),
    "missing table file": (["--dataset", "{tmp}/no_such.csv"], ["no_such.csv", "does not exist"]),
    "missing image column": (
        ["--dataset", "{table}/t.csv", "--image_column", "file"],
        ["'file'", "['path', 'kind', 'brightness', 'id']"],
    ),
    "missing task column": (
        ["--dataset", "{table}/t.csv", "--image_column", "path", "--tasks", "kind,size"],
        ["'size'", "['kind', 'brightness', 'id']"],
    ),
    "corrupt image": (
        ["--dataset", "{table}/corrupt/t.csv", "--image_column", "path", "--tasks", "kind"],
        ["img_005.png", "row 5"],
    ),
    "label outside the classes": (
        ["--dataset", "{table}/t.csv", "--image_column", "path", "--tasks", "kind:classification:cat|dog"],
        ["'fox'", "['cat', 'dog']"],
    ),
    "class index outside the classes": (
        ["--dataset", "shapes", "--n_train", "16", "--n_eval", "8", "--tasks", "shape:classification:square|ellipse"],
        ["not one of the labels of task 'shape'"],
    ),
    "unknown command-line argument": (["--learning_rat", "0.1"], ["--learning_rat", "did you mean 'learning_rate'"]),
    "bad argument value": (["--loss_balancing", "nope"], ["loss_balancing", "static"]),
    "push to hub offline": (["--dataset", "shapes", "--push_to_hub", "true"], ["HF_HUB_OFFLINE"]),
    "resume without checkpoint": (["--resume_from_checkpoint", "true"], ["no complete checkpoint-*"]),
    "hub dataset while offline": (["--dataset", "some-org/some-dataset"], ["'some-org/some-dataset'", "HF_HUB_OFFLINE"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, table, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    argv, expected = BAD_INPUT[case]
    argv = [a.format(tmp=tmp_path, table=table) for a in argv]
    out = tmp_path / "out"
    code, stdout, stderr = _run_in_process([*TINY, *argv, "--output_dir", out], tmp_path, monkeypatch, capsys)
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not out.exists()
    assert "== hf_tlmtl finetune ==" not in stdout  # stopped before the plan, before training


def test_unknown_yaml_key_suggests_the_closest_in_a_subprocess(tmp_path):
    """The real exit status of a new interpreter, and nothing written."""
    config = tmp_path / "typo.yaml"
    config.write_text("backbone: test_resnet\nlearning_rat: 0.1\n")
    proc = run_finetune([config, "--output_dir", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: typo.yaml: unknown key 'learning_rat'; did you mean 'learning_rate'?"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["typo.yaml"]


def test_existing_output_dir_needs_overwrite_flag(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run")
    argv = [*TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8", "--output_dir", out]
    code, stdout, stderr = _run_in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert stderr.startswith("error: output_dir") and "--overwrite_output_dir true" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "an earlier run"


# ------------------------------------------------------------------------------ push to hub
def test_push_to_hub_uploads_the_output_folder_once(recipe, tmp_path, monkeypatch, capsys):
    """--push_to_hub: one commit with model, card, summary and curves; the Hub replaced at HfApi's boundary."""
    import huggingface_hub.constants
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    calls: dict = {"commits": []}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs.get("private"))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commits"].append((repo_id, sorted(op.path_in_repo for op in operations)))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="",
                          commit_description="", oid="1" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pushed"
    recipe.main([*TINY, "--dataset", "shapes", "--n_train", "16", "--n_eval", "8", "--tasks", "shape",
                 "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out), "--push_to_hub", "true",
                 "--hub_model_id", "acme/shapes-demo", "--hub_token", "hf_test", "--hub_private_repo", "true"])
    assert calls["repo"] == ("acme/shapes-demo", True)
    assert len(calls["commits"]) == 1  # once, at the end: not at every Trainer save
    repo_id, files = calls["commits"][0]
    assert repo_id == "acme/shapes-demo"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "training_summary.json",
            "training_curves.png"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files)
    assert "Pushed to the Hub: https://huggingface.co/acme/shapes-demo" in capsys.readouterr().out
    assert summary(out)["push_to_hub"] == "acme/shapes-demo"
