"""Figures of continual results (matplotlib, ``pip install 'pegp_hf[recipes]'``), saved as PNG next to them.

Every function takes ``results`` as :meth:`~pegp_hf.ContinualPEGPTrainer.continual_results` returns them (or a
``{method: results}`` mapping) and writes one file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pegp_hf.continual.results import ContinualMatrix


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (plots are written, never shown)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'pegp_hf[recipes]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def running_summary(matrix: list[list[float | None]], higher_is_better: bool = True) -> dict[str, list[float]]:
    """Average / Forgetting / BWT after each task ``t``, from the ``t x t`` top-left block of ``matrix`` (its
    finished part)."""
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    done = int((~np.isnan(np.diag(values))).sum())
    steps = [ContinualMatrix(values, higher_is_better).summary(t + 1) for t in range(done)]
    return {key: [step[key] for step in steps] for key in ("average", "forgetting", "bwt")}


def plot_accuracy_matrix(matrix: list[list[float | None]], path: str | Path, title: str) -> Path:
    """Heatmap of ``A[i, t]`` (rows: task, columns: after task), values printed in the cells."""
    plt = pyplot()
    a = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    figure, axes = plt.subplots(figsize=(1.0 + 0.8 * len(a), 0.8 + 0.7 * len(a)))
    image = axes.imshow(a, vmin=0, vmax=100, cmap="viridis")
    for (i, t), value in np.ndenumerate(a):
        if not np.isnan(value):
            axes.text(t, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black")
    ticks = range(len(a))
    axes.set_xticks(ticks, [str(t + 1) for t in ticks])
    axes.set_yticks(ticks, [str(i + 1) for i in ticks])
    axes.set(xlabel="after training task", ylabel="task", title=title)
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return save_figure(figure, path)  # its task ticks are set above; integer_ticks would tick the colour bar's x axis


def plot_method_curves(results: Mapping[str, Mapping[str, Any]], path: str | Path, matrix: str | None = None) -> Path:
    """Average and Forgetting after each task, one line per method (e.g. ``pegp`` against ``sequential``), of matrix
    ``matrix`` (default: each run's headline): ACC for an accuracy, the average loss for a loss."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, result in results.items():
        block = result[matrix or result["headline"]]
        running = running_summary(block["matrix"], block["higher_is_better"])
        tasks = range(1, len(running["average"]) + 1)
        left.plot(tasks, running["average"], marker="o", label=method)
        right.plot(tasks, running["forgetting"], marker="o", label=method)
    unit = "(%)" if block["higher_is_better"] else f"({matrix or result['headline']})"
    left.set(xlabel="after task", ylabel=f"average {unit}", title="average over the tasks so far")
    right.set(xlabel="after task", ylabel=f"Forgetting {unit}", title="forgetting so far")
    left.legend()
    return save_figure(figure, path, integer_ticks=True)


def plot_task_metrics(
    results: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...], path: str | Path, initial: str | None = None
) -> Path:
    """One panel per key of ``task_metrics`` (e.g. ``zero_shot_acc``, ``hallucination_rate``), one line per method;
    with ``initial``, that figure before the sequence is drawn at task 0 of the matching panel."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for panel, key in zip(axes[0], keys, strict=True):
        for method, result in results.items():
            points = [(t + 1, m.get(key)) for t, m in enumerate(result["task_metrics"]) if m.get(key) is not None]
            if key == initial and key in result.get("initial_metrics", {}):
                points.insert(0, (0, result["initial_metrics"][key]))
            if points:
                panel.plot(*zip(*points, strict=True), marker="o", label=method)
        panel.set(xlabel="after task (0: before the sequence)" if key == initial else "after task", title=key)
        panel.legend()
    return save_figure(figure, path, integer_ticks=True)


def save_figure(figure: Any, path: str | Path, integer_ticks: bool = False, dpi: int = 110) -> Path:
    """Lay out ``figure``, write it to ``path`` (folders made as needed) and close it; ``integer_ticks`` for x axes
    that count tasks."""
    from matplotlib.ticker import MaxNLocator

    if integer_ticks:
        for axes in figure.axes:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    figure.clear()
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
