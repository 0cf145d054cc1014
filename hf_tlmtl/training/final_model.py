"""The trained model saved as a model folder that ``transformers.AutoModel`` loads (after ``import hf_tlmtl``).

:func:`save_final_model`: a full model as the Trainer saves it; a peft model (``--transfer_strategy lora``
and the other adapters) merged into its base, with the adapter alone kept in ``adapter/``. Under FSDP the
weights are gathered from the shards first.

Example:
    >>> import tempfile
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> args = MultiTaskTrainingArguments(tempfile.mkdtemp(), transfer_strategy="lora", report_to="none")
    >>> trainer = MultiTaskTrainer(model=model, args=args)
    >>> merged = save_final_model(trainer)
    >>> sorted(p.name for p in Path(args.output_dir).iterdir())
    ['adapter', 'config.json', 'model.safetensors', 'preprocessor_config.json']
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapters import merge_adapter, unsharded_copy
from ..backbone.unwrap import is_peft_model
from .distributed import full_state_dict
from .output_dir import ADAPTER_DIR
from .trainer import MultiTaskTrainer


def save_final_model(trainer: MultiTaskTrainer) -> nn.Module | None:
    """The trained model into ``trainer.args.output_dir``; returns the model saved (merged, for a peft model).

    A peft model is saved merged, its adapter in ``output_dir/adapter``. Under FSDP a peft model is gathered
    from the shards (every process takes part) and saved from a one-process copy on the process that saves;
    the others get None.
    """
    model = trainer.model
    out = Path(trainer.args.output_dir)
    if not is_peft_model(model):
        trainer.save_model()
        return model
    if trainer.is_fsdp_enabled:
        # peft's save and the merge read the weights' storage, which FSDP2 frees: work on a whole copy instead.
        state_dict = full_state_dict(trainer.accelerator, model)  # a collective: every process gathers
        if not trainer.args.should_save:
            return None
        model = unsharded_copy(model, state_dict)
    if trainer.args.should_save:
        model.save_pretrained(out / ADAPTER_DIR)
    merged = merge_adapter(model)  # peft's merge_and_unload alone fails on loha / lokr / ia3 heads
    if trainer.args.should_save:
        merged.save_pretrained(out)
    return merged


__all__ = ["save_final_model"]
