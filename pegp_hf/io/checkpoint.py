"""Per-task checkpoints: written atomically, read back with checks that name what is wrong.

``output_dir/task-<k>/`` (state after ``k`` finished tasks) holds

- ``adapter_model.safetensors`` + ``adapter_config.json``: the PEFT adapter or the pegp_hf tuners, head included
  (``modules_to_save``), written by the library that loads them (:class:`~pegp_hf.tuners.handle.PETHandle`);
- ``pegp_subspaces.safetensors``: one ``(d, k)`` float32 basis per protected tensor, keyed by the tensor's
  name in ``adapter_model.safetensors`` (for PEFT, its naming without the adapter name); metadata ``pegp_hf`` is a
  JSON string with the threshold, feature dims, ranks and library versions;
- what the objective keeps across tasks, e.g. ``pegp_head.safetensors`` for the prototype / aligned heads;
- ``pegp_state.json``: finished task count, scenario, task names and classes, results, config, versions;
- ``README.md``: the model card (:mod:`~pegp_hf.io.model_card`), merged with the one PEFT writes.

A checkpoint is built in a hidden temporary folder next to its target and renamed into place, so a crash leaves
either the previous checkpoint or the new one, never half of one. Reading one checks every file against the model,
the task sequence and the run's settings before anything is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pegp_hf.continual.objectives import ContinualObjective
from pegp_hf.continual.results import ContinualResults
from pegp_hf.continual.tasks import TaskSequence
from pegp_hf.core.finite import check_tensors
from pegp_hf.core.projector import GradientProjector
from pegp_hf.tuners.handle import PETHandle
from pegp_hf.utils import CheckpointError, key_mismatch, library_versions, read_safetensors

logger = logging.getLogger(__name__)

SUBSPACES_NAME = "pegp_subspaces.safetensors"
STATE_NAME = "pegp_state.json"
STATE_KEYS = ("finished_tasks", "scenario", "task_classes", "results", "config")
_TASK_DIR = re.compile(r"^task-(\d+)$")

__all__ = [
    "STATE_NAME",
    "SUBSPACES_NAME",
    "CheckpointError",
    "StoredTask",
    "atomic_directory",
    "checkpoint_run_id",
    "latest_task_checkpoint",
    "load_reference_dims",
    "load_subspaces",
    "read_state",
    "read_task_checkpoint",
    "remove_staging",
    "save_subspaces",
    "task_checkpoints",
    "task_dir_name",
    "task_state",
    "write_state",
    "write_task_checkpoint",
]


def task_dir_name(finished_tasks: int) -> str:
    """``task-<k>``: the checkpoint after ``k`` finished tasks."""
    return f"task-{finished_tasks}"


def task_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``task-<k>`` folder of ``output_dir``, by ``k``."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _TASK_DIR.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def latest_task_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``task-<k>`` folder of ``output_dir`` with the largest ``k`` that holds a state file, or ``None``.

    Raises:
        CheckpointError: the folders up to it were written by more than one run (their ``run_id`` differ).
    """
    found = [path for path in task_checkpoints(output_dir) if (path / STATE_NAME).is_file()]
    if not found:
        return None
    runs = {path.name: checkpoint_run_id(path) for path in found}
    latest = runs[found[-1].name]
    others = [name for name, run in runs.items() if run is not None and run != latest]  # None: before run ids
    if latest is not None and others:
        raise CheckpointError(
            f"{output_dir} holds checkpoints of more than one run: {others} were not written by the run of "
            f"{found[-1].name}; remove the other run's folders, or pass the folder to resume from explicitly"
        )
    return found[-1]


