"""A short real training run on embedded shapes, with the stock transformers Trainer."""

import torch
import transformers

from hf_tlmtl import TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.data import infer_tasks


def test_stock_trainer_lowers_training_loss_on_embedded_shapes(tmp_path):
    data = load_embedded_dataset("shapes", n_train=192, n_eval=32, image_size=32, seed=0)
    tasks = infer_tasks(data["train"].features, names=["shape", "color", "scale"])
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", tasks=tasks, image_size=32)
    train = prepare_dataset(data["train"], model.config, train=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=6,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        logging_steps=6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,  # the lazy transform reads the raw image column
        label_names=model.task_names,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=MultiTaskCollator(tasks))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6
    assert losses[-1] < 0.75 * losses[0], losses
