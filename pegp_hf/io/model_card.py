"""The model card (``README.md``) of a task checkpoint: what the adapter is, how to load it, the task sequence and
every matrix measured so far."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pegp_hf.continual.results import ContinualMatrix, ContinualResults

CITATION = """@article{qiao2024pegp,
  title   = {Gradient Projection For Continual Parameter-Efficient Tuning},
  author  = {Qiao, Jingyang and Zhang, Zhizhong and Tan, Xin and Qu, Yanyun and Zhang, Wensheng and Han, Zhi and
             Xie, Yuan},
  journal = {arXiv preprint arXiv:2405.13383},
  year    = {2024}
}"""
FILES = {
    "adapter_model.safetensors": "the adapter",
    "pegp_subspaces.safetensors": "the subspace bases that protect the finished tasks",
    "pegp_head.safetensors": "the class statistics of the prototype / aligned head",
    "pegp_state.json": "the state of the sequence: tasks, settings, every matrix and figure",
}
LOADERS = {
    "peft": "`PeftModel.from_pretrained(base, folder)`",
    "pegp_hf": "`pegp_hf.tuners.load_pet_pretrained(base, folder)`",
}


def _matrix_table(matrix: ContinualMatrix, done: int) -> str:
    lines = ["| task | " + " | ".join(f"after {t + 1}" for t in range(done)) + " |", "|---" * (done + 1) + "|"]
    for i in range(done):
        cells = ("-" if t < i else f"{matrix.values[i, t]:.4g}" for t in range(done))
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _measures(results: ContinualResults) -> str:
    """The other matrices (average / Forgetting / BWT) and the per-task figures, if any."""
    done = results.finished_tasks
    others = [name for name in results.matrices if name != results.headline]
    figures = results.task_metrics[:done]
    if not others and not any(figures):
        return ""
    lines = ["", "## Further measures", ""]
    if others:
        lines += ["| matrix | average | Forgetting | BWT | better |", "|---|---|---|---|---|"]
        for name in others:
            summary = results.summary(name)
            better = "higher" if results.matrices[name].higher_is_better else "lower"
            lines.append(f"| {name} | {summary['average']:.2f} | {summary['forgetting']:.2f} | "
                         f"{summary['bwt']:.2f} | {better} |")  # fmt: skip
        lines.append("")
    keys = list(dict.fromkeys(key for row in figures for key in row))
    if keys:
        lines += ["| after task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        if results.initial_metrics:
            lines.append("| before | " + " | ".join(_cell(results.initial_metrics.get(k)) for k in keys) + " |")
        lines += [f"| {t + 1} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for t, row in enumerate(figures)]
        lines.append("")
    return "\n".join(lines)


def model_card(
    state: Mapping[str, Any],
    results: ContinualResults,
    base_model: str | None,
    library_name: str,
    methods: Sequence[str],
    files: Sequence[str],
) -> str:
    """A Hub model card for the task checkpoint whose ``pegp_state.json`` is ``state``; ``library_name`` is the
    library that loads the adapter (``"peft"`` or ``"pegp_hf"``), ``methods`` its PET methods (``["lora"]``),
    ``files`` the names in the checkpoint folder."""
    config, done = state["config"], results.finished_tasks
    front = ["---", f"library_name: {library_name}", "tags:", "- pegp", "- pegp_hf", "- continual-learning"]
    front += [f"- {method}" for method in methods]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    kind = f"{'PEFT' if library_name == 'peft' else 'pegp_hf'} {'/'.join(methods)} adapter"
    tasks = "\n".join(
        f"| {i + 1} | {name} | {classes} |{' (not yet trained)' if i >= done else ''}"
        for i, (name, classes) in enumerate(zip(state["task_names"], state["task_classes"], strict=True))
    )
    headline = results.matrices[results.headline]
    summary = results.summary()
    settings = ", ".join(f"{key}: {value}" for key, value in config.items() if key not in ("threshold", "method"))
    held = "\n".join(f"- {FILES[name]} (`{name}`);" for name in FILES if name in files)
    return (
        "\n".join(front)
        + f"""

# Continual {"/".join(methods)} adapter trained with PEGP ({done} of {len(state["task_names"])} tasks)

A {kind} trained through a sequence of tasks by pegp_hf with PEGP, gradient projection for continual
parameter-efficient tuning ([Qiao et al., 2024](https://arxiv.org/abs/2405.13383)). PEGP projects every later
gradient off the feature subspace of earlier tasks, so that their outputs stay put. This repository holds:

{held}

Load it with {LOADERS[library_name]}; continue the sequence with
`ContinualPEGPTrainer(...).train(resume_from_checkpoint="<this repo id>")`.

- Base model: {base_model or "unknown"}
- Scenario: {state["scenario"]}; method: {config["method"]}; {settings}
- Threshold (eps): {config["threshold"]}

## Task sequence

| # | task | classes |
|---|---|---|
{tasks}

## {results.headline.replace("_", "-")} after each task ({"higher" if headline.higher_is_better else "lower"} is better)

Rows are tasks, columns are "after training task t".

{_matrix_table(headline, done)}

Average {summary["average"]:.2f} | Forgetting {summary["forgetting"]:.2f} | BWT {summary["bwt"]:.2f}
{_measures(results)}
## Citation

```bibtex
{CITATION}
```
"""
    )