def checkpoint_run_id(folder: str | os.PathLike) -> str | None:
    """The ``run_id`` of ``folder``'s state, or ``None`` when it has none or cannot be read."""
    try:
        return json.loads((Path(folder) / STATE_NAME).read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # read_state names what is wrong with it, if it is the one resumed from


def _leftovers(output_dir: str | os.PathLike) -> list[tuple[Path, str, str]]:
    """``(folder, "task-<k>", "tmp" | "old")`` of every folder a crash inside :func:`atomic_directory` left."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(path, re.fullmatch(r"\.(task-\d+)\.(tmp|old)-.+", path.name)) for path in sorted(root.iterdir())]
    return [(path, m[1], m[2]) for path, m in found if m and path.is_dir()]


def restore_retired(output_dir: str | os.PathLike) -> list[str]:
    """Put back a ``task-<k>`` that a crash left renamed aside (``.task-<k>.old-*/task-<k>``) while ``task-<k>``
    is missing (the crash fell between the two renames of :func:`atomic_directory`). Returns the names restored."""
    restored = []
    for path, name, kind in _leftovers(output_dir):
        target = path.parent / name
        if kind == "old" and (path / name).is_dir() and not target.exists():
            os.replace(path / name, target)
            shutil.rmtree(path)
            restored.append(name)
    return restored


def remove_staging(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a crash inside :func:`atomic_directory` left: ``.task-<k>.tmp-*`` staging folders and
    ``.task-<k>.old-*`` ones whose ``task-<k>`` is in place (call :func:`restore_retired` first). Returns the names
    removed."""
    removed = []
    for path, _, _ in _leftovers(output_dir):
        shutil.rmtree(path)
        removed.append(path.name)
    return removed


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for path in [*folder.iterdir(), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it replaces ``target``, on error it is removed
    and ``target`` is left as it was.

    The staging folder is flushed to disk before it is renamed. When ``target`` exists it is first renamed aside
    and put back if the final rename fails, so some complete version of ``target`` always exists on disk except
    between those two renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint folder gets the usual permissions
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(retired / target.name, target)
                retired.rmdir()
                raise
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
        _fsync_tree(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_subspaces(
    path: str | os.PathLike,
    bases: Mapping[str, torch.Tensor],
    key: Callable[[str], str],
    threshold: float,
    reference_dims: Mapping[str, int] | None = None,
) -> None:
    """Write ``bases`` (parameter name -> ``(d, k)``) to ``path`` under the adapter-file keys ``key(name)``, with
    metadata (``reference_dims``: how many leading columns of a basis came from a reference set)."""
    tensors = {key(name): basis.detach().cpu().contiguous() for name, basis in bases.items()}
    meta = {
        "threshold": threshold,
        "feature_dims": {k: basis.shape[0] for k, basis in tensors.items()},
        "ranks": {k: basis.shape[1] for k, basis in tensors.items()},
        "reference_dims": {key(name): count for name, count in (reference_dims or {}).items()},
        "versions": library_versions(),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "pegp_hf": json.dumps(meta)})


def load_reference_dims(path: str | os.PathLike, names: list[str], key: Callable[[str], str]) -> dict[str, int]:
    """The ``reference_dims`` of a subspace file's metadata by parameter name (none in files without them)."""
    try:
        with safe_open(str(path), "pt") as stored:
            counts = json.loads((stored.metadata() or {}).get("pegp_hf", "{}")).get("reference_dims", {})
        return {name: int(counts[key(name)]) for name in names if key(name) in counts}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the metadata's reference_dims are unreadable (corrupt file?): {error}"
        ) from error


def load_subspaces(path: str | os.PathLike, names: list[str], key: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Read the bases written by :func:`save_subspaces` for the parameters ``names``; check names and orthonormality.

    Shapes against the model are checked by :meth:`GradientProjector.check_bases`.
    """
    stored = read_safetensors(path)
    keys = {name: key(name) for name in names}
    mismatch = key_mismatch(keys.values(), stored)
    if mismatch:
        raise CheckpointError(f"{path} does not match the model's protected tensors: {mismatch}")
    bases = {name: stored[k] for name, k in keys.items()}
    for name, basis in bases.items():
        if basis.ndim != 2:
            raise CheckpointError(f"{path}: basis {keys[name]} has shape {tuple(basis.shape)}, expected (d, k)")
        gram = basis.T.double() @ basis.double()
        if not torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-3):
            raise CheckpointError(f"{path}: basis {keys[name]} is not orthonormal (corrupt file?)")
    return bases


def write_state(directory: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``pegp_state.json`` (strict JSON: no NaN) into ``directory``."""
    (Path(directory) / STATE_NAME).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n")


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``pegp_state.json`` of a task checkpoint; ``CheckpointError`` if it is missing, not JSON, or lacks a
    field of :data:`STATE_KEYS`."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pegp_hf task checkpoint: {STATE_NAME} is missing")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a JSON {type(state).__name__}, not an object")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the fields {missing}")
    _check_state(path, state)
    return _upgraded(state)


