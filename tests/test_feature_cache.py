"""Feature cache: heads trained on cached features equal heads trained on the fly; reuse and invalidation."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, build_transforms, cache_features, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.transfer import apply_transfer_strategy

SIZE = 32


@pytest.fixture(scope="module")
def shapes():
    return load_embedded_dataset("shapes", n_train=40, n_eval=16, image_size=SIZE, seed=0)


def _model(shapes) -> TimmMultiTaskModel:
    features = shapes["train"].features
    tasks = [
        TaskSpec(name="shape", type="classification", labels=features["shape"].names),
        TaskSpec(name="scale", type="regression"),
        TaskSpec(name="marks", type="multilabel", labels=features["marks"].feature.names),
    ]
    torch.manual_seed(0)
    return TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=SIZE)


class _ForwardCounter:
    """Counts images that went through the backbone (a real forward hook, nothing replaced)."""

    def __init__(self, model: TimmMultiTaskModel):
        self.images = 0
        model.backbone.conv1.register_forward_hook(self)  # the stem: every image passes it once

    def __call__(self, module, args, output):
        self.images += args[0].shape[0]


def test_cached_features_are_eval_mode_backbone_features(shapes, tmp_path):
    model = _model(shapes)
    model.train()
    # A prepared (augmenting) dataset: the cache ignores its augmentation and uses the eval transform.
    prepared = prepare_dataset(shapes["train"], model.config, train=True)
    cached = cache_features(model, prepared, batch_size=16, cache_dir=tmp_path)
    assert model.training, "training mode is restored"
    transform = build_transforms(model.config, train=False)
    model.eval()
    with torch.no_grad():
        expected = model.forward_features(torch.stack([transform(row["image"]) for row in shapes["train"]]))
    batch = MultiTaskCollator(model.tasks)([cached[i] for i in range(len(cached))])
    assert batch["features"].shape == (40, model.head_in_features)
    torch.testing.assert_close(batch["features"], expected, rtol=1e-5, atol=1e-5)
    assert batch["shape"].tolist() == shapes["train"]["shape"]
    assert sorted(cached[0]) == ["features", "marks", "scale", "shape"]


def test_cache_reused_when_unchanged_and_rebuilt_when_weights_change(shapes, tmp_path):
    model = _model(shapes)
    counter = _ForwardCounter(model)
    first = cache_features(model, shapes["train"], batch_size=16, cache_dir=tmp_path)
    assert counter.images == 40
    files = sorted(Path(tmp_path).glob("*.arrow"))
    assert len(files) == 1 and [f["filename"] for f in first.cache_files] == [str(files[0])]

    again = cache_features(model, shapes["train"], batch_size=16, cache_dir=tmp_path)
    assert counter.images == 40, "an unchanged model and dataset must not run the backbone again"
    assert again.cache_files == first.cache_files
    assert again._fingerprint == first._fingerprint

    # Freezing BatchNorm (feature extraction) does not change the features: same cache.
    apply_transfer_strategy(model, "feature_extraction")
    cache_features(model, shapes["train"], batch_size=16, cache_dir=tmp_path)
    assert counter.images == 40

    with torch.no_grad():
        model.backbone.conv1[0].weight.mul_(1.5)
    rebuilt = cache_features(model, shapes["train"], batch_size=16, cache_dir=tmp_path)
    assert counter.images == 80
    assert rebuilt.cache_files != first.cache_files and len(list(Path(tmp_path).glob("*.arrow"))) == 2
    old, new = np.asarray(first.with_format(None)["features"]), np.asarray(rebuilt.with_format(None)["features"])
    assert not np.allclose(old, new)

    # Other data (a subset) -> another cache file too.
    cache_features(model, shapes["train"].select(range(20)), batch_size=16, cache_dir=tmp_path)
    assert counter.images == 100


def _train(model, train, evaluation, tmp_path, name, cache):
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / name),
        transfer_strategy="feature_extraction",
        cache_features=cache,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=1e-2,
        seed=7,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    apply_transfer_strategy(model, "feature_extraction")
    trainer = MultiTaskTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=MultiTaskCollator(model.tasks)
    )
    trainer.train()
    return trainer, trainer.evaluate()


def test_heads_trained_on_cache_equal_heads_trained_on_the_fly(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model = _model(shapes)
    backbone_before = copy.deepcopy(model.backbone.state_dict())
    on_the_fly, cached = copy.deepcopy(model), copy.deepcopy(model)
    counter = _ForwardCounter(cached)

    train = prepare_dataset(shapes["train"], model.config, train=False)  # no augmentation
    evaluation = prepare_dataset(shapes["validation"], model.config, train=False)
    _, fly_metrics = _train(on_the_fly, train, evaluation, tmp_path, "fly", cache=False)
    trainer, cache_metrics = _train(cached, train, evaluation, tmp_path, "cache", cache=True)

    assert "features" in trainer.train_dataset.column_names
    assert counter.images == 40 + 16, "the backbone ran once per image, not once per epoch"
    for name in model.task_names:
        for key, value in on_the_fly.heads[name].state_dict().items():
            assert not torch.equal(value, model.heads[name].state_dict()[key]), "heads trained"
            torch.testing.assert_close(cached.heads[name].state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert cache_metrics["eval_loss"] == pytest.approx(fly_metrics["eval_loss"], rel=1e-4)
    for key, value in cached.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone_before[key])
    assert list((tmp_path / "hf_cache" / "hf_tlmtl_features").glob("features-*.arrow"))


def test_cache_features_needs_feature_extraction(shapes, tmp_path):
    # Refused when the arguments are made, before a trainer (or the model) is touched.
    with pytest.raises(ValueError, match="cache_features=True needs transfer_strategy='feature_extraction'"):
        MultiTaskTrainingArguments(
            output_dir=str(tmp_path), transfer_strategy="fine_tune", cache_features=True, report_to="none", use_cpu=True
        )
