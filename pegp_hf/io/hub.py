"""The Hub: pushing every task checkpoint, and finding a checkpoint by local path or repo id.

Each finished task's folder (adapter, bases, the objective's files, state, card) is uploaded to the repository root
in one commit, ``"task k/T"``, by :class:`PushTaskToHubCallback`, which the trainer adds when
``args.push_to_hub`` is set. The repo's history therefore holds every task, and its head is the newest. It loads as
a plain PEFT adapter (``PeftModel.from_pretrained``) or, for pegp_hf tuners, with ``load_pet_pretrained``, and
continues a sequence with ``train(resume_from_checkpoint="<repo id>")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download

from pegp_hf.continual.callbacks import ContinualCallback


def push_task_checkpoint(
    folder: str | os.PathLike, repo_id: str, commit_message: str, token: str | None = None,
    revision: str | None = None,
) -> None:  # fmt: skip
    """Upload every file of ``folder`` to the root of the model repo ``repo_id`` in one commit, on branch
    ``revision`` (made from ``main`` the first time) or ``main``."""
    api = HfApi(token=token)
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision)


class PushTaskToHubCallback(ContinualCallback):
    """On ``on_task_save``, the world's main process pushes the new ``task-<k>`` folder to ``repo_id`` as one commit
    named ``"task k/T"`` (the process that created the repo)."""

    def __init__(self, repo_id: str, token: str | None = None, revision: str | None = None) -> None:
        self.repo_id, self.token, self.revision = repo_id, token, revision

    def on_task_save(self, args, state, control, checkpoint_dir: Path, tasks: Any, task_index: int, **kwargs) -> None:
        if state.is_world_process_zero:
            push_task_checkpoint(
                checkpoint_dir, self.repo_id, f"task {task_index + 1}/{len(tasks)}", self.token, self.revision
            )


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike, token: str | None = None, revision: str | None = None
) -> Path:
    """A local folder as it is, or a Hub repo id downloaded (``snapshot_download``, at ``revision``: the branch the
    run pushed to with ``hub_revision``; default ``main``) to the local cache."""
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    text = str(path_or_repo_id)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"no checkpoint folder {text} (and it is not a Hub repo id of the form owner/name)")
    return Path(snapshot_download(repo_id=text, token=token, revision=revision))