def _check_state(path: Path, state: dict[str, Any]) -> None:
    """Refuse a hand-edited or corrupted state before anything reads it: ``finished_tasks`` a positive integer equal
    to the ``k`` of its ``task-<k>`` folder, fields of the types :func:`task_state` writes, and ``results`` recording
    every finished task."""
    done = state["finished_tasks"]
    if isinstance(done, bool) or not isinstance(done, int) or done < 1:
        raise CheckpointError(f"{path}: field 'finished_tasks' must be a positive integer, got {done!r}")
    named = re.fullmatch(r"task-(\d+)", path.parent.name)
    if named and int(named[1]) != done:
        raise CheckpointError(
            f"{path}: field 'finished_tasks' is {done} but the folder is {path.parent.name}; the file was edited or "
            f"moved: restore it, or resume from the folder task-{done} of the run that wrote it"
        )
    types = {"scenario": str, "task_classes": list, "results": dict, "config": dict, "task_names": list, "run_id": str}
    for key, kind in types.items():
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(f"{path}: field {key!r} must be a JSON {kind.__name__}, got {state[key]!r}")
    if len(state["task_classes"]) < done:
        raise CheckpointError(f"{path}: field 'task_classes' lists {len(state['task_classes'])} tasks, not {done}")
    for key in ("timings", "task_metrics", "updates"):
        recorded = state["results"].get(key)
        if not isinstance(recorded, list) or len(recorded) != done:
            raise CheckpointError(
                f"{path}: field 'results.{key}' must list the {done} finished tasks, got {recorded!r}"
            )


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A state written before objectives existed (pegp_hf up to commit 3817966) in today's form: its objective was
    classification, and each matrix block held ``accuracy_matrix`` and ``acc`` (accuracies, higher is better)."""
    state["config"].setdefault("objective", "classification")
    for block in state["results"].values():
        if isinstance(block, dict) and "accuracy_matrix" in block and "matrix" not in block:
            block["matrix"], block["higher_is_better"] = block.pop("accuracy_matrix"), True
            if "acc" in block:
                block["average"] = block.pop("acc")
    return state


def task_state(
    tasks: TaskSequence, finished_tasks: int, results: Mapping[str, Any], config: Mapping[str, Any], run_id: str
) -> dict[str, Any]:
    """The content of ``pegp_state.json`` after ``finished_tasks`` tasks of ``tasks``; ``run_id`` names the run
    (kept across resumes), so checkpoints of two runs in one folder are told apart."""
    return {
        "finished_tasks": finished_tasks,
        "run_id": run_id,
        "scenario": tasks.scenario,
        "label_column": tasks.label_column,
        "task_names": [task.name for task in tasks],
        "task_classes": tasks.task_classes,
        "results": dict(results),
        "config": dict(config),
        "versions": library_versions(),
    }


def write_task_checkpoint(
    target: str | os.PathLike,
    pet: PETHandle,
    projector: GradientProjector,
    objective: ContinualObjective,
    state: Mapping[str, Any],
    card: Callable[[list[str], str | None], str],
    model_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the whole ``task-<k>`` folder atomically: adapter, bases, the objective's files, state, and the model
    card ``card(names of the files written, the README.md PEFT's save_pretrained wrote or None)``. The adapter
    weights come from ``model_state_dict`` when given (under FSDP2 the whole model gathered by
    ``Accelerator.get_state_dict``, since each rank holds only shards), else from the model.

    Raises:
        NonFiniteError: an adapter weight or a basis holds NaN / inf (nothing is written).
    """
    check_tensors(pet.state_dict(model_state_dict), "the adapter weights", f"not writing {target}")
    check_tensors(projector.bases, "the subspace bases", f"not writing {target}")
    with atomic_directory(target) as staging:
        pet.save_pretrained(staging, model_state_dict)
        save_subspaces(staging / SUBSPACES_NAME, projector.bases, pet.weight_key, state["config"]["threshold"],
                       projector.reference_dims)  # fmt: skip
        objective.save_checkpoint(staging)
        write_state(staging, state)
        readme = staging / "README.md"
        peft_card = readme.read_text(encoding="utf-8") if readme.is_file() else None
        readme.write_text(card(sorted(path.name for path in staging.iterdir()), peft_card), encoding="utf-8")


