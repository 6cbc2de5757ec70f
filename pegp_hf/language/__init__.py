"""Continual instruction tuning of chat language models: instruction tasks from labelled text
(:mod:`~pegp_hf.language.tasks`), the instruction objective (:mod:`~pegp_hf.language.objective`) and the measures of
answers and general ability (:mod:`~pegp_hf.language.evaluators`)."""

from pegp_hf.language.evaluators import (
    GENERAL_INSTRUCTIONS,
    GeneralAbilityEvaluator,
    InstructionEvaluator,
    greedy_answers,
    left_padded,
    score_options,
)
from pegp_hf.language.objective import InstructionObjective
from pegp_hf.language.tasks import SYSTEM_MESSAGE, InstructionRenderer, LabelledText, class_subsets, instruction_tasks

__all__ = [
    "GENERAL_INSTRUCTIONS",
    "SYSTEM_MESSAGE",
    "GeneralAbilityEvaluator",
    "InstructionEvaluator",
    "InstructionObjective",
    "InstructionRenderer",
    "LabelledText",
    "class_subsets",
    "greedy_answers",
    "instruction_tasks",
    "left_padded",
    "score_options",
]
