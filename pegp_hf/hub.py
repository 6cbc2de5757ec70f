"""The Hub: a model card per task checkpoint, pushing it, and finding a checkpoint by local path or repo id.

Each finished task's folder (adapter, bases, head statistics, state, card) is uploaded to the repository root in one
commit, ``"task k/T"``. The repo's history therefore holds every task, and its head is the newest. It loads as a
plain PEFT adapter (``PeftModel.from_pretrained``) or, for pegp_hf tuners, with ``load_pet_pretrained``, and
continues a sequence with ``train(resume_from_checkpoint="<repo id>")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download

CITATION = """@article{qiao2024pegp,
  title   = {Gradient Projection For Continual Parameter-Efficient Tuning},
  author  = {Qiao, Jingyang and Zhang, Zhizhong and Tan, Xin and Qu, Yanyun and Zhang, Wensheng and Han, Zhi and
             Xie, Yuan},
  journal = {arXiv preprint arXiv:2405.13383},
  year    = {2024}
}"""


def _matrix_table(matrix: list[list[float | None]]) -> str:
    size = len(matrix)
    lines = ["| task | " + " | ".join(f"after {t + 1}" for t in range(size)) + " |", "|---" * (size + 1) + "|"]
    for i, row in enumerate(matrix):
        lines.append(f"| {i + 1} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def _measures(results: dict[str, Any], done: int) -> str:
    """The evaluators' matrices (ACC / Forgetting / BWT) and per-task figures, if any (e.g. zero-shot accuracy)."""
    builtin = ("class_incremental", "task_incremental")
    matrices = [k for k, v in results.items() if isinstance(v, dict) and "accuracy_matrix" in v and k not in builtin]
    figures = results.get("task_metrics", [])[:done]
    if not matrices and not any(figures):
        return ""
    lines = ["", "## Further measures", ""]
    if matrices:
        lines += ["| matrix | ACC | Forgetting | BWT |", "|---|---|---|---|"]
        lines += [f"| {k} | {results[k]['acc']:.2f} | {results[k]['forgetting']:.2f} | {results[k]['bwt']:.2f} |"
                  for k in matrices]  # fmt: skip
        lines.append("")
    keys = list(dict.fromkeys(key for row in figures for key in row))
    if keys:
        initial = results.get("initial_metrics", {})
        lines += ["| after task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        if initial:
            lines.append("| before | " + " | ".join(_cell(initial.get(k)) for k in keys) + " |")
        lines += [f"| {t + 1} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for t, row in enumerate(figures)]
        lines.append("")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def model_card(state: dict[str, Any], base_model: str | None, tuners: list[str] = ("lora",)) -> str:
    """A Hub model card (``README.md``) for the task checkpoint described by ``state`` (its ``pegp_state.json``);
    ``tuners``: ``["lora"]`` for a PEFT LoRA adapter, else the pegp_hf tuner types."""
    results, config = state["results"], state["config"]
    done = state["finished_tasks"]
    headline = "task_incremental" if state["scenario"] == "task_incremental" else "class_incremental"
    peft = list(tuners) == ["lora"]
    front = ["---", f"library_name: {'peft' if peft else 'pegp_hf'}", "tags:", "- pegp", "- pegp_hf"]
    front += ["- continual-learning", *(f"- {tuner}" for tuner in tuners)]
    kind = "PEFT LoRA adapter" if peft else f"pegp_hf adapter ({', '.join(tuners)})"
    loader = (
        "`PeftModel.from_pretrained(base, folder)`" if peft else "`pegp_hf.tuners.load_pet_pretrained(base, folder)`"
    )
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    tasks = "\n".join(
        f"| {i + 1} | {name} | {classes} |{' (not yet trained)' if i >= done else ''}"
        for i, (name, classes) in enumerate(zip(state["task_names"], state["task_classes"], strict=True))
    )
    return (
        "\n".join(front)
        + f"""

# Continual {"/".join(tuners)} adapter trained with PEGP ({done} of {len(state["task_names"])} tasks)

A {kind} trained through a sequence of tasks by pegp_hf with PEGP, gradient projection for continual
parameter-efficient tuning ([Qiao et al., 2024](https://arxiv.org/abs/2405.13383)). PEGP projects every later
gradient off the feature subspace of earlier tasks, so that their outputs stay put. This repository holds:

- the adapter (`adapter_model.safetensors`);
- the subspace bases that protect the finished tasks (`pegp_subspaces.safetensors`);
- for prototype / aligned heads, the class statistics (`pegp_head.safetensors`);
- the state of the sequence (`pegp_state.json`).

Load it with {loader}; continue the sequence with
`ContinualPEGPTrainer(...).train(resume_from_checkpoint="<this repo id>")`.

- Base model: {base_model or "unknown"}
- Scenario: {state["scenario"]}; method: {config["method"]}; head: {config.get("head", "masked_linear")}
- Threshold (eps): {config["threshold"]}; feature samples per task: {config["feature_samples"]}

## Task sequence

| # | task | classes |
|---|---|---|
{tasks}

## Accuracy after each task ({headline.replace("_", "-")}, %)

Rows are tasks, columns are "after training task t".

{_matrix_table([row[:done] for row in results[headline]["accuracy_matrix"][:done]])}

ACC {results["acc"]:.2f} | Forgetting {results["forgetting"]:.2f} | BWT {results["bwt"]:.2f}
{_measures(results, done)}
## Citation

```bibtex
{CITATION}
```
"""
    )


def push_task_checkpoint(
    folder: str | os.PathLike, repo_id: str, commit_message: str, token: str | None = None,
    revision: str | None = None,
) -> None:  # fmt: skip
    """Upload every file of ``folder`` to the root of the model repo ``repo_id`` in one commit."""
    HfApi(token=token).upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, token: str | None = None) -> Path:
    """A local folder as it is, or a Hub repo id downloaded (``snapshot_download``) to the local cache."""
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    text = str(path_or_repo_id)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"no checkpoint folder {text} (and it is not a Hub repo id of the form owner/name)")
    return Path(snapshot_download(repo_id=text, token=token))
