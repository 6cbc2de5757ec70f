"""Two real processes (torchrun, gloo, loopback only), under DDP and FSDP2, against one process over the same global
batch."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import distributed_case, distributed_clip_case, matrices, refit_clip_case
from safetensors.torch import load_file

from pegp_hf import ContinualPEGPTrainer

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(output_dir: Path, phase: str, backend: str = "ddp") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(output_dir), phase, backend]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "DS_ACCELERATOR": "cpu"}
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
    sharded = torchrun(root / "fsdp2", "full", "fsdp2")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    sharded_crash = torchrun(root / "fsdp2_resumed", "crash", "fsdp2")
    assert sharded_crash.returncode != 0 and "simulated crash" in sharded_crash.stderr
    sharded_resumed = torchrun(root / "fsdp2_resumed", "resume", "fsdp2")
    assert sharded_resumed.returncode == 0, sharded_resumed.stderr[-3000:]

    def load(folder, phase):
        return [torch.load(root / folder / f"{phase}-rank{r}.pt") for r in (0, 1)]

    return {"full": load("full", "full"), "resumed": load("resumed", "resume"),
            "one_rank": load("one_rank", "resume"), "fsdp2": load("fsdp2", "full"),
            "fsdp2_resumed": load("fsdp2_resumed", "resume"), "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """ZeRO-1 and ZeRO-2 on DeepSpeed's CPU accelerator (its shared-memory collectives build on first use)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("deepspeed")
    runs = {}
    for backend in ("zero1", "zero2"):
        done = torchrun(root / backend, "full", backend)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[backend] = [torch.load(root / backend / f"full-rank{r}.pt") for r in (0, 1)]
    return {**runs, "root": root}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process run over the same global batch, and its output folder."""
    output_dir = tmp_path_factory.mktemp("one_process")
    model, tasks, args = distributed_case(output_dir, per_device_batch=16)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks)
    trainer.train()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {"trainer": trainer, "params": params, "output_dir": output_dir}


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


@pytest.fixture(params=["full", "fsdp2", "zero1", "zero2"])
def two_processes(request):
    """(backend, per-rank results, output folder) of a 2-process run: DDP, FSDP2, DeepSpeed ZeRO-1 / ZeRO-2."""
    backend = request.param
    runs = request.getfixturevalue("deepspeed_runs" if backend.startswith("zero") else "runs")
    return backend, runs[backend], runs["root"] / backend


def test_two_processes_match_one_process_over_the_same_global_batch(two_processes, one_process):
    """DDP, FSDP2 (each rank holding and projecting only its rows of every LoRA weight) and DeepSpeed ZeRO-1 / 2
    (projected by tensor hooks as gradients are produced) against one process: the same weights, bases and accuracy
    matrices."""
    backend, ranks, _ = two_processes
    reference = one_process["trainer"]
    expected = matrices(reference)
    for rank in ranks:
        assert rank["world_size"] == 2 and bool(rank["sharded"]) == (backend == "fsdp2")
        for name, value in rank["params"].items():
            torch.testing.assert_close(value, one_process["params"][name], atol=2e-5, rtol=1e-4, msg=name)
        for name, basis in rank["bases"].items():  # same span as the single-process basis
            ref = reference.projector.bases[name]
            assert basis.shape == ref.shape, name
            torch.testing.assert_close(basis @ basis.T, ref @ ref.T, atol=1e-4, rtol=0, msg=name)
        for name, matrix in expected.items():
            torch.testing.assert_close(rank["accuracy"][name], torch.tensor(matrix), rtol=0, atol=0, equal_nan=True)


def test_checkpoints_hold_the_whole_adapter_and_the_bases_of_one_process(two_processes, one_process):
    """Each FSDP2 rank holds half the rows of every adapter weight; the checkpoint must hold all of them (gathered
    from the shards), equal to the single-process checkpoint, and so must its bases, under every backend."""
    _, _, folder = two_processes
    for task in ("task-1", "task-2"):
        for file in ("adapter_model.safetensors", "pegp_subspaces.safetensors"):
            written, expected = load_file(folder / task / file), load_file(one_process["output_dir"] / task / file)
            assert written.keys() == expected.keys(), file
            for key, tensor in expected.items():
                assert written[key].shape == tensor.shape, (file, key)
                if file == "adapter_model.safetensors":
                    torch.testing.assert_close(written[key], tensor, atol=2e-5, rtol=1e-4, msg=key)
                else:
                    torch.testing.assert_close(written[key] @ written[key].T, tensor @ tensor.T, atol=1e-4, rtol=0)
    final = load_file(folder / "task-2" / "adapter_model.safetensors")
    lora_a = [key for key in final if "lora_A" in key]
    assert lora_a and all(final[key].shape[0] == 4 for key in lora_a)  # rank 4: under FSDP2 both shards of 2 rows


@pytest.mark.parametrize("crash", ["resumed", "one_rank", "fsdp2_resumed"])
def test_every_rank_resumes_after_a_crash_to_the_same_result(runs, crash):
    """``resumed``: every rank failed as task 2 started; ``one_rank``: rank 1 alone did; ``fsdp2_resumed``: every
    FSDP2 rank failed, and the run resumed from the checkpoint gathered from the shards."""
    full_run = runs["fsdp2" if crash.startswith("fsdp2") else "full"]
    for full, resumed in zip(full_run, runs[crash], strict=True):
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
    assert len(re.findall(r"^method +ACC", done.stdout, re.M)) == 1  # the table comes from the main process only
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["pegp"]["num_processes"] == summary["sequential"]["num_processes"] == 2
    assert (tmp_path / "pegp" / "task-2" / "pegp_subspaces.safetensors").is_file()


def test_prototype_replay_under_ddp_gathers_the_class_means_and_trains_as_one_process(tmp_path):
    """Each rank's feature pass sees its share of the samples; the class means are merged over both, and with the
    means replayed exactly (noise 0, each old class in the same share on every rank) the two processes train the
    same weights as one process over the same global batch: the replayed loss is scaled like the task's."""
    done = torchrun(tmp_path / "ddp", "replay")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"replay-rank{r}.pt") for r in (0, 1)]
    model, tasks, args, objective, callbacks = distributed_clip_case(tmp_path / "one", per_device_batch=16)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks, objective=objective, callbacks=callbacks)
    trainer.train()
    assert objective.prototypes.counts.sum() == 2 * 24  # both tasks' feature passes, 24 samples each
    for rank in ranks:
        assert rank["world_size"] == 2
        torch.testing.assert_close(rank["counts"], objective.prototypes.counts)
        torch.testing.assert_close(rank["means"], objective.prototypes.means, atol=1e-5, rtol=1e-4)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                torch.testing.assert_close(rank["params"][name], parameter.detach(), atol=2e-5, rtol=1e-4, msg=name)
        for name, matrix in matrices(trainer).items():
            torch.testing.assert_close(rank["accuracy"][name], torch.tensor(matrix), rtol=0, atol=0, equal_nan=True)


def test_the_refit_under_ddp_writes_the_same_projection_on_every_rank(tmp_path):
    """Both ranks hold every stored embedding (gathered), the reference probabilities a single process takes before
    task 1, and after the re-fits the same projection bits (the main process's, broadcast: on one machine the ranks
    compute the same bits anyway, so this checks that the re-fit and its broadcasts run under DDP, not that the
    broadcast is needed)."""
    done = torchrun(tmp_path / "ddp", "refit")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"refit-rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["projection"], ranks[1]["projection"])
    assert torch.equal(ranks[0]["teacher"], ranks[1]["teacher"]) and len(ranks[0]["stored"]) == 2 * 24
    model, tasks, args, objective, callbacks = refit_clip_case(tmp_path / "one", per_device_batch=16)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks, objective=objective, callbacks=callbacks)
    classifier = model.get_base_model()
    teacher = objective.refit.reference_probabilities(trainer, classifier)
    torch.testing.assert_close(ranks[0]["teacher"], teacher, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ranks[0]["projection"], classifier.clip.text_projection.weight)  # it was re-fitted
