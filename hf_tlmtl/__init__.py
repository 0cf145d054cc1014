"""hf_tlmtl: transfer learning and multi-task learning on any timm backbone, the Hugging Face way.

Importing the package registers ``TimmMultiTaskConfig`` / ``TimmMultiTaskModel`` with
``AutoConfig`` / ``AutoModel`` so saved models load without ``trust_remote_code``,
``TimmMultiTaskImageProcessor`` with ``AutoImageProcessor``, and the
``"multitask-image-classification"`` pipeline with ``transformers.pipeline``.

Example:
    >>> import hf_tlmtl, transformers
    >>> transformers.AutoConfig.for_model("timm_multitask").__class__.__name__
    'TimmMultiTaskConfig'
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from . import _moved_modules
from ._lazy import lazy_names
from .configuration import TimmMultiTaskConfig
from .hub.pipeline import PIPELINE_TASK, MultiTaskImageClassificationPipeline
from .image_processing import TimmMultiTaskImageProcessor
from .modeling import MultiTaskOutput, TimmMultiTaskModel
from .tasks import TaskSpec

# Training-time names load on first use: ``import hf_tlmtl`` for inference does not import datasets or scikit-learn.
__getattr__, __dir__ = lazy_names(__name__, {"TaskAffinityCallback": "multitask.affinity", "group_tasks": "multitask.grouping"})

__version__ = "0.1.0"

AutoConfig.register(TimmMultiTaskConfig.model_type, TimmMultiTaskConfig, exist_ok=True)
AutoModel.register(TimmMultiTaskConfig, TimmMultiTaskModel, exist_ok=True)
# One processor for both backends transformers asks for: timm's transforms (built on torchvision) take PIL images.
AutoImageProcessor.register(
    TimmMultiTaskConfig,
    image_processor_classes={"torchvision": TimmMultiTaskImageProcessor, "pil": TimmMultiTaskImageProcessor},
    exist_ok=True,
)
if PIPELINE_TASK not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=MultiTaskImageClassificationPipeline, pt_model=AutoModel, type="image"
    )
_moved_modules.install()

__all__ = [
    "MultiTaskImageClassificationPipeline",
    "MultiTaskOutput",
    "TaskAffinityCallback",
    "TaskSpec",
    "TimmMultiTaskConfig",
    "TimmMultiTaskImageProcessor",
    "TimmMultiTaskModel",
    "__version__",
    "group_tasks",
]
