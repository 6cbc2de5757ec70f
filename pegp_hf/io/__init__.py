"""Files and the Hub: per-task checkpoints (:mod:`~pegp_hf.io.checkpoint`), model cards
(:mod:`~pegp_hf.io.model_card`), pushing and resuming from the Hub (:mod:`~pegp_hf.io.hub`), loading a checkpoint for
inference (:mod:`~pegp_hf.io.loading`)."""

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
from pegp_hf.io.hub import (
    PushTaskToHubCallback,
    create_task_model_card,
    push_latest_task_to_hub,
    push_task_checkpoint,
    resolve_checkpoint,
)
from pegp_hf.io.loading import ContinualModel, ContinualModelOutput
from pegp_hf.io.model_card import CardDataset, CardInfo, card_info, model_card, update_model_card

__all__ = [
    "STATE_NAME",
    "SUBSPACES_NAME",
    "CardDataset",
    "CardInfo",
    "CheckpointError",
    "ContinualModel",
    "ContinualModelOutput",
    "PushTaskToHubCallback",
    "StoredTask",
    "atomic_directory",
    "card_info",
    "create_task_model_card",
    "latest_task_checkpoint",
    "model_card",
    "push_latest_task_to_hub",
    "push_task_checkpoint",
    "read_state",
    "read_task_checkpoint",
    "resolve_checkpoint",
    "task_dir_name",
    "update_model_card",
    "write_task_checkpoint",
]
