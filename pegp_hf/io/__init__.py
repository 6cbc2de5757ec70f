"""Files and the Hub: per-task checkpoints (:mod:`~pegp_hf.io.checkpoint`), model cards
(:mod:`~pegp_hf.io.model_card`), pushing and resuming from the Hub (:mod:`~pegp_hf.io.hub`)."""

from pegp_hf.io.checkpoint import (
    STATE_NAME,
    SUBSPACES_NAME,
    CheckpointError,
    StoredTask,
    atomic_directory,
    latest_task_checkpoint,
    read_state,
    read_task_checkpoint,
    task_dir_name,
    write_task_checkpoint,
)
from pegp_hf.io.hub import PushTaskToHubCallback, push_task_checkpoint, resolve_checkpoint
from pegp_hf.io.model_card import model_card

__all__ = [
    "STATE_NAME",
    "SUBSPACES_NAME",
    "CheckpointError",
    "PushTaskToHubCallback",
    "StoredTask",
    "atomic_directory",
    "latest_task_checkpoint",
    "model_card",
    "push_task_checkpoint",
    "read_state",
    "read_task_checkpoint",
    "resolve_checkpoint",
    "task_dir_name",
    "write_task_checkpoint",
]
