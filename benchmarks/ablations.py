"""Two ablations of ``pegp``: the optimizer (is the update still off the old subspace?) and the threshold eps (the
stability-plasticity curve).

- ``optimizer``: SGD with momentum 0.9 (the update is a combination of projected gradients); AdamW with gradient
  projection only (``--update_reprojection off``: Adam's per-coordinate scaling leaves the subspace); AdamW with
  update re-projection (``on``). Reports Forgetting and the measured largest ``max |delta W U|`` over all steps.
- ``threshold``: eps in 0.5 ... 0.99 with the recipe's optimizer. Reports ACC, Forgetting and the protected share
  ``k / d`` per tensor kind after the last task.

Each setting runs the image experiment of ``recipes/vit_class_incremental.py`` (:mod:`pegp_hf.experiments.image`)
with ``--methods pegp`` per class order and writes
``<output_dir>/results.json``, ``<output_dir>/table.md`` and ``<output_dir>/threshold.png``::

    python benchmarks/ablations.py                          # embedded MNIST-5k, random-init ViT, LoRA, 1 order
    python benchmarks/ablations.py --seeds 0 1 2 -- --pet adapter
    python benchmarks/ablations.py --smoke                  # seconds: digits, 2 tasks, 1 epoch

Runs whose ``results.json`` already exists under ``--output_dir`` are read back, not run again (use a fresh
``--output_dir`` after changing settings).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pegp_hf.experiments import image
from pegp_hf.experiments.grid import classification_figures, finished, mean_std, save_grid, split_flags
from pegp_hf.plots import pyplot, save_figure

OPTIMIZERS = {
    "sgd_momentum": ["--optim", "sgd", "--optim_args", "momentum=0.9", "--update_reprojection", "auto"],
    "adamw_gradient_projection": ["--optim", "adamw_torch", "--learning_rate", "0.001", "--update_reprojection", "off"],
    "adamw_update_reprojection": ["--optim", "adamw_torch", "--learning_rate", "0.001", "--update_reprojection", "on"],
}
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
SMOKE = ["--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64"]


def run(setting: str, flags: list[str], seed: int, root: Path, common: list[str]) -> dict:
    out = root / f"{setting}-seed{seed}"
    results = (
        finished(out)
        or image.run_from_flags(
            [*common, "--methods", "pegp", "--class_order_seed", str(seed), "--output_dir", str(out), *flags]
        )
    )["pegp"]
    overlaps = [u["max_update_overlap"] for u in results["updates"] if u["max_update_overlap"] is not None]
    return {
        "setting": setting,
        "seed": seed,
        **classification_figures(results),
        "max_update_overlap": max(overlaps) if overlaps else None,
        "protected_share": results["protected_share"],
    }


def summarize(runs: list[dict], settings: list[str]) -> str:
    lines = ["| setting | CIL ACC | CIL Forgetting | TIL ACC | TIL Forgetting | max abs(dW U) | protected k/d |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for setting in settings:
        chosen = [r for r in runs if r["setting"] == setting]
        cells = [mean_std([r[m] for r in chosen]) for m in ("acc", "forgetting", "til_acc", "til_forgetting")]
        overlaps = [r["max_update_overlap"] for r in chosen if r["max_update_overlap"] is not None]
        cells.append(f"{max(overlaps):.1e}" if overlaps else "-")
        shares = defaultdict(list)
        for r in chosen:
            for kind, share in r["protected_share"].items():
                shares[kind].append(share)
        cells.append(", ".join(f"{kind} {np.mean(v):.2f}" for kind, v in shares.items()))
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_thresholds(runs: list[dict], path: Path) -> None:
    """ACC and Forgetting (class- and task-incremental) against eps: the stability-plasticity curve."""
    plt = pyplot()
    eps = [t for t in THRESHOLDS if any(r["setting"] == f"eps={t}" for r in runs)]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, (metric, label) in zip(axes, (("acc", "ACC"), ("forgetting", "Forgetting")), strict=True):
        for prefix, style in (("", "o-"), ("til_", "s--")):
            values = [[r[prefix + metric] for r in runs if r["setting"] == f"eps={t}"] for t in eps]
            axis.errorbar(eps, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], fmt=style,
                          label=f"{'task' if prefix else 'class'}-incremental", capsize=3)  # fmt: skip
        axis.set_xlabel("threshold eps")
        axis.set_ylabel(f"{label} (%)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("pegp: protecting more (higher eps) against learning more")
    save_figure(figure, path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/ablations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="class-order seeds")
    parser.add_argument(
        "--ablations", nargs="+", default=["optimizer", "threshold"], choices=["optimizer", "threshold"]
    )
    parser.add_argument("--smoke", action="store_true", help="digits, 2 tasks, 1 epoch, first seed, 2 thresholds")
    options = parser.parse_args(own)
    seeds = options.seeds[:1] if options.smoke else options.seeds
    root = Path(options.output_dir)
    common = ["--disable_tqdm", "true", "--logging_steps", "1000", *(SMOKE if options.smoke else []), *passthrough]
    settings: dict[str, list[str]] = {}
    if "optimizer" in options.ablations:
        settings.update(OPTIMIZERS)
    if "threshold" in options.ablations:
        thresholds = (THRESHOLDS[0], THRESHOLDS[-1]) if options.smoke else THRESHOLDS
        settings.update({f"eps={t}": ["--threshold", str(t)] for t in thresholds})
    runs = [run(name, flags, seed, root, common) for name, flags in settings.items() for seed in seeds]
    text = summarize(runs, list(settings))
    save_grid(root, runs, text)
    if "threshold" in options.ablations:
        plot_thresholds(runs, root / "threshold.png")
    print(f"\npegp ablations, {len(seeds)} class order(s)\n")
    print(text)
    return runs


if __name__ == "__main__":
    main()
