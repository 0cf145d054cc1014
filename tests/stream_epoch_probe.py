"""Launched by test_streaming.py under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo).

Each process builds the recipe's streaming pipeline on a Parquet folder (load_streaming_dataset ->
prepare_dataset -> MultiTaskTrainer's own train dataloader, with the recipe's choice of per-process
reading or dispatch) and reads one pass of the stream; the float column ``row`` is a regression task, so
the collated batches carry each row's id. Usage: ``stream_epoch_probe.py OUT FOLDER...``; writes ``OUT/<folder name>_rank<k>.json``: the ids this process trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_tlmtl import TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data.streaming import load_streaming_dataset, read_per_process
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments


def one_pass(folder: str, out: str) -> None:
    data, tasks = load_streaming_dataset(folder, tasks="label,row")
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=16)
    args = MultiTaskTrainingArguments(output_dir=out, use_cpu=True, report_to="none", max_steps=100,
                                      per_device_train_batch_size=3, dataloader_pin_memory=False)
    args.accelerator_config.dispatch_batches = not read_per_process(data["train"], args.world_size)
    train = prepare_dataset(data["train"], model.config, train=False)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=train, data_collator=MultiTaskCollator(model.tasks))
    seen = [int(v) for batch in trainer.get_train_dataloader() for v in batch["row"].tolist()]
    record = {"rows": seen, "dispatch": args.accelerator_config.dispatch_batches, "world_size": args.world_size}
    Path(out, f"{Path(folder).name}_rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    for folder in sys.argv[2:]:  # one Trainer (and accelerator) per stream, in the same 2 processes
        one_pass(folder, sys.argv[1])
