"""Per-task checkpoints: written atomically, read back with checks that name what is wrong.

``output_dir/task-<k>/`` (state after ``k`` finished tasks) holds

- ``adapter_model.safetensors`` + ``adapter_config.json``: the PEFT adapter or the pegp_hf tuners, head included
  (``modules_to_save``);
- ``pegp_subspaces.safetensors``: one ``(d, k)`` float32 basis per protected tensor, keyed by the tensor's
  name in ``adapter_model.safetensors`` (for PEFT, its naming without the adapter name); metadata ``pegp_hf`` is a
  JSON string with the threshold, feature dims, ranks and library versions;
- ``pegp_head.safetensors`` (prototype / aligned heads): per-class ``counts``, ``means`` and, for the aligned head,
  ``covariances`` of the classifier's input features;
- ``pegp_state.json``: finished task count, scenario, task names and classes, accuracy matrices, config, timings.

A checkpoint is built in a hidden temporary folder next to its target and renamed into place, so a crash leaves
either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pegp_hf._keys import key_mismatch, state_mismatch
from pegp_hf.heads import ClassStatistics
from pegp_hf.tuners.model import get_pet_state_dict, save_pet_pretrained, set_pet_state_dict

SUBSPACES_NAME = "pegp_subspaces.safetensors"
HEAD_NAME = "pegp_head.safetensors"
STATE_NAME = "pegp_state.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_TASK_DIR = re.compile(r"^task-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model / task sequence."""


def task_dir_name(finished_tasks: int) -> str:
    """``task-<k>``: the checkpoint after ``k`` finished tasks."""
    return f"task-{finished_tasks}"


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a checkpoint depends on (``"unknown"`` when not installed as a package)."""
    found = {}
    for name in ("pegp_hf", "torch", "transformers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def latest_task_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``task-<k>`` folder of ``output_dir`` with the largest ``k`` that holds a state file, or ``None``."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), path)
        for path in root.iterdir()
        if (m := _TASK_DIR.match(path.name)) and (path / STATE_NAME).is_file()
    ]
    return max(found)[1] if found else None


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


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a clear error for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def _strip_adapter(name: str, adapter_name: str | None) -> str:
    """A parameter name -> its key in ``adapter_model.safetensors``. PEFT: ``...lora_A.<adapter>.weight`` ->
    ``...lora_A.weight`` (only the component just before the last one is removed); pegp_hf tuners (``adapter_name``
    ``None``): unchanged."""
    if adapter_name is None:
        return name
    return re.sub(rf"\.{re.escape(adapter_name)}(\.[^.]+)$", r"\1", name)


def save_subspaces(
    path: str | os.PathLike, bases: Mapping[str, torch.Tensor], adapter_name: str | None, threshold: float
) -> None:
    """Write ``bases`` (parameter name -> ``(d, k)``) to ``path`` under adapter-file key names, with metadata."""
    tensors = {_strip_adapter(name, adapter_name): basis.detach().cpu().contiguous() for name, basis in bases.items()}
    meta = {
        "threshold": threshold,
        "feature_dims": {key: basis.shape[0] for key, basis in tensors.items()},
        "ranks": {key: basis.shape[1] for key, basis in tensors.items()},
        "versions": library_versions(),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "pegp_hf": json.dumps(meta)})


def load_subspaces(path: str | os.PathLike, names: list[str], adapter_name: str | None) -> dict[str, torch.Tensor]:
    """Read the bases written by :func:`save_subspaces` for the parameters ``names``; check names and orthonormality.

    Shapes against the model are checked by :meth:`GradientProjector.load_bases`.
    """
    stored = read_safetensors(path)
    keys = {name: _strip_adapter(name, adapter_name) for name in names}
    mismatch = key_mismatch(keys.values(), stored)
    if mismatch:
        raise CheckpointError(f"{path} does not match the model's protected tensors: {mismatch}")
    bases = {name: stored[key] for name, key in keys.items()}
    for name, basis in bases.items():
        if basis.ndim != 2:
            raise CheckpointError(f"{path}: basis {keys[name]} has shape {tuple(basis.shape)}, expected (d, k)")
        gram = basis.T.double() @ basis.double()
        if not torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-3):
            raise CheckpointError(f"{path}: basis {keys[name]} is not orthonormal (corrupt file?)")
    return bases


def is_peft_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_state_dict(model: torch.nn.Module, adapter_name: str | None) -> dict[str, torch.Tensor]:
    """The adapter weights as ``adapter_model.safetensors`` keys them: PEFT's for a ``PeftModel``, else those of the
    pegp_hf tuners (``get_pet_state_dict``)."""
    if is_peft_model(model):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model, adapter_name=adapter_name)
    return get_pet_state_dict(model)


def save_adapter(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json``: ``PeftModel.save_pretrained`` or
    ``save_pet_pretrained``."""
    if is_peft_model(model):
        model.save_pretrained(directory)
    else:
        save_pet_pretrained(model, directory)


def read_adapter_weights(
    model: torch.nn.Module, directory: str | os.PathLike, adapter_name: str | None
) -> dict[str, torch.Tensor]:
    """Read ``directory/adapter_model.safetensors`` and check every key and shape against the ``model``'s adapter
    (PEFT itself would skip unknown keys silently). Load the result with :func:`load_adapter_weights`."""
    path = Path(directory) / ADAPTER_WEIGHTS_NAME
    stored = read_safetensors(path)
    expected = {key: tuple(tensor.shape) for key, tensor in adapter_state_dict(model, adapter_name).items()}
    mismatch = state_mismatch(expected, stored)
    if mismatch:
        raise CheckpointError(f"{path} does not match the model's adapter: {mismatch}")
    return stored


def load_adapter_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], adapter_name: str | None) -> None:
    """Copy weights checked by :func:`read_adapter_weights` into the model."""
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    else:
        set_pet_state_dict(model, weights)


def save_head_statistics(path: str | os.PathLike, statistics: ClassStatistics, head: str) -> None:
    """Write ``statistics`` (counts, means and, for the aligned head, covariances) with the head's name, class count
    and feature dim as metadata."""
    meta = {"head": head, "num_labels": statistics.num_labels, "feature_dim": statistics.dim}
    save_file(
        {k: v.contiguous() for k, v in statistics.state_dict().items()},
        str(path),
        metadata={"format": "pt", "pegp_hf": json.dumps(meta)},
    )


def load_head_statistics(path: str | os.PathLike, like: ClassStatistics) -> ClassStatistics:
    """Read statistics written by :func:`save_head_statistics`; class count, feature dim and the presence of
    covariances must match ``like`` (the trainer's empty statistics for this model and head)."""
    stored = read_safetensors(path)
    expected = {key: tuple(value.shape) for key, value in like.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in stored.items()}
    if found != expected:
        raise CheckpointError(
            f"{path} holds head statistics of shapes {found}; this model and head need {expected} "
            f"({like.num_labels} classes, feature dim {like.dim})"
        )
    return ClassStatistics(stored["counts"], stored["means"], stored.get("covariances"))


STATE_KEYS = ("finished_tasks", "scenario", "task_classes", "results", "config")


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
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the fields {missing}")
    return state
