"""Task checkpoints: atomic writes, exact resume, and clear errors for files that do not fit."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import AtTaskStart, matrices, plain_vit, synthetic_images, tiny_vit, training_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from pegp_hf import ContinualPEGPTrainer, TaskSequence, class_incremental_tasks
from pegp_hf.io.checkpoint import SUBSPACES_NAME, CheckpointError, atomic_directory
from pegp_hf.tuners import pet_handle

TASKS = class_incremental_tasks(synthetic_images(num_labels=6), synthetic_images(num_labels=6, seed=1), 3, seed=0)


def make_trainer(output_dir, model=None, tasks=TASKS, **overrides):
    model = model or tiny_vit(num_labels=6, dropout=0.1)  # dropout draws on the RNG: resume must restore it
    args = training_args(output_dir, optim="sgd", optim_args="momentum=0.9", threshold=0.95, **overrides)
    return ContinualPEGPTrainer(model=model, args=args, tasks=tasks)


class CrashError(Exception):
    pass


def crash_at_task(index):
    def boom(model):
        raise CrashError(f"simulated crash at task {index + 1}")

    return AtTaskStart(index, boom)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("full"))
    trainer.train()
    return trainer


def test_every_task_leaves_a_complete_checkpoint(uninterrupted):
    root = uninterrupted.args.output_dir
    for k in (1, 2, 3):
        folder = f"{root}/task-{k}"
        names = {"adapter_model.safetensors", "adapter_config.json", SUBSPACES_NAME, "pegp_state.json"}
        assert names <= {p.name for p in Path(folder).iterdir()}
        state = json.loads(Path(f"{folder}/pegp_state.json").read_text())
        assert state["finished_tasks"] == k
        assert state["task_classes"] == TASKS.task_classes
        matrix = state["results"]["class_incremental"]["matrix"]
        assert all(matrix[i][t] is not None for t in range(k) for i in range(t + 1))
        bases = load_file(f"{folder}/{SUBSPACES_NAME}")
        assert all(".default." not in key for key in bases)  # named like the keys of adapter_model.safetensors
        adapter_keys = set(load_file(f"{folder}/adapter_model.safetensors"))
        assert set(bases) <= adapter_keys
        meta = json.loads(safe_open(f"{folder}/{SUBSPACES_NAME}", "pt").metadata()["pegp_hf"])
        assert meta["threshold"] == 0.95 and set(meta["ranks"]) == set(bases) and "torch" in meta["versions"]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, uninterrupted):
    trainer = make_trainer(tmp_path)
    trainer.add_callback(crash_at_task(2))
    with pytest.raises(CrashError):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-1", "task-2"]

    assert_resumes_to(uninterrupted, tmp_path)


def assert_resumes_to(uninterrupted, output_dir) -> None:
    """A new trainer resumed from ``output_dir`` ends with ``uninterrupted``'s matrices, weights and bases."""
    resumed = make_trainer(output_dir)
    resumed.train(resume_from_checkpoint=True)
    for name, matrix in matrices(uninterrupted).items():
        np.testing.assert_array_equal(matrices(resumed)[name], matrix)
    expected = trainable(uninterrupted.model)
    for name, value in trainable(resumed.model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    for name, basis in uninterrupted.projector.bases.items():
        assert torch.equal(resumed.projector.bases[name], basis), name


class CrashMidTask(TrainerCallback):
    """Raises after optimizer step ``step`` of task ``index`` (0-based): the model, optimizer and RNG are mid-task."""

    def __init__(self, index: int, step: int) -> None:
        self.index, self.step, self.tasks_begun = index, step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tasks_begun += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.tasks_begun == self.index + 1 and state.global_step == self.step:
            raise CrashError(f"simulated crash at step {self.step} of task {self.index + 1}")


def test_resume_after_a_crash_in_the_middle_of_a_task_reproduces_the_uninterrupted_run(tmp_path, uninterrupted):
    trainer = make_trainer(tmp_path)
    trainer.add_callback(CrashMidTask(index=2, step=3))
    with pytest.raises(CrashError, match="step 3 of task 3"):
        trainer.train()
    assert trainer.state.global_step == 3  # it did stop inside task 3, after some of its steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-1", "task-2"]
    assert_resumes_to(uninterrupted, tmp_path)


def test_resume_from_an_explicit_task_folder(tmp_path, uninterrupted):
    shutil.copytree(f"{uninterrupted.args.output_dir}/task-1", tmp_path / "task-1")
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "task-1"))
    for name, matrix in matrices(uninterrupted).items():
        np.testing.assert_array_equal(matrices(resumed)[name], matrix)


