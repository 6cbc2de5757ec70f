"""Pushing every task to the Hub and resuming from a repo id, offline (HfApi patched, HF_HUB_OFFLINE=1)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import AtTaskStart, matrices, synthetic_images, tiny_vit, training_args
from huggingface_hub import HfApi, RepoUrl

import pegp_hf.io.hub
from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks

TASKS = class_incremental_tasks(synthetic_images(num_labels=6), synthetic_images(num_labels=6, seed=1), 3, seed=0)
FILES = {"adapter_model.safetensors", "adapter_config.json", "pegp_subspaces.safetensors", "pegp_head.safetensors",
         "pegp_state.json", "README.md"}  # fmt: skip


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A fake Hub: upload_folder copies into tmp_path/remote/<repo id>/<revision>; snapshot_download returns that
    folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    remote, commits = tmp_path / "remote", []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        assert exist_ok, "a run's pushes reuse its branch"
        if not (remote / repo_id / branch).exists() and (remote / repo_id / "main").exists():
            shutil.copytree(remote / repo_id / "main", remote / repo_id / branch)

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        commits.append((repo_id, commit_message, {p.name for p in Path(folder_path).iterdir()}))
        shutil.copytree(folder_path, remote / repo_id / (revision or "main"), dirs_exist_ok=True)

    def snapshot_download(repo_id, token=None, revision=None):
        return str(remote / repo_id / (revision or "main"))

    def create_commit(self, *args, **kwargs):
        raise AssertionError("pegp_hf uploads whole task folders with upload_folder")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(pegp_hf.io.hub, "snapshot_download", snapshot_download)
    return remote, commits


def make(output_dir, repo_id, **overrides):
    args = training_args(output_dir, threshold=0.95, head="aligned", align_epochs=2, push_to_hub=True,
                         hub_model_id=repo_id, **overrides)  # fmt: skip
    return ContinualPEGPTrainer(model=tiny_vit(num_labels=6), args=args, tasks=TASKS)


def test_every_task_is_pushed_with_its_bases_and_card_and_a_crashed_run_resumes_from_the_repo(tmp_path, hub):
    remote, commits = hub
    full = make(tmp_path / "full", "user/full")
    full.train()
    assert [(repo, message) for repo, message, _ in commits] == [("user/full", f"task {k}/3") for k in (1, 2, 3)]
    assert all(files >= FILES for _, _, files in commits)
    card = (remote / "user" / "full" / "main" / "README.md").read_text()
    assert "library_name: peft" in card and "- pegp" in card and "- continual-learning" in card
    assert "3 of 3 tasks" in card and "2405.13383" in card and "| 3 |" in card

    crashed = make(tmp_path / "crashed", "user/run")
    crashed.add_callback(AtTaskStart(2, lambda m: (_ for _ in ()).throw(RuntimeError("crash"))))
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train()
    assert [message for repo, message, _ in commits if repo == "user/run"] == ["task 1/3", "task 2/3"]

    shutil.rmtree(tmp_path / "crashed")  # nothing local is left: the repo alone continues the sequence
    resumed = make(tmp_path / "elsewhere", "user/run")
    resumed.train(resume_from_checkpoint="user/run")
    for name, matrix in matrices(full).items():
        np.testing.assert_array_equal(matrices(resumed)[name], matrix)
    expected = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    for name, value in resumed.model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    assert [message for repo, message, _ in commits if repo == "user/run"][-1] == "task 3/3"


def test_a_run_pushed_to_a_hub_revision_resumes_from_that_revision(tmp_path, hub):
    remote, _ = hub
    crashed = make(tmp_path / "crashed", "user/rev", hub_revision="experiment", num_train_epochs=1)
    crashed.add_callback(AtTaskStart(1, lambda m: (_ for _ in ()).throw(RuntimeError("crash"))))
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train()
    assert json.loads((remote / "user" / "rev" / "experiment" / "pegp_state.json").read_text())["finished_tasks"] == 1
    assert not (remote / "user" / "rev" / "main").exists()  # nothing was pushed to main

    resumed = make(tmp_path / "elsewhere", "user/rev", hub_revision="experiment", num_train_epochs=1)
    resumed.train(resume_from_checkpoint="user/rev")
    assert resumed.results.finished_tasks == 3
    assert json.loads((remote / "user" / "rev" / "experiment" / "pegp_state.json").read_text())["finished_tasks"] == 3
