"""Sharing on the Hugging Face Hub: model cards, adapter cards, one-commit uploads, and the pipeline.

- :func:`create_model_card` renders the packaged Jinja template ``hf_tlmtl/model_cards/model_card.md``
  with ``huggingface_hub.ModelCard``: YAML metadata (license, ``library_name: transformers``,
  tags, ``base_model``, datasets, ``pipeline_tag``, a ``model-index`` with one entry per task
  and metric) and a body (backbone, parameters, tasks, transfer, hyperparameters, results,
  ``delta_m``, training curves, usage, limitations).
- :func:`create_adapter_card` writes a card for a PEFT adapter saved on its own, naming its base model.
- :func:`push_model_to_hub` uploads a saved model folder (weights, config, preprocessor config,
  card, curves) and its adapters in one commit; :func:`metrics_from_card` reads the per-task
  metrics back from a card's ``model-index``; :func:`check_can_push` checks, before training, that an upload can work.

``library_name`` is ``transformers``: the model loads with ``AutoModel`` (after ``import
hf_tlmtl``), which is what the Hub's "Use this model" snippet shows for that library; ``timm``
would advertise ``timm.create_model("hf-hub:...")``, which cannot load the task heads.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> model = TimmMultiTaskModel.from_backbone(
    ...     "test_resnet", [TaskSpec(name="shape", type="classification", labels=["square", "circle"])])
    >>> card = create_model_card(model, metrics={"shape": {"accuracy": 0.75}}, dataset="shapes")
    >>> metrics_from_card(card)
    {'shape': {'accuracy': 0.75}}
    >>> card.data.library_name, card.data.pipeline_tag
    ('transformers', 'image-classification')
"""

from .adapter_card import create_adapter_card
from .cards import (
    ADAPTER_CARD_TEMPLATE,
    ADAPTER_CONFIG_NAME,
    ADAPTER_TAGS,
    CARD_NAME,
    CARD_TAGS,
    LIBRARY_NAME,
    MODEL_CARD_TEMPLATE,
    PIPELINE_TAG,
    base_model_id,
    create_model_card,
    metrics_from_card,
    normalize_metrics,
    template_path,
)
from .pipeline import PIPELINE_TASK, MultiTaskImageClassificationPipeline
from .push import DEFAULT_IGNORE_PATTERNS, PushToHubError, check_can_push, push_model_to_hub

__all__ = [
    "ADAPTER_CARD_TEMPLATE",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_TAGS",
    "CARD_NAME",
    "CARD_TAGS",
    "DEFAULT_IGNORE_PATTERNS",
    "LIBRARY_NAME",
    "MODEL_CARD_TEMPLATE",
    "PIPELINE_TAG",
    "PIPELINE_TASK",
    "MultiTaskImageClassificationPipeline",
    "PushToHubError",
    "base_model_id",
    "check_can_push",
    "create_adapter_card",
    "create_model_card",
    "metrics_from_card",
    "normalize_metrics",
    "push_model_to_hub",
    "template_path",
]
