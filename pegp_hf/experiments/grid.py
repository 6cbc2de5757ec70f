"""Running a grid of experiments (the benchmarks): the grid's own flags apart from the experiment's, reading back
the runs an interrupted grid finished, and the cells of its tables."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def split_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[own flags] -- [experiment flags]`` -> ``(own, experiment)``; without ``--`` every flag is the grid's own."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def finished(output_dir: str | Path) -> dict[str, Any] | None:
    """The summary a finished run left in ``output_dir`` (:func:`~pegp_hf.experiments.runner.run_methods` writes
    ``results.json`` last), so an interrupted grid picks up where it stopped; ``None`` if that run has not
    finished."""
    path = Path(output_dir) / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def classification_figures(results: Mapping[str, Any]) -> dict[str, float]:
    """ACC and Forgetting, class- and task-incremental, of one method's classification results."""
    til = results["task_incremental"]
    return {"acc": results["acc"], "forgetting": results["forgetting"], "til_acc": til["average"],
            "til_forgetting": til["forgetting"]}  # fmt: skip


def mean_std(values: Sequence[float]) -> str:
    """``"mean +- std"`` with one decimal (population std, as over class orders)."""
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}"


def save_grid(output_dir: str | Path, runs: list[dict[str, Any]], table: str) -> None:
    """Write a grid's ``results.json`` (every run's figures) and ``table.md`` (``table``, made from them)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(runs, indent=2) + "\n")
    (root / "table.md").write_text(table + "\n")


def labelled_table(runs: Sequence[Mapping[str, Any]], columns: Mapping[str, str], first: str) -> str:
    """One row per run ``label`` (in order of appearance), ``mean +- std`` of each of ``columns`` (key -> header)
    over its runs that have the figure (``-`` when none has it), and the number of runs in the last column."""
    lines = [f"| {first} | " + " | ".join(columns.values()) + " | orders |", "|---|" + "---|" * (len(columns) + 1)]
    for label in dict.fromkeys(run["label"] for run in runs):
        chosen = [run for run in runs if run["label"] == label]
        cells = [mean_std(values) if (values := [r[key] for r in chosen if r[key] is not None]) else "-"
                 for key in columns]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(chosen)} |")
    return "\n".join(lines)