def test_a_crash_while_writing_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import pegp_hf.io.checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(pegp_hf.io.checkpoint, "save_subspaces", broken)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert list(tmp_path.iterdir()) == []  # neither task-1 nor a hidden staging folder


def test_atomic_directory_replaces_or_keeps_a_whole_folder(tmp_path):
    target = tmp_path / "task-1"
    for content in ("first", "second"):
        with atomic_directory(target) as staging:
            (staging / "file.txt").write_text(content)
    assert (target / "file.txt").read_text() == "second"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "file.txt").write_text("third")
        raise RuntimeError("crash while writing")
    assert (target / "file.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-1"]


@pytest.fixture()
def task_1(tmp_path, uninterrupted):
    folder = tmp_path / "ckpt" / "task-1"
    shutil.copytree(f"{uninterrupted.args.output_dir}/task-1", folder)
    return folder


def test_truncated_subspace_file_is_named(tmp_path, task_1):
    path = task_1 / SUBSPACES_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"pegp_subspaces\.safetensors is not a readable safetensors file"):
        make_trainer(tmp_path / "out").train(resume_from_checkpoint=str(task_1))


def test_subspace_file_with_wrong_shapes_is_named(tmp_path, task_1):
    path = task_1 / SUBSPACES_NAME
    bases = load_file(path)
    key = next(k for k in bases if "lora_A" in k)
    q, _ = torch.linalg.qr(torch.randn(40, 3))
    bases[key] = q.contiguous()  # orthonormal but for a 40-dim feature space
    save_file(bases, path)
    with pytest.raises(ValueError, match=r"has shape \(40, 3\); the model needs \(32, k<=32\)"):
        make_trainer(tmp_path / "out").train(resume_from_checkpoint=str(task_1))


def test_subspace_file_for_other_tensors_is_named(tmp_path, task_1):
    path = task_1 / SUBSPACES_NAME
    bases = load_file(path)
    key = next(k for k in bases if "q_proj.lora_A" in k)
    bases[key.replace("q_proj", "k_proj")] = bases.pop(key)  # the adapter fits, its bases name another tensor
    save_file(bases, path)
    with pytest.raises(CheckpointError, match=r"does not match the model's protected tensors: missing \[.*q_proj"):
        make_trainer(tmp_path / "out").train(resume_from_checkpoint=str(task_1))


def test_adapter_with_wrong_shapes_is_named(task_1):
    path = task_1 / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(3, 32)  # the config still says r=4: only the file is wrong
    save_file(weights, path)
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \(3, 32\) but the model's is \(4, 32\)"):
        pet_handle(tiny_vit(num_labels=6, dropout=0.1)).read_pretrained(task_1)


def test_checkpoint_of_another_task_sequence_is_refused(tmp_path, task_1):
    other = class_incremental_tasks(synthetic_images(num_labels=6), synthetic_images(num_labels=6, seed=1), 3, seed=9)
    with pytest.raises(CheckpointError, match="different task sequence"):
        make_trainer(tmp_path / "out", tasks=other).train(resume_from_checkpoint=str(task_1))


def _edit_state(folder, edit):
    path = folder / "pegp_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.update(finished_tasks=3), "finished_tasks' is 3 but the folder is task-1"),
        (lambda s: s.update(finished_tasks=0), "finished_tasks' must be a positive integer, got 0"),
        (lambda s: s.update(finished_tasks=-1), "finished_tasks' must be a positive integer, got -1"),
        (lambda s: s.update(finished_tasks="1"), "finished_tasks' must be a positive integer, got '1'"),
        (lambda s: s.update(config=[]), "field 'config' must be a JSON dict"),
        (lambda s: s["results"].pop("timings"), "field 'results.timings' must list the 1 finished tasks"),
        (lambda s: s["results"].update(updates=[]), "field 'results.updates' must list the 1 finished tasks"),
        (lambda s: s.update(run_id=7), "field 'run_id' must be a JSON str"),
        (lambda s: s["results"]["class_incremental"].update(matrix=[50.0, 60.0]), "matrix has shape (2,)"),
        (lambda s: s["results"]["class_incremental"]["matrix"][0].__setitem__(0, None), "lacks a value measured"),
    ],
    ids=[
        "count-3-in-task-1",
        "count-0",
        "negative",
        "string",
        "config-list",
        "no-timings",
        "no-updates",
        "run-id",
        "matrix-shape",
        "matrix-hole",
    ],
)
def test_an_edited_state_is_refused_naming_file_and_field_before_the_model_changes(tmp_path, task_1, edit, field):
    _edit_state(task_1, edit)
    trainer = make_trainer(tmp_path / "out")
    before = trainable(trainer.model)
    with pytest.raises(CheckpointError, match=r"pegp_state\.json: field |task-1: results\.") as error:
        trainer.train(resume_from_checkpoint=str(task_1))
    assert field in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in trainable(trainer.model).items())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("task-*"))


