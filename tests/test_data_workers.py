"""dataloader_num_workers > 0 with every data source: the prepared datasets go to worker processes pickled
(spawn / forkserver start methods), so each source's prepared dataset is pickled and read back here, and the
Trainer's own DataLoader runs with a spawned worker on a stream; an unpicklable transform is refused when the
trainer is built."""

from __future__ import annotations

import pickle

import pytest
import torch
from datasets import DatasetDict

from hf_tlmtl import TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset
from hf_tlmtl.data import load_image_dataset, load_table, resolve_tasks
from hf_tlmtl.data.streaming import load_streaming_dataset
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from recipe_utils import write_image_folder, write_image_table
from test_streaming import write_parquet_stream


def _sources(tmp_path):
    folder = write_image_folder(tmp_path / "folder", ["a", "b"], per_class=3, size=16)
    root, records = write_image_table(tmp_path / "table", rows=6, size=16)
    import pandas as pd

    pd.DataFrame(records).drop(columns=["tags"]).to_parquet(root / "t.parquet")
    return {
        "embedded": (load_image_dataset("shapes", n_train=6, n_eval=2, image_size=16), "shape"),
        "image folder": (load_image_dataset(str(folder)), "label"),
        "table": (DatasetDict({"train": load_table(root / "t.parquet", image_column="path")}), "kind"),
    }


@pytest.mark.parametrize("source", ["embedded", "image folder", "table"])
def test_prepared_datasets_of_every_source_survive_pickling(tmp_path, source):
    data, task = _sources(tmp_path)[source]
    image_column = "path" if source == "table" else "image"
    data, tasks = resolve_tasks(data, task, image_column)
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=16)
    # The eval transform, and the recipe's row-seeded augmentation: both deterministic, so copy == original.
    for train, seed in ((False, None), (True, 3)):
        prepared = prepare_dataset(data["train"], model.config, train=train, image_column=image_column, seed=seed)
        copy = pickle.loads(pickle.dumps(prepared))  # what a spawned worker holds
        a, b = copy[1], prepared[1]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a[task] == b[task]


def test_stream_trains_through_a_spawned_worker(tmp_path):
    data, tasks = load_streaming_dataset(str(write_parquet_stream(tmp_path / "s", 2, 4)), tasks="label,row")
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=16)
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "o"), report_to="none", max_steps=2, per_device_train_batch_size=2,
        dataloader_num_workers=1, dataloader_multiprocessing_context="spawn", use_cpu=True,
    )
    train = prepare_dataset(data["train"], model.config, train=True)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=train, data_collator=MultiTaskCollator(tasks))
    rows = sorted(int(v) for batch in trainer.get_train_dataloader() for v in batch["row"].tolist())
    assert rows == list(range(8))  # the worker read the whole stream, once


def test_unpicklable_transform_is_refused_when_the_trainer_is_built(tmp_path):
    data = load_image_dataset("shapes", n_train=4, n_eval=2, image_size=16)
    data, tasks = resolve_tasks(data, "shape")
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=16)
    timm_transform = build_transforms(model.config, train=False)
    train = prepare_dataset(data["train"], model.config, train=True, transform=lambda image: timm_transform(image))
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", dataloader_num_workers=2)
    with pytest.raises(ValueError, match="dataloader_num_workers=2 sends train_dataset's transform .* does not .*lambda"):
        MultiTaskTrainer(model=model, args=args, train_dataset=train, data_collator=MultiTaskCollator(tasks))
    args.dataloader_num_workers = 0
    MultiTaskTrainer(model=model, args=args, train_dataset=train, data_collator=MultiTaskCollator(tasks))  # in-process: fine
