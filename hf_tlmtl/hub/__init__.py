"""Sharing on the Hugging Face Hub: model cards, adapter cards, one-commit uploads, and the pipeline.

- :mod:`~hf_tlmtl.hub.cards`: :func:`create_model_card` (metadata with a ``model-index`` per task and metric, and
  a body from the packaged template) and :func:`metrics_from_card`.
- :mod:`~hf_tlmtl.hub.adapter_card`: :func:`create_adapter_card` for a PEFT adapter saved on its own.
- :mod:`~hf_tlmtl.hub.push`: :func:`push_model_to_hub` (a saved folder and its adapters, one commit) and
  :func:`check_can_push` (before training, that the upload at the end can work).
- :mod:`~hf_tlmtl.hub.pipeline`: the ``"multitask-image-classification"`` pipeline.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.hub import create_model_card, metrics_from_card
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> metrics_from_card(create_model_card(model, metrics={"y": {"mae": 0.5}}, dataset="shapes"))
    {'y': {'mae': 0.5}}
"""

from .._lazy import lazy_names

_HOMES = {
    "create_adapter_card": "adapter_card",
    **dict.fromkeys(
        ["ADAPTER_CARD_TEMPLATE", "ADAPTER_CONFIG_NAME", "ADAPTER_TAGS", "CARD_NAME", "CARD_TAGS", "LIBRARY_NAME",
         "MODEL_CARD_TEMPLATE", "PIPELINE_TAG", "base_model_id", "create_model_card", "metrics_from_card",
         "normalize_metrics", "template_path"],
        "cards",
    ),
    **dict.fromkeys(["PIPELINE_TASK", "MultiTaskImageClassificationPipeline"], "pipeline"),
    **dict.fromkeys(["DEFAULT_IGNORE_PATTERNS", "PushToHubError", "check_can_push", "push_model_to_hub"], "push"),
}
# Loaded on first use: the pipeline (imported by ``import hf_tlmtl``) must not pull in the cards' scikit-learn.
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
__all__ = sorted(_HOMES)
