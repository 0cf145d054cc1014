"""Training with ``transformers.Trainer``: arguments, the multi-task trainer, its checkpoints, and runs past one process.

- :mod:`~hf_tlmtl.training.arguments`: :class:`MultiTaskTrainingArguments`.
- :mod:`~hf_tlmtl.training.trainer`: :class:`MultiTaskTrainer` (loss balancing, LLRD optimizer, per-task logs and metrics).
- :mod:`~hf_tlmtl.training.balancer_state`: the balancer's state in checkpoints.
- :mod:`~hf_tlmtl.training.distributed`: FSDP2 on CPU, what sharding refuses, gathering the full model.
- What a training recipe is made of, one idea per module: :mod:`~hf_tlmtl.training.cli` (YAML + command line,
  one-line errors), :mod:`~hf_tlmtl.training.output_dir` (the output folder's checks and resume),
  :mod:`~hf_tlmtl.training.run_folder` (a previous run set aside and restored), :mod:`~hf_tlmtl.training.model_setup`
  (the model from the model arguments), :mod:`~hf_tlmtl.training.plan` (the plan printed before training),
  :mod:`~hf_tlmtl.training.final_model` (the trained model saved, adapters merged) and
  :mod:`~hf_tlmtl.training.summary` (``training_summary.json`` and the printed results).
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
