"""The "multitask-image-classification" pipeline against a manual forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import hf_tlmtl  # noqa: F401 - registers the model and the pipeline
from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import build_transforms
from hf_tlmtl.hub.pipeline import PIPELINE_TASK, MultiTaskImageClassificationPipeline

TASKS = [
    TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart", "star"]),
    TaskSpec(name="attrs", type="multilabel", labels=["red", "big", "round"]),
    TaskSpec(name="pose", type="regression", labels=["x", "y"]),
]


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(37, 45, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", TASKS, image_size=32)
    with torch.no_grad():  # larger head weights so probabilities spread out
        for head in model.heads.values():
            head.fc.weight.mul_(50)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    images = [_image(i) for i in range(3)]
    paths = []
    for i, image in enumerate(images):
        paths.append(folder.parent / f"image_{i}.png")
        image.save(paths[-1])
    return folder, images, paths


def _manual(folder, images):
    """Probabilities / values per task from AutoModel on build_transforms(train=False) pixels."""
    model = AutoModel.from_pretrained(folder).eval()
    pixels = torch.stack([build_transforms(model.config, train=False)(image) for image in images])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    return {task.name: task.predict(logits[task.name]) for task in model.tasks}


def _expected(manual, index, top_k, threshold):
    by_name = {t.name: t for t in TASKS}
    shape = manual["shape"][index]
    top = torch.argsort(shape, descending=True)[:top_k].tolist()
    attrs = manual["attrs"][index]
    above = [i for i in torch.argsort(attrs, descending=True).tolist() if attrs[i] >= threshold]
    return {
        "shape": [(by_name["shape"].labels[i], float(shape[i])) for i in top],
        "attrs": [(by_name["attrs"].labels[i], float(attrs[i])) for i in above],
        "pose": manual["pose"][index].tolist(),
    }


def _assert_matches(result, expected):
    assert set(result) == {"shape", "attrs", "pose"}
    for task in ("shape", "attrs"):
        assert [r["label"] for r in result[task]] == [label for label, _ in expected[task]]
        np.testing.assert_allclose([r["score"] for r in result[task]], [s for _, s in expected[task]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["pose"]["value"], expected["pose"], rtol=1e-5, atol=1e-5)


def test_registered_on_import():
    assert PIPELINE_TASK in PIPELINE_REGISTRY.get_supported_tasks()


def test_single_image_matches_manual_forward(saved):
    folder, images, _ = saved
    manual = _manual(folder, images[:1])
    probabilities = sorted(manual["attrs"][0].tolist())
    threshold = (probabilities[0] + probabilities[1]) / 2  # some labels above, some below
    pipe = pipeline(PIPELINE_TASK, model=str(folder), device="cpu")
    assert isinstance(pipe, MultiTaskImageClassificationPipeline)

    result = pipe(images[0], top_k=2, threshold=threshold)

    expected = _expected(manual, 0, top_k=2, threshold=threshold)
    assert len(result["shape"]) == 2 and len(result["attrs"]) == 2
    _assert_matches(result, expected)


def test_batch_of_paths_matches_manual_forward(saved):
    folder, images, paths = saved
    manual = _manual(folder, images)
    pipe = pipeline(PIPELINE_TASK, model=str(folder), device="cpu")

    results = pipe([str(p) for p in paths], batch_size=2, top_k=3, threshold=0.5)

    assert isinstance(results, list) and len(results) == 3
    for index, result in enumerate(results):
        _assert_matches(result, _expected(manual, index, top_k=3, threshold=0.5))


def test_model_object_defaults_and_task_filter(saved):
    folder, images, _ = saved
    model = TimmMultiTaskModel.from_pretrained(folder)
    pipe = pipeline(PIPELINE_TASK, model=model, device="cpu")  # no processor given: built from the config

    result = pipe(images[1])

    assert len(result["shape"]) == 4  # default top_k=5 is capped at the 4 classes
    assert sum(r["score"] for r in result["shape"]) == pytest.approx(1.0, abs=1e-5)
    assert all(r["score"] >= 0.5 for r in result["attrs"])
    _assert_matches(result, _expected(_manual(folder, images[1:2]), 0, top_k=5, threshold=0.5))
    assert list(pipe(images[1], tasks=["pose"])) == ["pose"]


def test_unreadable_image_is_named(saved, tmp_path):
    folder, _, _ = saved
    pipe = pipeline(PIPELINE_TASK, model=str(folder), device="cpu")
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="missing.png"):
        pipe(str(missing))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_text("not an image")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        pipe([str(corrupt)])


def test_bad_call_arguments(saved):
    folder, images, _ = saved
    pipe = pipeline(PIPELINE_TASK, model=str(folder), device="cpu")
    with pytest.raises(ValueError, match="top_k"):
        pipe(images[0], top_k=0)
    with pytest.raises(ValueError, match=r"threshold"):
        pipe(images[0], threshold=1.5)
    with pytest.raises(ValueError, match="colour"):
        pipe(images[0], tasks=["colour"])
    with pytest.raises(ValueError, match="colour"):
        pipeline(PIPELINE_TASK, model=str(folder), device="cpu", tasks=["colour"])


def test_lists_are_batched_by_default(saved):
    """No batch_size given: DEFAULT_BATCH_SIZE images per forward (transformers' default is 1), same answers."""
    from hf_tlmtl.hub.pipeline import DEFAULT_BATCH_SIZE

    folder, images, paths = saved
    pipe = pipeline(PIPELINE_TASK, model=str(folder), device="cpu")
    assert DEFAULT_BATCH_SIZE > 1 and pipe._batch_size == DEFAULT_BATCH_SIZE
    assert pipeline(PIPELINE_TASK, model=str(folder), device="cpu", batch_size=1)._batch_size == 1
    sizes = []
    hook = pipe.model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(len(kwargs["pixel_values"])),
                                                with_kwargs=True)
    try:
        batched = pipe([str(p) for p in paths] * 2)
    finally:
        hook.remove()
    assert sizes == [len(paths) * 2]  # one forward pass for the whole list
    manual = _manual(folder, images * 2)
    for index, result in enumerate(batched):
        _assert_matches(result, _expected(manual, index, top_k=5, threshold=0.5))
