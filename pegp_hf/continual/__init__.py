"""The continual protocol around the method: tasks, objectives, heads, evaluators, results and task-level events.

- :mod:`~pegp_hf.continual.tasks`: :class:`TaskSequence` and its builders;
- :mod:`~pegp_hf.continual.objectives`: :class:`ContinualObjective` (how tasks are trained and judged) and
  :class:`ModelLossObjective`; :mod:`~pegp_hf.continual.classification`: :class:`ClassificationObjective`;
- :mod:`~pegp_hf.continual.heads`: class statistics and the prototype / aligned heads;
- :mod:`~pegp_hf.continual.named`: benchmarks by name (Split CIFAR-100, ImageNet-R, CUB-200, the five text data
  sets) with the literature's class orders;
- :mod:`~pegp_hf.continual.evaluators`: :class:`ContinualEvaluator`, :class:`TaskLossEvaluator`;
- :mod:`~pegp_hf.continual.results`: :class:`ContinualResults`, typed;
- :mod:`~pegp_hf.continual.metrics`: ACC, Forgetting, BWT, FWT, intransigence; ``CONTINUAL_ACCURACY``, the path of
  the same metrics as an ``evaluate`` module (``evaluate.load(CONTINUAL_ACCURACY)``, offline);
- :mod:`~pegp_hf.continual.callbacks`: :class:`ContinualCallback`, the task events.
"""

from pathlib import Path

from pegp_hf.continual.callbacks import ContinualCallback
from pegp_hf.continual.classification import ClassificationAccuracy, ClassificationObjective
from pegp_hf.continual.evaluators import ContinualEvaluator, Evaluation, TaskLossEvaluator
from pegp_hf.continual.heads import HEADS, ClassStatistics
from pegp_hf.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    intransigence,
    summarize,
)
from pegp_hf.continual.named import five_datasets_text, named_image_tasks
from pegp_hf.continual.objectives import ContinualObjective, ModelLossObjective
from pegp_hf.continual.results import ContinualMatrix, ContinualResults, MatrixSpec
from pegp_hf.continual.tasks import (
    SCENARIOS,
    ContinualTask,
    TaskSequence,
    class_incremental_tasks,
    dataset_tasks,
    domain_incremental_tasks,
    make_tasks,
    online_tasks,
    split_per_class,
    task_incremental_tasks,
)

CONTINUAL_ACCURACY = str(Path(__file__).with_name("continual_accuracy.py"))

__all__ = [
    "CONTINUAL_ACCURACY",
    "HEADS",
    "SCENARIOS",
    "ClassificationAccuracy",
    "ClassStatistics",
    "ClassificationObjective",
    "ContinualCallback",
    "ContinualEvaluator",
    "ContinualMatrix",
    "ContinualObjective",
    "ContinualResults",
    "ContinualTask",
    "Evaluation",
    "MatrixSpec",
    "ModelLossObjective",
    "TaskLossEvaluator",
    "TaskSequence",
    "average_accuracy",
    "backward_transfer",
    "class_incremental_tasks",
    "dataset_tasks",
    "domain_incremental_tasks",
    "forgetting",
    "five_datasets_text",
    "forward_transfer",
    "intransigence",
    "make_tasks",
    "named_image_tasks",
    "online_tasks",
    "split_per_class",
    "summarize",
    "task_incremental_tasks",
]
