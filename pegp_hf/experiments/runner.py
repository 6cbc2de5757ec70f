"""What every experiment shares: its argument parser with the experiment's defaults, and the loop that runs several
methods (``pegp``, ``sequential``, ``head_only``) on the same task sequence and keeps their results."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from datasets import Dataset
from transformers import HfArgumentParser, TrainingArguments

from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.continual.evaluators import ContinualEvaluator
from pegp_hf.continual.objectives import ContinualObjective
from pegp_hf.continual.tasks import TaskSequence
from pegp_hf.trainer import ContinualPEGPTrainer


def parse_with_defaults(
    dataclass_types: Sequence[type], defaults: Mapping[str, Any], argv: Sequence[str] | None
) -> tuple[Any, ...]:
    """``HfArgumentParser(dataclass_types)`` whose defaults are first replaced by ``defaults`` (so ``--help`` shows
    them), then by the values of ``--config <file.yaml>`` if given (as TRL's parser: a mapping of flag names without
    ``--`` to values), then ``argv`` parsed into the dataclasses (``None``: the command line); a flag given on the
    command line wins over both.

    Raises:
        ValueError: a config file that is missing, not a YAML mapping, or names flags the parser does not have.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(list(dataclass_types))
    parser.add_argument("--config", default=None, help="A YAML file of flags (name: value, as TRL's --config): its "
                        "values replace this recipe's defaults; flags on the command line win.")  # fmt: skip
    values = dict(defaults)
    config = _flag_value(argv, "--config")
    if config is not None:
        values.update(read_config(config, {action.dest for action in parser._actions} - {"help", "config"}))
        lists = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
        values = {key: [value] if key in lists and not isinstance(value, list) else value
                  for key, value in values.items()}  # fmt: skip
    parser.set_defaults(**values)
    return tuple(parser.parse_args_into_dataclasses(args=argv)[: len(dataclass_types)])


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``; the last one wins), else ``None``."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token[len(flag) + 1 :]
    return value


def read_config(path: str | Path, known: set[str]) -> dict[str, Any]:
    """The flags of a recipe's YAML config file: a mapping whose keys are among ``known`` (flag names, no ``--``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path} names flags this recipe does not have: {unknown} (see --help)")
    return values


def require_matplotlib(plots: bool) -> None:
    """Before a recipe trains: its plots need matplotlib (the ``recipes`` extra), so say so now, not after training."""
    if plots and importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the plots need matplotlib: pip install 'pegp_hf[recipes]', or pass --plots false")


def setup_logging(args: TrainingArguments) -> None:
    """Logging as in the HF example scripts: one handler on stdout, and transformers, datasets and pegp_hf at this
    process's level (``--log_level`` on the main process, ``--log_level_replica`` on the others; the default
    ``passive`` keeps transformers' own verbosity, warning)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])  # fmt: skip
    level = args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    logging.getLogger("pegp_hf").setLevel(level)


def run_methods(
    tasks: TaskSequence,
    model_init: Callable[[PEGPTrainingArguments], torch.nn.Module],
    args: PEGPTrainingArguments,
    methods: Sequence[str],
    describe: Mapping[str, Any],
    resume: str | bool | None = None,
    evaluators_init: Callable[[], list[ContinualEvaluator]] = list,
    callbacks: Sequence[Any] = (),
    objective_init: Callable[[], ContinualObjective] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    reference_dataset: Dataset | None = None,
) -> dict[str, dict[str, Any]]:
    """Train a fresh model per method on ``tasks`` and return ``{method: results}``.

    Each method runs with ``args`` except ``method`` and ``output_dir = <output_dir>/<method>`` (and, when pushing
    several, ``hub_model_id = <id>-<method>``). Its results are ``describe`` (what the experiment is), the task
    classes, the process count and :meth:`~pegp_hf.ContinualPEGPTrainer.continual_results`; the main process writes
    them to ``<output_dir>/<method>/results.json`` and all of them to ``<output_dir>/results.json``.

    Args:
        model_init: ``args -> model with its PET``, called once per method (seed it inside for equal starts).
        resume: ``True`` (or the command line's ``"true"``) resumes every method from its own newest ``task-<k>``; a
            path or Hub repo id belongs to one method.
        evaluators_init: a fresh list of extra evaluators per method.
        callbacks: passed to every trainer.
        objective_init: a fresh objective per method (``None``: the trainer's default).
        trainer_kwargs: more keyword arguments of every trainer (``data_collator``, ...).
        reference_dataset: the ``pegp`` trainer's reference set (the other methods protect nothing).
    """
    if isinstance(resume, str) and resume.lower() in ("true", "1", "yes"):
        resume = True
    if resume not in (None, True) and len(methods) > 1:
        raise ValueError("a checkpoint path belongs to one method: run a single method, or resume with 'true'")
    root = Path(args.output_dir)
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        run_name = f"{args.run_name}-{method}" if args.run_name else method  # one tracker run per method
        method_args = dataclasses.replace(args, method=method, output_dir=str(root / method), run_name=run_name)
        if args.push_to_hub and args.hub_model_id and len(methods) > 1:
            method_args = dataclasses.replace(method_args, hub_model_id=f"{args.hub_model_id}-{method}")
        trainer = ContinualPEGPTrainer(
            model=model_init(method_args),
            args=method_args,
            tasks=tasks,
            objective=None if objective_init is None else objective_init(),
            evaluators=evaluators_init(),
            callbacks=list(callbacks),
            reference_dataset=reference_dataset if method == "pegp" else None,
            **(trainer_kwargs or {}),
        )
        trainer.train(resume_from_checkpoint=resume)
        end_tracker_runs(trainer.args)
        results = {"method": method, **describe, "task_classes": tasks.task_classes,
                   "num_processes": trainer.accelerator.num_processes, **trainer.continual_results()}  # fmt: skip
        if trainer.args.should_save:
            (root / method / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        summary[method] = results
    if args.should_save:
        root.mkdir(parents=True, exist_ok=True)
        (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def end_tracker_runs(args: TrainingArguments) -> None:
    """Close the tracker runs that outlive a Trainer, so that the next method of the same process gets its own:
    W&B keeps one run per process open (TensorBoard writes under each method's ``output_dir`` already)."""
    if "wandb" in args.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def format_matrix(matrix: list[list[float | None]]) -> str:
    """A ``T x T`` matrix as text: rows are tasks, columns "after task t", ``-`` where not measured."""
    size = len(matrix)
    lines = ["task  " + "".join(f"  after {t + 1:<3d}" for t in range(size))]
    for i, row in enumerate(matrix):
        lines.append(f"{i + 1:<6d}" + "".join("        -  " if v is None else f"{v:10.1f} " for v in row))
    return "\n".join(lines)
