"""What a continual run measured, as a typed object: matrices by name, per-task figures, timings and updates.

A matrix ``A[i, t]`` holds a measure of task ``i`` after training task ``t`` (``T x T``, NaN until measured):
accuracies in percent, or a loss (``higher_is_better=False``). Every evaluator fills its own matrices; one of them,
chosen by the objective, is the **headline** the run is judged by. :meth:`ContinualResults.to_dict` is the JSON form
that ``continual_results()``, ``pegp_state.json`` and ``results.json`` hold; :meth:`ContinualResults.restore` reads it
back on resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pegp_hf.continual.metrics import average_accuracy, backward_transfer, forgetting

# Top-level keys of the JSON form (and of ``continual_results()``), which no matrix may take as its name.
RESERVED = (
    "scenario", "finished_tasks", "headline", "average", "forgetting", "bwt", "accuracy_matrix", "acc",
    "initial_metrics", "task_metrics", "timings", "updates", "objective", "head", "loss_classes", "subspace_dims",
    "saturated", "protected_share",
)  # fmt: skip


@dataclass(frozen=True)
class MatrixSpec:
    """A matrix an evaluator fills: its name, and whether higher values are better (accuracies) or lower (losses)."""

    name: str
    higher_is_better: bool = True


@dataclass
class ContinualMatrix:
    """``values`` ``(T, T)`` float64, NaN where not measured; ``higher_is_better`` decides the sign of Forgetting and
    BWT (see :mod:`pegp_hf.continual.metrics`)."""

    values: np.ndarray
    higher_is_better: bool = True

    def summary(self, done: int) -> dict[str, float]:
        """``average`` (mean of column ``done - 1``), ``forgetting`` and ``bwt`` over the first ``done`` tasks;
        empty when ``done`` is 0."""
        if done == 0:
            return {}
        block = self.values[:done, :done]
        return {
            "average": average_accuracy(block),
            "forgetting": forgetting(block, self.higher_is_better),
            "bwt": backward_transfer(block, self.higher_is_better),
        }

    def to_dict(self, done: int) -> dict[str, Any]:
        matrix = [[None if np.isnan(v) else float(v) for v in row] for row in self.values]
        return {"matrix": matrix, "higher_is_better": self.higher_is_better, **self.summary(done)}


@dataclass
class ContinualResults:
    """Everything measured so far in one task sequence.

    Attributes:
        scenario: the task sequence's scenario.
        headline: the name of the matrix the run is judged by.
        matrices: every evaluator's matrices by name.
        initial_metrics: evaluators' figures before the first task (e.g. zero-shot accuracy).
        task_metrics: per finished task, the evaluators' figures (``None`` where undefined).
        timings: per finished task, ``train_seconds``, ``capture_seconds``, ``eval_seconds`` and
            ``optimizer_steps`` (which the logs' step axis adds up across tasks).
        updates: per finished task, ``max_update_overlap`` (the largest ``max |delta W U|`` of its optimizer steps)
            and ``max_update`` (the largest ``|delta W|``), ``None`` while no basis exists.
    """

    scenario: str
    headline: str
    matrices: dict[str, ContinualMatrix]
    initial_metrics: dict[str, float] = field(default_factory=dict)
    task_metrics: list[dict[str, float | None]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    updates: list[dict[str, float | None]] = field(default_factory=list)

    @classmethod
    def empty(cls, scenario: str, headline: str, specs: Sequence[MatrixSpec], num_tasks: int) -> ContinualResults:
        """NaN matrices of ``num_tasks x num_tasks`` for ``specs``.

        Raises:
            ValueError: two matrices share a name, or ``headline`` is none of them.
        """
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two evaluators' matrices share a name: {names}")
        taken = sorted(set(names) & set(RESERVED))
        if taken:
            raise ValueError(f"matrix names {taken} are taken by the results themselves: rename the matrices")
        if headline not in names:
            raise ValueError(f"the headline matrix {headline!r} is not measured by any evaluator ({names})")
        matrices = {
            spec.name: ContinualMatrix(np.full((num_tasks, num_tasks), np.nan), spec.higher_is_better) for spec in specs
        }
        return cls(scenario, headline, matrices)

    @property
    def finished_tasks(self) -> int:
        return len(self.timings)

    def record_task(
        self,
        index: int,
        columns: Mapping[str, Sequence[float]],
        scalars: Mapping[str, float | None],
        timing: Mapping[str, float],
        update: Mapping[str, float | None],
    ) -> None:
        """Store what was measured after task ``index``: column ``index`` of each matrix (rows ``0 .. index``), the
        figures, timing and update record.

        Raises:
            ValueError: ``index`` is not the next task, or a matrix column is missing or of the wrong length.
        """
        if index != self.finished_tasks:
            raise ValueError(f"task {index + 1} recorded after {self.finished_tasks} finished tasks")
        for name, matrix in self.matrices.items():
            column = columns.get(name)
            if column is None or len(column) != index + 1:
                raise ValueError(f"matrix {name!r} needs {index + 1} values after task {index + 1}, got {column}")
            matrix.values[: index + 1, index] = column
        self.task_metrics.append(dict(scalars))
        self.timings.append(dict(timing))
        self.updates.append(dict(update))

    def summary(self, name: str | None = None) -> dict[str, float]:
        """``average`` / ``forgetting`` / ``bwt`` of matrix ``name`` (default the headline) over the finished
        tasks."""
        return self.matrices[name or self.headline].summary(self.finished_tasks)

    def task_log(self, index: int) -> dict[str, float]:
        """What the trainer logs after task ``index``: ``task``, the headline's ``continual_average``,
        ``continual_forgetting`` and ``continual_bwt``, ``<matrix>_average`` / ``<matrix>_forgetting`` of every
        matrix, the column ``index`` of every matrix as ``<matrix>/task_<i>`` (``A[i, index]`` for each task ``i``
        so far, 1-based: over the sequence, each is the curve of one task), and the task's figures that are
        defined."""
        headline = self.summary()
        logs = {"task": index + 1, "continual_average": headline["average"],
                "continual_forgetting": headline["forgetting"], "continual_bwt": headline["bwt"]}  # fmt: skip
        for name, matrix in self.matrices.items():
            summary = self.summary(name)
            logs.update({f"{name}_average": summary["average"], f"{name}_forgetting": summary["forgetting"]})
            column = matrix.values[: index + 1, index]
            logs.update({f"{name}/task_{i + 1}": float(v) for i, v in enumerate(column) if not np.isnan(v)})
        return {**logs, **{key: value for key, value in self.task_metrics[index].items() if value is not None}}

    def describe(self, index: int) -> str:
        """One readable line after task ``index``: every matrix's average and Forgetting, the headline first, then
        the task's figures."""
        names = [self.headline, *(name for name in self.matrices if name != self.headline)]
        parts = [f"{name} {self.summary(name)['average']:.2f} (Forgetting {self.summary(name)['forgetting']:.2f})"
                 for name in names]  # fmt: skip
        figures = [f"{key} {value:.2f}" for key, value in self.task_metrics[index].items() if value is not None]
        return " | ".join(parts + figures)

    def headline_figures(self) -> dict[str, Any]:
        """The headline's ``average``, ``forgetting`` and ``bwt`` (NaN before the first task is finished); for an
        accuracy headline (higher is better) also ``acc`` (= ``average``) and ``accuracy_matrix``, the names of the
        paper's metrics."""
        block = self.matrices[self.headline].to_dict(self.finished_tasks)
        figures = {key: block.get(key, math.nan) for key in ("average", "forgetting", "bwt")}
        if block["higher_is_better"]:
            figures.update(acc=figures["average"], accuracy_matrix=block["matrix"])
        return figures

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the scenario, the finished task count, the ``headline`` name and :meth:`headline_figures`,
        one block per matrix (``matrix``, ``higher_is_better``, ``average``, ``forgetting``, ``bwt``), then the
        figures, timings and updates."""
        done = self.finished_tasks
        return {
            "scenario": self.scenario,
            "finished_tasks": done,
            "headline": self.headline,
            **self.headline_figures(),
            **{name: matrix.to_dict(done) for name, matrix in self.matrices.items()},
            "initial_metrics": self.initial_metrics,
            "task_metrics": self.task_metrics[:done],
            "timings": self.timings,
            "updates": self.updates,
        }

    def restore(self, stored: Mapping[str, Any], done: int) -> ContinualResults:
        """The results of the first ``done`` tasks in ``stored`` (a :meth:`to_dict`), with this object's matrices.

        Raises:
            ValueError: ``stored`` lacks one of this run's matrices, or records fewer than ``done`` tasks.
        """
        missing = [name for name in self.matrices if name not in stored]
        if missing:
            raise ValueError(f"no {missing} matrices are stored: the checkpoint was made without the same evaluators")
        if len(stored["timings"]) < done:
            raise ValueError(f"the stored results record {len(stored['timings'])} tasks, not {done}")
        size = len(next(iter(self.matrices.values())).values)
        restored = ContinualResults.empty(
            self.scenario,
            self.headline,
            [MatrixSpec(name, matrix.higher_is_better) for name, matrix in self.matrices.items()],
            size,
        )
        for name, matrix in restored.matrices.items():
            try:
                values = np.array(stored[name]["matrix"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"results.{name}.matrix is not a matrix of numbers: {error}") from error
            if values.ndim != 2 or min(values.shape) < done:
                raise ValueError(f"results.{name}.matrix has shape {values.shape}; {done} finished tasks need "
                                 f"({done}, {done}) at least")  # fmt: skip
            measured = values[:done, :done][np.triu_indices(done)]
            if not np.isfinite(measured).all():
                raise ValueError(f"results.{name}.matrix lacks a value measured after one of the {done} finished tasks")
            matrix.values[:done, :done] = values[:done, :done]
        restored.initial_metrics = dict(stored.get("initial_metrics", {}))
        restored.task_metrics = list(stored["task_metrics"])[:done]
        restored.timings = list(stored["timings"])[:done]
        restored.updates = list(stored["updates"])[:done]
        return restored
