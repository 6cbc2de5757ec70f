"""Two real processes (torchrun, gloo, loopback only) against one process over the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import distributed_case

from pegp_hf import ContinualPEGPTrainer

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(output_dir: Path, phase: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(output_dir), phase]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    full = torchrun(root / "full", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = torchrun(root / "resumed", "crash")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    resumed = torchrun(root / "resumed", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one_failed = torchrun(root / "one_rank", "crash-rank1")
    assert one_failed.returncode != 0 and "simulated crash" in one_failed.stderr
    one_resumed = torchrun(root / "one_rank", "resume")
    assert one_resumed.returncode == 0, one_resumed.stderr[-3000:]

    def load(folder, phase):
        return [torch.load(root / folder / f"{phase}-rank{r}.pt") for r in (0, 1)]

    return {"full": load("full", "full"), "resumed": load("resumed", "resume"),
            "one_rank": load("one_rank", "resume"), "root": root}  # fmt: skip


def test_two_processes_really_ran(runs):
    assert [r["world_size"] for r in runs["full"]] == [2, 2]


def test_bases_are_bit_identical_on_every_rank(runs):
    """Only the main process grows; rank 1 would grow from perturbed covariances (distributed_worker.py), so a
    regression to growing on every rank without the broadcast makes the bases differ."""
    zero, one = runs["full"]
    assert zero["bases"].keys() == one["bases"].keys()
    assert all(b.shape[1] > 0 for b in zero["bases"].values())
    for name, basis in zero["bases"].items():
        assert torch.equal(basis, one["bases"][name]), name


def test_update_diagnostic_is_zero_on_both_ranks(runs):
    for rank in runs["full"]:
        assert rank["overlaps"] and max(rank["overlaps"]) < 1e-6 < min(rank["update_max"])  # updates did happen


def test_ddp_matches_one_process_over_the_same_global_batch(runs, tmp_path):
    model, tasks, args = distributed_case(tmp_path, per_device_batch=16)
    reference = ContinualPEGPTrainer(model=model, args=args, tasks=tasks)
    reference.train()
    expected = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for rank in runs["full"]:
        for name, value in rank["params"].items():
            torch.testing.assert_close(value, expected[name], atol=2e-5, rtol=1e-4, msg=name)
        for name, basis in rank["bases"].items():  # same span as the single-process basis
            ref = reference.projector.bases[name]
            assert basis.shape == ref.shape, name
            torch.testing.assert_close(basis @ basis.T, ref @ ref.T, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("crash", ["resumed", "one_rank"])
def test_every_rank_resumes_after_a_crash_to_the_same_result(runs, crash):
    """``resumed``: every rank failed as task 2 started; ``one_rank``: rank 1 alone did."""
    for full, resumed in zip(runs["full"], runs[crash], strict=True):
        for name, value in full["params"].items():
            torch.testing.assert_close(resumed["params"][name], value, atol=1e-6, rtol=0, msg=name)
        for name, matrix in full["accuracy"].items():
            torch.testing.assert_close(resumed["accuracy"][name], matrix, rtol=0, atol=0, equal_nan=True, msg=name)


def test_recipe_under_accelerate_launch_with_the_shipped_ddp_config(tmp_path):
    root = Path(__file__).parents[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "recipes" / "accelerate_configs" / "ddp.yaml"), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(free_port()), str(root / "recipes" / "vit_class_incremental.py"),
               "--use_cpu", "true", "--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1",
               "--feature_samples", "64", "--output_dir", str(tmp_path), "--disable_tqdm", "true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("method           ACC") == 1  # the table comes from the main process only
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["pegp"]["num_processes"] == summary["sequential"]["num_processes"] == 2
    assert (tmp_path / "pegp" / "task-2" / "pegp_subspaces.safetensors").is_file()
