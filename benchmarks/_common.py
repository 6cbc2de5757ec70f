"""What the benchmarks that drive the recipe share: splitting their own flags from the recipe's, reading back a
finished run, the headline figures of a run, table cells and matplotlib."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def split_recipe_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[own flags] -- [recipe flags]`` -> ``(own, recipe)``; without ``--`` every flag is the benchmark's own."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def mean_std(values: Sequence[float]) -> str:
    """``"mean +- std"`` with one decimal (population std, as over class orders)."""
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}"


def headline(results: Mapping[str, Any]) -> dict[str, float]:
    """ACC and Forgetting, class- and task-incremental, of one method's ``continual_results()``."""
    til = results["task_incremental"]
    return {"acc": results["acc"], "forgetting": results["forgetting"], "til_acc": til["acc"],
            "til_forgetting": til["forgetting"]}  # fmt: skip


def finished(out: Path) -> dict | None:
    """The summary a finished recipe run left in ``out`` (the recipe writes ``results.json`` last), so an interrupted
    benchmark picks up where it stopped; ``None`` if that run has not finished."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
