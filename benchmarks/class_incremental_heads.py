"""Class-incremental ACC / Forgetting for every (head, method) pair over several class orders.

Runs the image experiment of ``recipes/vit_class_incremental.py`` (:mod:`pegp_hf.experiments.image`) once per
(head, seed) with ``--methods head_only sequential pegp`` (or ``--methods``) and
writes ``<output_dir>/results.json`` (every run) and ``<output_dir>/table.md`` (mean +- std over seeds)::

    python benchmarks/class_incremental_heads.py                      # embedded MNIST-5k, 3 class orders
    python benchmarks/class_incremental_heads.py --smoke              # seconds: digits, 2 tasks, 1 seed
    python benchmarks/class_incremental_heads.py -- --threshold 0.97  # flags after -- go to the recipe
    python benchmarks/class_incremental_heads.py -- --pet prompt --pet_width 10 --pet_layers paper
    python benchmarks/class_incremental_heads.py --heads ranpac --methods head_only first_session pegp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pegp_hf.config import METHODS as ALL_METHODS
from pegp_hf.continual import HEADS
from pegp_hf.experiments import image
from pegp_hf.experiments.grid import classification_figures, mean_std, save_grid, split_flags

METHODS = ("head_only", "sequential", "pegp")  # the default; rows follow ROW_ORDER
ROW_ORDER = ("head_only", "first_session", "sequential", "pegp")
# The LoRA setting of docs/results.md (it predates --pet and the paper's rank 5 on the first 5/12 of the blocks).
PUBLISHED_LORA = ["--pet", "lora", "--pet_width", "8", "--pet_layers", "all"]
SMOKE = ["--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64",
         "--align_epochs", "1"]  # fmt: skip


LABELS = {"acc": "CIL ACC", "forgetting": "CIL Forgetting", "til_acc": "TIL ACC", "til_forgetting": "TIL Forgetting"}


def table(runs: list[dict], metrics: tuple[str, ...]) -> str:
    """Mean +- std over class orders of each metric (``LABELS`` names the columns), one row per (head, method)."""
    header = " | ".join(LABELS.get(metric, metric) for metric in metrics)
    lines = [f"| head | method | {header} |", "|---|---|" + "---|" * len(metrics)]
    for head in HEADS:
        for method in ROW_ORDER:
            chosen = [r for r in runs if r["head"] == head and r["method"] == method]
            if not chosen:
                continue
            cells = [mean_std([r[metric] for r in chosen]) for metric in metrics]
            lines.append(f"| {head} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/class_incremental_heads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="class-order seeds")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS)
    parser.add_argument("--smoke", action="store_true", help="digits, 2 tasks, 1 epoch, first seed only")
    options = parser.parse_args(own)
    seeds = options.seeds[:1] if options.smoke else options.seeds
    root = Path(options.output_dir)
    runs = []
    for head in options.heads:
        for seed in seeds:
            out = root / f"{head}-seed{seed}"
            summary = image.run_from_flags(
                ["--methods", *options.methods, "--head", head, "--class_order_seed", str(seed),
                 "--output_dir", str(out), "--disable_tqdm", "true", "--logging_steps", "1000", *PUBLISHED_LORA]
                + (SMOKE if options.smoke else []) + passthrough
            )  # fmt: skip
            for method, results in summary.items():
                runs.append({"head": head, "method": method, "seed": seed, **classification_figures(results)})
    text = table(runs, ("acc", "forgetting", "til_acc", "til_forgetting"))
    save_grid(root, runs, text)
    print(f"\nclass-incremental ACC / Forgetting and task-incremental ACC / Forgetting, {len(seeds)} class orders\n")
    print(text)
    return runs


if __name__ == "__main__":
    main()
