"""pegp_hf: continual parameter-efficient tuning with PEGP gradient projection, as a Hugging Face Trainer."""

from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.data import (
    ContinualTask,
    TaskSequence,
    class_incremental_tasks,
    domain_incremental_tasks,
    online_tasks,
    task_incremental_tasks,
)
from pegp_hf.metrics import average_accuracy, backward_transfer, forgetting, summarize
from pegp_hf.projection import GradientProjector
from pegp_hf.trainer import ContinualPEGPTrainer

__version__ = "0.1.0"

__all__ = [
    "ContinualPEGPTrainer",
    "PEGPTrainingArguments",
    "ContinualTask",
    "TaskSequence",
    "class_incremental_tasks",
    "task_incremental_tasks",
    "domain_incremental_tasks",
    "online_tasks",
    "GradientProjector",
    "average_accuracy",
    "forgetting",
    "backward_transfer",
    "summarize",
]
