"""Per-task checkpoints: written atomically, read back with checks that name what is wrong.

``output_dir/task-<k>/`` (state after ``k`` finished tasks) holds

- ``adapter_model.safetensors`` + ``adapter_config.json``: the PEFT adapter, head included (``modules_to_save``);
- ``pegp_subspaces.safetensors``: one ``(d, k)`` float32 basis per protected tensor, keyed by the tensor's name in
  ``adapter_model.safetensors`` (PEFT naming without the adapter name); metadata ``pegp_hf`` is a JSON string with
  the threshold, feature dims, ranks and library versions;
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
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pegp_hf._keys import key_mismatch

SUBSPACES_NAME = "pegp_subspaces.safetensors"
STATE_NAME = "pegp_state.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_TASK_DIR = re.compile(r"^task-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model / task sequence."""


def task_dir_name(finished_tasks: int) -> str:
    """``task-<k>``: the checkpoint after ``k`` finished tasks."""
    return f"task-{finished_tasks}"


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in ("pegp_hf", "torch", "transformers", "peft")}


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


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint folder gets the usual permissions
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
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


def _strip_adapter(name: str, adapter_name: str) -> str:
    return name.replace(f".{adapter_name}.", ".")


def save_subspaces(
    path: str | os.PathLike, bases: Mapping[str, torch.Tensor], adapter_name: str, threshold: float
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


def load_subspaces(path: str | os.PathLike, names: list[str], adapter_name: str) -> dict[str, torch.Tensor]:
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


def load_adapter_weights(model: torch.nn.Module, directory: str | os.PathLike, adapter_name: str) -> None:
    """Load ``directory/adapter_model.safetensors`` into the PEFT ``model``'s adapter after checking every key and
    shape against it (PEFT itself would skip unknown keys silently)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(directory) / ADAPTER_WEIGHTS_NAME
    stored = read_safetensors(path)
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    mismatch = key_mismatch(expected, stored)
    if mismatch:
        raise CheckpointError(f"{path} does not match the model's adapter {adapter_name!r}: {mismatch}")
    for key, tensor in stored.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the model's is {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, stored, adapter_name=adapter_name)


def write_state(directory: str | os.PathLike, state: Mapping[str, Any]) -> None:
    (Path(directory) / STATE_NAME).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n")


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pegp_hf task checkpoint: {STATE_NAME} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {error}") from error
