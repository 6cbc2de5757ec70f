"""The Hub: pushing every task checkpoint, and finding a checkpoint by local path or repo id.

Each finished task's folder (adapter, bases, the objective's files, state, card) is uploaded to the repository root
in one commit, ``"task k/T"``, by :class:`PushTaskToHubCallback`, which the trainer adds when
``args.push_to_hub`` is set. The repo's history therefore holds every task, and its head is the newest. It loads as
a plain PEFT adapter (``PeftModel.from_pretrained``) or, for pegp_hf tuners, with ``load_pet_pretrained``, and
continues a sequence with ``train(resume_from_checkpoint="<repo id>")``.

The trainer's ``create_model_card`` and ``push_to_hub`` (what ``Trainer.save_model`` calls under ``push_to_hub``)
are :func:`create_task_model_card` and :func:`push_latest_task_to_hub`: the card and the folder of the newest
finished task, not the Trainer's generic card and the whole ``output_dir``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, ModelCard, snapshot_download

from pegp_hf.continual.callbacks import ContinualCallback
from pegp_hf.io.checkpoint import CheckpointError, latest_task_checkpoint
from pegp_hf.io.model_card import update_model_card

if TYPE_CHECKING:
    from pegp_hf.trainer import ContinualPEGPTrainer


def push_task_checkpoint(
    folder: str | os.PathLike, repo_id: str, commit_message: str, token: str | None = None,
    revision: str | None = None, blocking: bool = True,
) -> Any:  # fmt: skip
    """Upload every file of ``folder`` to the root of the model repo ``repo_id`` in one commit, on branch
    ``revision`` (made from ``main`` the first time) or ``main``. Returns ``HfApi.upload_folder``'s result (a
    ``Future`` of it when not ``blocking``)."""
    api = HfApi(token=token)
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=revision, run_as_future=not blocking)  # fmt: skip


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a task folder is never left with half a card)."""
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes 0600; a card gets the usual permissions
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def create_task_model_card(trainer: ContinualPEGPTrainer, **card_kwargs: Any) -> Path | None:
    """``ContinualPEGPTrainer.create_model_card``: the card of the newest ``output_dir/task-<k>``, with
    ``card_kwargs`` (``Trainer.create_model_card``'s: ``license``, ``language``, ``tags``, ``model_name``,
    ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``) applied by
    :func:`~pegp_hf.io.model_card.update_model_card`, written to that folder's ``README.md`` (so that a push carries
    it) and to ``output_dir/README.md``. Returns the task folder on the main process, ``None`` on the others.

    Raises:
        CheckpointError: ``output_dir`` holds no finished task.
    """
    if not trainer.is_world_process_zero():
        return None
    folder = latest_task_checkpoint(trainer.args.output_dir)
    if folder is None:
        raise CheckpointError(
            f"{trainer.args.output_dir} holds no task-<k> checkpoint, so there is no card to write: train() first"
        )
    card = update_model_card(ModelCard.load(folder / "README.md"), **card_kwargs)
    _write_text(folder / "README.md", str(card))
    _write_text(Path(trainer.args.output_dir) / "README.md", str(card))
    return folder


def push_latest_task_to_hub(
    trainer: ContinualPEGPTrainer,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    **card_kwargs: Any,
) -> Any:
    """``ContinualPEGPTrainer.push_to_hub``: the newest ``output_dir/task-<k>`` folder (adapter, bases, the
    objective's files, state and its card, updated by ``trainer.create_model_card(**card_kwargs)``) uploaded to
    ``trainer.hub_model_id`` (created as ``Trainer.push_to_hub`` does, from ``hub_model_id`` or ``output_dir``) in one
    commit, on ``revision`` (default ``args.hub_revision``). The other task folders are not uploaded: the repo's
    history holds them when the run pushed every task (``args.push_to_hub``). Returns the upload's ``CommitInfo``
    (a ``Future`` when not ``blocking``) on the main process, ``None`` on the others.

    Raises:
        CheckpointError: ``output_dir`` holds no finished task.
    """
    trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    token = token if token is not None else trainer.args.hub_token
    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token, private=private)
    if not trainer.is_world_process_zero():
        return None
    card_kwargs.setdefault("model_name", trainer.hub_model_id.split("/")[-1])
    model_tags = getattr(trainer.model, "model_tags", None)
    if model_tags:
        card_kwargs["tags"] = [*_tags(card_kwargs.get("tags")), *model_tags]
    trainer.create_model_card(**card_kwargs)
    folder = latest_task_checkpoint(trainer.args.output_dir)
    revision = revision if revision is not None else trainer.args.hub_revision
    return push_task_checkpoint(folder, trainer.hub_model_id, commit_message or "End of training", token, revision,
                                blocking)  # fmt: skip


def _tags(tags: str | list[str] | None) -> list[str]:
    return [] if tags is None else [tags] if isinstance(tags, str) else list(tags)


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