def test_resume_with_nothing_to_resume_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="holds no task-<k> checkpoint"):
        make_trainer(tmp_path).train(resume_from_checkpoint=True)


def test_a_checkpoint_written_before_objectives_resumes_to_the_same_matrices(tmp_path):
    """``task-1`` of a run made by pegp_hf at commit 3817966 (old state format, prototype head) continues to the
    matrices that run itself reached after task 3."""
    old = Path(__file__).with_name("fixtures") / "checkpoint_3817966"
    args = training_args(tmp_path, optim="sgd", optim_args="momentum=0.9", threshold=0.95, head="prototype")
    tasks = class_incremental_tasks(synthetic_images(num_labels=6), synthetic_images(num_labels=6, seed=1), 3, seed=0)
    trainer = ContinualPEGPTrainer(model=tiny_vit(num_labels=6), args=args, tasks=tasks)
    trainer.train(resume_from_checkpoint=str(old / "task-1"))
    finished = json.loads((old / "task-3" / "pegp_state.json").read_text())["results"]
    for name in ("class_incremental", "task_incremental"):
        expected = np.array(finished[name]["accuracy_matrix"], dtype=float)
        np.testing.assert_array_equal(matrices(trainer)[name], expected)
    assert trainer.continual_results()["acc"] == finished["acc"]


# ---- a folder holds one run ------------------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path, uninterrupted):
    """The old run's task-1..3 would mix with the new run's, and a resume would pick the old task-3. The refusal
    leaves the folder as it was, the old run's interrupted write (its staging folder) included."""
    shutil.copytree(uninterrupted.args.output_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / ".task-4.tmp-old").mkdir()
    listing = sorted(p.name for p in tmp_path.iterdir())
    trainer = make_trainer(tmp_path)
    before = trainable(trainer.model)
    with pytest.raises(CheckpointError, match=r"holds \['task-1', 'task-2', 'task-3'\] of an earlier run") as error:
        trainer.train()
    assert "overwrite_output_dir=True" in str(error.value) and "resume_from_checkpoint=True" in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in trainable(trainer.model).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    old_run = json.loads((tmp_path / "task-3" / "pegp_state.json").read_text())["run_id"]

    overwriting = make_trainer(tmp_path, overwrite_output_dir=True)
    overwriting.add_callback(crash_at_task(1))
    with pytest.raises(CrashError):
        overwriting.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-1"]  # the old task-2 / task-3 are gone
    assert json.loads((tmp_path / "task-1" / "pegp_state.json").read_text())["run_id"] == overwriting.run_id != old_run


def test_a_resume_refuses_a_folder_mixing_two_runs(tmp_path, uninterrupted):
    shutil.copytree(f"{uninterrupted.args.output_dir}/task-1", tmp_path / "task-1")
    _edit_state(tmp_path / "task-1", lambda s: s.update(run_id="another-run"))
    shutil.copytree(f"{uninterrupted.args.output_dir}/task-2", tmp_path / "task-2")
    with pytest.raises(CheckpointError, match=r"more than one run: \['task-1'\] were not written by the run of task-2"):
        make_trainer(tmp_path).train(resume_from_checkpoint=True)
    # resuming from an explicit folder into an output_dir holding another run's folder is refused too
    with pytest.raises(CheckpointError, match=r"holds \['task-1'\] of another run than the one resumed"):
        make_trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "task-2"))