@dataclass
class StoredTask:
    """A task checkpoint read and checked against the model, the task sequence and the run, not loaded yet."""

    finished_tasks: int
    run_id: str | None
    adapter: dict[str, torch.Tensor]
    bases: dict[str, torch.Tensor] | None
    objective_state: Any
    results: ContinualResults
    reference_dims: dict[str, int] = field(default_factory=dict)

    def load_into(self, pet: PETHandle, projector: GradientProjector, objective: ContinualObjective) -> None:
        """Copy the adapter weights, bases and the objective's state into the run (nothing can fail any more)."""
        pet.load_weights(self.adapter)
        if self.bases is not None:
            projector.load_bases(self.bases, self.reference_dims)
        objective.load_checkpoint(self.objective_state)


def read_task_checkpoint(
    path: str | os.PathLike,
    tasks: TaskSequence,
    config: Mapping[str, Any],
    strict: tuple[str, ...],
    pet: PETHandle,
    projector: GradientProjector,
    objective: ContinualObjective,
    results: ContinualResults,
) -> StoredTask:
    """Read every file of a task checkpoint and check it, changing nothing.

    Args:
        tasks: the run's sequence: the checkpoint's finished tasks must be its first ones (same scenario, classes).
        config: the run's settings; those named in ``strict`` must equal the stored ones, others only warn.
        results: the run's empty results, whose matrices the checkpoint must hold.

    Raises:
        CheckpointError: a missing or broken file, or a checkpoint of another sequence, settings, evaluators, model
            or adapter.
    """
    path = Path(path)
    state = read_state(path)
    done = int(state["finished_tasks"])
    finished_classes = state["task_classes"][:done]
    if state["scenario"] != tasks.scenario or finished_classes != tasks.task_classes[:done] or done > len(tasks):
        raise CheckpointError(
            f"{path} was made for a different task sequence: its {done} finished {state['scenario']} tasks have "
            f"classes {finished_classes}, this {tasks.scenario} sequence of {len(tasks)} starts with "
            f"{tasks.task_classes[:done]}"
        )
    names = [task.name for task in tasks][:done]
    if "task_names" in state and state["task_names"][:done] != names:
        raise CheckpointError(
            f"{path} was made for a different task sequence: its finished tasks are {state['task_names'][:done]}, "
            f"this sequence starts with {names}"
        )
    stored_config = state["config"]
    for key in strict:
        if stored_config.get(key) != config[key]:
            raise CheckpointError(f"{path} was trained with {key}={stored_config.get(key)!r}, not {config[key]!r}")
    changed = {k: v for k, v in stored_config.items() if k not in strict and k in config and config[k] != v}
    if changed:
        logger.warning("continuing %s with settings that differ from the checkpoint's %s", path, changed)
    try:
        restored = results.restore(state["results"], done)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error
    adapter = pet.read_pretrained(path)  # first: another adapter config explains any basis mismatch below
    bases, reference_dims = None, {}
    if config["method"] == "pegp":
        names = list(projector.tensors)
        bases = load_subspaces(path / SUBSPACES_NAME, names, pet.weight_key)
        projector.check_bases(bases)
        reference_dims = load_reference_dims(path / SUBSPACES_NAME, names, pet.weight_key)
        if any(count > bases[name].shape[1] for name, count in reference_dims.items()):
            raise CheckpointError(f"{path / SUBSPACES_NAME}: reference_dims exceed the bases (corrupt metadata?)")
    objective_state = objective.read_checkpoint(path)
    return StoredTask(done, state.get("run_id"), adapter, bases, objective_state, restored, reference_dims)
