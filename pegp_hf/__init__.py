"""pegp_hf: continual parameter-efficient tuning with PEGP gradient projection, as a Hugging Face Trainer.

The layers, each importing only the ones above it:

- :mod:`pegp_hf.core`: the method on tensors and modules (subspaces, protected tensors, capture, projector);
- :mod:`pegp_hf.tuners`: PET methods, each registered with what it protects (PEFT LoRA / IA3, prompts, prefixes,
  bottleneck adapters);
- :mod:`pegp_hf.continual`: the protocol (tasks, objectives, heads, evaluators, results, task-level callbacks);
- :mod:`pegp_hf.io`: checkpoints, model cards, the Hub, loading a checkpoint for inference;
- :class:`ContinualPEGPTrainer` (:mod:`pegp_hf.trainer`) and :class:`PEGPTrainingArguments` (:mod:`pegp_hf.config`);
- :mod:`pegp_hf.multimodal` (CLIP), :mod:`pegp_hf.offline` (embedded models and data), :mod:`pegp_hf.experiments`
  (what the recipes and benchmarks share).
"""

from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.continual import (
    ClassificationObjective,
    ContinualCallback,
    ContinualEvaluator,
    ContinualObjective,
    ContinualResults,
    ContinualTask,
    Evaluation,
    MatrixSpec,
    ModelLossObjective,
    TaskLossEvaluator,
    TaskSequence,
    average_accuracy,
    backward_transfer,
    class_incremental_tasks,
    dataset_tasks,
    domain_incremental_tasks,
    forgetting,
    online_tasks,
    summarize,
    task_incremental_tasks,
)
from pegp_hf.core import GradientProjector, NonFiniteError
from pegp_hf.io.loading import ContinualModel
from pegp_hf.trainer import ContinualPEGPTrainer

__version__ = "0.1.0"

__all__ = [
    "ClassificationObjective",
    "ContinualCallback",
    "ContinualEvaluator",
    "ContinualModel",
    "ContinualObjective",
    "ContinualPEGPTrainer",
    "ContinualResults",
    "ContinualTask",
    "Evaluation",
    "GradientProjector",
    "MatrixSpec",
    "ModelLossObjective",
    "NonFiniteError",
    "PEGPTrainingArguments",
    "TaskLossEvaluator",
    "TaskSequence",
    "average_accuracy",
    "backward_transfer",
    "class_incremental_tasks",
    "dataset_tasks",
    "domain_incremental_tasks",
    "forgetting",
    "online_tasks",
    "summarize",
    "task_incremental_tasks",
]
