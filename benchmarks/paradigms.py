"""ACC / Forgetting of ``pegp`` against ``sequential`` (lower bound) and ``joint`` (upper bound) for each PET
paradigm (LoRA, adapter, prefix, prompt).

Runs ``recipes/vit_class_incremental.py --pet <pet> --methods sequential pegp`` once per (paradigm, class order),
and ``joint``: the same recipe on one task holding every class (``--num_tasks 1``; its ACC is the accuracy on the
whole test set, its Forgetting 0 by definition), then writes ``<output_dir>/results.json`` (every run) and
``<output_dir>/table.md`` (mean +- std over orders)::

    python benchmarks/paradigms.py                       # embedded MNIST-5k, random-init ViT, class order 0
    python benchmarks/paradigms.py --seeds 0 1 2         # 3 class orders
    python benchmarks/paradigms.py --smoke               # seconds: digits, 2 tasks, 1 epoch
    python benchmarks/paradigms.py -- --backbone dinov2-small --num_train_epochs 1 --learning_rate 0.03

Runs whose ``results.json`` already exists under ``--output_dir`` are read back, not run again: an interrupted grid
continues where it stopped (use a fresh ``--output_dir`` after changing settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the recipes live at the repository root
from benchmarks._common import headline, mean_std, split_recipe_flags  # noqa: E402
from recipes import vit_class_incremental  # noqa: E402

PETS = ("lora", "adapter", "prefix", "prompt")
METHODS = ("sequential", "pegp", "joint")
METRICS = ("acc", "forgetting", "til_acc", "til_forgetting")
SMOKE = ["--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64"]


def table(runs: list[dict]) -> str:
    """Mean +- std per (PET, method). Joint is one task: its task-incremental columns would only repeat its ACC."""
    lines = ["| PET | method | CIL ACC | CIL Forgetting | TIL ACC | TIL Forgetting |", "|---|---|---|---|---|---|"]
    for pet in PETS:
        for method in METHODS:
            chosen = [r for r in runs if r["pet"] == pet and r["method"] == method]
            if chosen:
                cells = [
                    "-" if method == "joint" and m.startswith("til") else
                    mean_std([r[m] for r in chosen])
                    for m in METRICS
                ]  # fmt: skip
                lines.append(f"| {pet} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finished(out: Path) -> dict | None:
    """The summary a finished run left in ``out`` (the recipe writes ``results.json`` last), so an interrupted
    benchmark picks up where it stopped; ``None`` if that run has not finished."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_recipe_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/paradigms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="class-order seeds")
    parser.add_argument("--pets", nargs="+", default=list(PETS), choices=PETS)
    parser.add_argument("--no_joint", action="store_true", help="skip the joint upper bound")
    parser.add_argument("--smoke", action="store_true", help="digits, 2 tasks, 1 epoch, first seed only")
    options = parser.parse_args(own)
    seeds = options.seeds[:1] if options.smoke else options.seeds
    root = Path(options.output_dir)
    runs = []
    for pet in options.pets:
        for seed in seeds:
            out = root / f"{pet}-seed{seed}"
            common = ["--pet", pet, "--class_order_seed", str(seed), "--disable_tqdm", "true", "--logging_steps",
                      "1000"] + (SMOKE if options.smoke else []) + passthrough  # fmt: skip
            summary = finished(out) or vit_class_incremental.main(
                [*common, "--methods", "sequential", "pegp", "--output_dir", str(out)]
            )
            if not options.no_joint:
                joint = finished(out / "joint") or vit_class_incremental.main(
                    [*common, "--methods", "sequential", "--num_tasks", "1", "--output_dir", str(out / "joint")]
                )
                summary["joint"] = joint["sequential"]
            for method, results in summary.items():
                runs.append({"pet": pet, "method": method, "seed": seed, **headline(results),
                             "saturated": len(results["saturated"]),
                             "protected_tensors": len(results["subspace_dims"])})  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(runs, indent=2) + "\n")
    text = table(runs)
    (root / "table.md").write_text(text + "\n")
    print(f"\nclass-incremental and task-incremental ACC / Forgetting per PET paradigm, {len(seeds)} class order(s)\n")
    print(text)
    return runs


if __name__ == "__main__":
    main()