def test_a_kill_between_the_two_renames_is_repaired_before_resuming(tmp_path, uninterrupted):
    """A kill inside ``atomic_directory`` leaves ``.task-2.tmp-*`` (staging) and ``.task-1.old-*/task-1`` (the
    previous version renamed aside, the new one not yet in place): the next run puts task-1 back and cleans up."""
    shutil.copytree(f"{uninterrupted.args.output_dir}/task-1", tmp_path / ".task-1.old-x" / "task-1")
    (tmp_path / ".task-2.tmp-y").mkdir()
    (tmp_path / ".task-2.tmp-y" / "adapter_model.safetensors").write_bytes(b"half")
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-1", "task-2", "task-3"]
    for name, matrix in matrices(uninterrupted).items():
        np.testing.assert_array_equal(matrices(resumed)[name], matrix)


# ---- the PEFT adapter: its config, its name ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        (dict(lora_alpha=8), "lora_alpha=4 (the model's: 8)"),
        (dict(lora_dropout=0.0), "lora_dropout=0.1 (the model's: 0.0)"),
        (dict(use_rslora=True), "use_rslora=False (the model's: True)"),
        (dict(target_modules=["q_proj", "k_proj"]), "target_modules=["),
    ],
    ids=["alpha", "dropout", "rslora", "targets"],
)
def test_a_resume_with_another_lora_config_is_refused(tmp_path, task_1, lora, field):
    """Same shapes, other outputs: lora_alpha 8 instead of 4 doubles every old task's LoRA contribution."""
    from peft import LoraConfig, get_peft_model

    options = dict(
        r=4, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    options.update(lora)
    model = get_peft_model(plain_vit(num_labels=6), LoraConfig(**options))
    trainer = make_trainer(tmp_path / "out", model=model)
    before = trainable(model)
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: the adapter was trained with") as error:
        trainer.train(resume_from_checkpoint=str(task_1))
    assert field in str(error.value) and "PeftConfig.from_pretrained" in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in trainable(model).items())


def _outputs(model, pixels):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_the_active_adapter_is_saved_whatever_its_name_and_whatever_else_the_model_holds(tmp_path):
    """Two adapters, the second (``mine``) active and trained: each task folder holds ``mine`` alone, at its top, so
    plain PEFT loads the trained adapter, and a crashed run resumes into ``mine``."""
    from peft import LoraConfig, PeftModel
    from peft.utils import get_peft_model_state_dict

    def two_adapters():
        model = tiny_vit(num_labels=6)
        model.add_adapter("mine", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["classifier"]))  # fmt: skip
        model.set_adapter("mine")
        return model

    tasks = TaskSequence(TASKS[:2], TASKS.scenario)
    full = make_trainer(tmp_path / "full", model=two_adapters(), tasks=tasks)
    untouched = get_peft_model_state_dict(full.model, adapter_name="default")
    full.train()
    folder = tmp_path / "full" / "task-2"
    assert not (folder / "mine").exists() and not (folder / "default").exists()
    saved = load_file(folder / "adapter_model.safetensors")
    trained = get_peft_model_state_dict(full.model, adapter_name="mine")
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert any(not torch.equal(untouched[k], trained[k]) for k in trained)  # the saved adapter is the trained one
    pixels = synthetic_images(num_labels=6, per_class=2, seed=5)[:]["pixel_values"]
    plain = PeftModel.from_pretrained(plain_vit(num_labels=6), folder)
    torch.testing.assert_close(_outputs(plain, pixels), _outputs(full.model, pixels), rtol=0, atol=1e-5)

    crashed = make_trainer(tmp_path / "run", model=two_adapters(), tasks=tasks)
    crashed.add_callback(crash_at_task(1))
    with pytest.raises(CrashError):
        crashed.train()
    resumed = make_trainer(tmp_path / "run", model=two_adapters(), tasks=tasks)
    resumed.train(resume_from_checkpoint=True)
    for name, matrix in matrices(full).items():
        np.testing.assert_array_equal(matrices(resumed)[name], matrix)
    torch.testing.assert_close(_outputs(resumed.model, pixels), _outputs(full.model, pixels), rtol=0, atol=1e-5)


def test_two_active_adapters_are_refused():
    from peft import LoraConfig

    model = tiny_vit(num_labels=6)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match=r"2 active adapters \['default', 'second'\].*model\.set_adapter"):
        make_trainer("unused", model=model)
