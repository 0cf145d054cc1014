"""recipes/predict.py: CSV / JSON predictions equal a manual forward pass of the saved model."""

from __future__ import annotations

import csv
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from recipe_utils import PREDICT, TINY, check_ok, random_image, run_finetune, run_script


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_model")
    out = tmp / "model"
    check_ok(run_finetune([*TINY, "--dataset", "shapes", "--n_train", "32", "--n_eval", "8", "--tasks",
                           "shape,scale,marks", "--output_dir", out], tmp))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of several sizes and modes (RGB, grey, RGBA) in nested folders."""
    root = tmp_path_factory.mktemp("predict_images")
    rng = np.random.default_rng(1)
    paths = []
    for i, (size, mode) in enumerate([(32, "RGB"), (48, "RGB"), (40, "L"), (36, "RGBA"), (32, "RGB")]):
        folder = root / ("a" if i < 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"im{i}.png"
        random_image(rng, size, tint=i).convert(mode).save(path)
        paths.append(path)
    return root, sorted(paths)


def manual_forward(model_dir, paths):
    """The saved model on the images, with timm's eval transform built here, not by the pipeline."""
    import transformers

    import hf_tlmtl  # noqa: F401
    from hf_tlmtl.data import build_transforms

    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    transform = build_transforms(model.config, train=False)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    return model, {
        "shape": logits["shape"].softmax(-1).numpy(),
        "scale": logits["scale"][:, 0].numpy(),
        "marks": logits["marks"].sigmoid().numpy(),
    }


def test_csv_predictions_over_a_folder_equal_a_manual_forward_pass(model_dir, images, tmp_path):
    root, paths = images
    output = tmp_path / "pred.csv"
    proc = check_ok(run_script(PREDICT, ["--model", model_dir, "--data", root, "--output", output, "--batch_size", "2"],
                               tmp_path))
    assert "5 predictions written" in proc.stdout
    rows = list(csv.DictReader(output.open()))
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    model, expected = manual_forward(model_dir, paths)
    shapes = model.get_task("shape").labels
    marks = model.get_task("marks").labels
    assert list(rows[0]) == ["image", "shape", "shape_score", "scale", "marks", *[f"marks_{m}" for m in marks]]
    for i, row in enumerate(rows):
        probs = expected["shape"][i]
        assert row["shape"] == shapes[int(probs.argmax())]
        assert float(row["shape_score"]) == pytest.approx(float(probs.max()), abs=1e-5)
        assert float(row["scale"]) == pytest.approx(float(expected["scale"][i]), abs=1e-5)
        for j, label in enumerate(marks):
            assert float(row[f"marks_{label}"]) == pytest.approx(float(expected["marks"][i][j]), abs=1e-5)
        predicted = [m for j, m in enumerate(marks) if expected["marks"][i][j] >= 0.5]
        assert set(filter(None, row["marks"].split("|"))) == set(predicted)


def test_json_predictions_over_a_table_equal_a_manual_forward_pass(model_dir, images, tmp_path):
    root, paths = images
    table = root / "list.csv"
    table.write_text("file,note\n" + "".join(f"{p.relative_to(root)},x\n" for p in paths))
    output = tmp_path / "pred.json"
    check_ok(run_script(PREDICT, ["--model", model_dir, "--data", table, "--image_column", "file", "--output", output,
                                  "--threshold", "0.3"], tmp_path))
    records = json.loads(output.read_text())
    assert [r["image"] for r in records] == [str(p.resolve()) for p in paths]
    model, expected = manual_forward(model_dir, paths)
    shapes, marks = model.get_task("shape").labels, model.get_task("marks").labels
    for i, rec in enumerate(records):
        scores = rec["shape"]["scores"]
        assert list(sorted(scores)) == sorted(shapes)
        np.testing.assert_allclose([scores[s] for s in shapes], expected["shape"][i], atol=1e-5)
        assert rec["shape"]["label"] == shapes[int(expected["shape"][i].argmax())]
        assert rec["scale"] == pytest.approx(float(expected["scale"][i]), abs=1e-5)
        np.testing.assert_allclose([rec["marks"]["scores"][m] for m in marks], expected["marks"][i], atol=1e-5)
        assert rec["marks"]["labels"] == [m for j, m in enumerate(marks) if expected["marks"][i][j] >= 0.3]


def _main(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(PREDICT), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(PREDICT), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def test_bad_input_exits_2(model_dir, images, tmp_path, monkeypatch, capsys):
    root, _ = images
    existing = tmp_path / "old.csv"
    existing.write_text("keep me")
    code, err = _main(["--model", model_dir, "--data", root, "--output", existing], monkeypatch, capsys)
    assert code == 2 and "exists; pass --overwrite true" in err and existing.read_text() == "keep me"
    code, err = _main(["--model", tmp_path / "nope", "--data", root, "--output", tmp_path / "p.csv"], monkeypatch, capsys)
    assert code == 2 and "not found" in err and not (tmp_path / "p.csv").exists()
    code, err = _main(["--model", model_dir, "--data", tmp_path / "none", "--output", tmp_path / "p.csv"], monkeypatch,
                      capsys)
    assert code == 2 and "not found" in err and not (tmp_path / "p.csv").exists()
