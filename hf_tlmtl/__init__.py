"""hf_tlmtl: transfer learning and multi-task learning on any timm backbone, the Hugging Face way.

Importing the package registers ``TimmMultiTaskConfig`` / ``TimmMultiTaskModel`` with
``AutoConfig`` / ``AutoModel`` so saved models load without ``trust_remote_code``.

Example:
    >>> import hf_tlmtl, transformers
    >>> transformers.AutoConfig.for_model("timm_multitask").__class__.__name__
    'TimmMultiTaskConfig'
"""

from transformers import AutoConfig, AutoModel

from .configuration import TimmMultiTaskConfig
from .modeling import MultiTaskOutput, TimmMultiTaskModel
from .tasks import TaskSpec

__version__ = "0.1.0"

AutoConfig.register(TimmMultiTaskConfig.model_type, TimmMultiTaskConfig, exist_ok=True)
AutoModel.register(TimmMultiTaskConfig, TimmMultiTaskModel, exist_ok=True)

__all__ = ["MultiTaskOutput", "TaskSpec", "TimmMultiTaskConfig", "TimmMultiTaskModel", "__version__"]
