"""Training with ``transformers.Trainer``: arguments, the multi-task trainer, its checkpoints, and runs past one process.

- :mod:`~hf_tlmtl.training.arguments`: :class:`MultiTaskTrainingArguments`.
- :mod:`~hf_tlmtl.training.trainer`: :class:`MultiTaskTrainer` (loss balancing, LLRD optimizer, per-task logs and metrics).
- :mod:`~hf_tlmtl.training.balancer_state`: the balancer's state in checkpoints.
- :mod:`~hf_tlmtl.training.distributed`: FSDP2 on CPU, what sharding refuses, gathering the full model.
- :mod:`~hf_tlmtl.training.run_folder` and :mod:`~hf_tlmtl.training.cli`: what the recipes share: an output
  folder set aside and restored, YAML + command-line parsing with clear errors.
- :mod:`~hf_tlmtl.training.experiment`: what the experiments that compare training setups share: one run's
  arguments, one model trained and evaluated.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> args = MultiTaskTrainingArguments(output_dir="/tmp/hf_tlmtl_doctest", report_to="none")
    >>> trainer = MultiTaskTrainer(model=model, args=args)
    >>> trainer.args.label_names
    ['y']
"""

from .arguments import MultiTaskTrainingArguments
from .trainer import MultiTaskTrainer

__all__ = ["MultiTaskTrainer", "MultiTaskTrainingArguments"]
