"""Class-incremental accuracy of PEGP against the simple baselines of pre-trained continual learning (issue 17):
the frozen backbone with a statistics head (``head_only``: SimpleCIL / RanPAC without adaptation), first-session
adaptation (``first_session``, APER) and sequential tuning, each with the aligned and the RanPAC head, and PEGP with
its thresholds and drift compensation (SDC), all on the same data, class orders and backbone.

Runs the image experiment of ``recipes/vit_class_incremental.py`` once per (setting, class order), on DINOv2-S/14 with
AdamW at lr 1e-3 by default, and writes ``<output_dir>/results.json`` and ``<output_dir>/table.md`` (mean +- std over
orders)::

    python benchmarks/baselines.py --seeds 0 1 2                          # sklearn digits, 3 epochs per task
    python benchmarks/baselines.py --seeds 0 1 2 --output_dir outputs/baselines_cross -- --dataset mnist+animals \\
        --num_tasks 4 --num_train_epochs 1                                 # a cross-data-set sequence
    python benchmarks/baselines.py --smoke                                 # seconds: tiny ViT, 2 tasks

Flags after ``--`` go to the recipe. Runs whose ``results.json`` exists under ``<output_dir>/<setting>/order<k>/`` are
read back, not run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pegp_hf.experiments import image
from pegp_hf.experiments.grid import classification_figures, finished, labelled_table, save_grid, split_flags

# setting -> (row label, the recipe's flags)
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "head_only_aligned": ("head_only, aligned head (frozen backbone)", ["--methods", "head_only", "--head", "aligned"]),
    "head_only_ranpac": ("head_only, RanPAC head (frozen backbone)", ["--methods", "head_only", "--head", "ranpac"]),
    "first_session_aligned": ("first_session, aligned head (APER)",
                              ["--methods", "first_session", "--head", "aligned"]),
    "first_session_ranpac": ("first_session, RanPAC head", ["--methods", "first_session", "--head", "ranpac"]),
    "sequential_aligned": ("sequential, aligned head", ["--methods", "sequential", "--head", "aligned"]),
    "pegp_aligned": ("pegp eps 0.97, aligned head", ["--methods", "pegp", "--head", "aligned"]),
    "pegp_aligned_sdc": ("pegp eps 0.97, aligned head + drift compensation",
                         ["--methods", "pegp", "--head", "aligned", "--drift_compensation", "true"]),
    "pegp_aligned_099": ("pegp eps 0.99, aligned head", ["--methods", "pegp", "--head", "aligned", "--threshold",
                                                         "0.99"]),
    "pegp_ranpac": ("pegp eps 0.97, RanPAC head", ["--methods", "pegp", "--head", "ranpac"]),
    "pegp_ranpac_099": ("pegp eps 0.99, RanPAC head", ["--methods", "pegp", "--head", "ranpac", "--threshold", "0.99"]),
    "pegp_ranpac_0999": ("pegp eps 0.999, RanPAC head", ["--methods", "pegp", "--head", "ranpac", "--threshold",
                                                         "0.999"]),
}  # fmt: skip
DEFAULTS = ["--backbone", "dinov2-small", "--dataset", "digits", "--num_train_epochs", "3", "--optim", "adamw_torch",
            "--learning_rate", "0.001", "--threshold", "0.97", "--pet_layers", "paper", "--plots", "false"]  # fmt: skip
SMOKE = ["--backbone", "vit-tiny", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64",
         "--align_epochs", "1", "--ranpac_dim", "64"]  # fmt: skip
LABELS = {"acc": "CIL ACC", "forgetting": "CIL Forgetting", "til_acc": "TIL ACC", "til_forgetting": "TIL Forgetting"}


def table(runs: list[dict[str, Any]]) -> str:
    """One row per setting, mean +- std over the class orders it ran on (their count in the last column)."""
    return labelled_table(runs, LABELS, "setting")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/baselines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="class-order seeds")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, digits, 2 tasks, first seed only")
    options = parser.parse_args(own)
    seeds = options.seeds[:1] if options.smoke else options.seeds
    root = Path(options.output_dir)
    runs = []
    for setting in options.settings:
        label, flags = SETTINGS[setting]
        for seed in seeds:
            out = root / setting / f"order{seed}"
            common = [*DEFAULTS, *flags, "--class_order_seed", str(seed), "--output_dir", str(out),
                      "--disable_tqdm", "true", "--logging_steps", "1000", *(SMOKE if options.smoke else []),
                      *passthrough]  # fmt: skip
            summary = finished(out) or image.run_from_flags(common)
            runs += [{"setting": setting, "label": label, "method": method, "seed": seed,
                      **classification_figures(results)} for method, results in summary.items()]  # fmt: skip
    text = table(runs)
    save_grid(root, runs, text)
    print(f"\nclass-incremental baselines, {len(seeds)} class order(s)\n\n{text}")
    return runs


if __name__ == "__main__":
    main()
