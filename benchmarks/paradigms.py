"""ACC / Forgetting of ``pegp`` against ``sequential`` (lower bound) and ``joint`` (upper bound) for each PET
paradigm (LoRA, adapter, prefix, prompt).

Runs the image experiment of ``recipes/vit_class_incremental.py`` (:mod:`pegp_hf.experiments.image`) with
``--pet <pet> --methods sequential pegp`` once per (paradigm, class order),
and ``joint``: the same recipe on one task holding every class (``--num_tasks 1``; its ACC is the accuracy on the
whole test set, its Forgetting 0 by definition), then writes ``<output_dir>/results.json`` (every run) and
``<output_dir>/table.md`` (mean +- std over orders) and ``<output_dir>/paradigms.png`` (the same as bars)::

    python benchmarks/paradigms.py                       # embedded MNIST-5k, random-init ViT, class order 0
    python benchmarks/paradigms.py --seeds 0 1 2         # 3 class orders
    python benchmarks/paradigms.py --smoke               # seconds: digits, 2 tasks, 1 epoch
    python benchmarks/paradigms.py -- --backbone dinov2-small --num_train_epochs 1 --optim adamw_torch \
        --learning_rate 0.001 --threshold 0.97          # the pretrained DINOv2-S/14 (docs/benchmarks.md)

Runs whose ``results.json`` already exists under ``--output_dir`` are read back, not run again: an interrupted grid
continues where it stopped (use a fresh ``--output_dir`` after changing settings).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pegp_hf.experiments import image
from pegp_hf.experiments.grid import classification_figures, finished, mean_std, save_grid, split_flags
from pegp_hf.plots import pyplot, save_figure
from pegp_hf.tuners import PAPER_PARADIGMS, available_pets

METHODS = ("sequential", "pegp", "joint")
METRICS = ("acc", "forgetting", "til_acc", "til_forgetting")
SMOKE = ["--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64"]


def spread(values: list[float]) -> str:
    """``"mean (min - max)"`` of ratios, two decimals."""
    return f"{np.mean(values):.2f} ({min(values):.2f} - {max(values):.2f})"


def table(runs: list[dict], times: bool = True) -> str:
    """Mean +- std per (PET, method). Joint is one task: its task-incremental columns would only repeat its ACC.

    With ``times``, for ``pegp``, two time ratios, mean (min - max) over orders: its training time against
    ``sequential``'s on the same order (the per-step projection, end to end), and its feature capture + basis growth
    against its own training time (leave them out for a grid that shared the machine).
    """
    header = "| PET | method | CIL ACC | CIL Forgetting | TIL ACC | TIL Forgetting |"
    lines = [header + (" train time / sequential | capture / train time |" if times else ""),
             "|---" * (8 if times else 6) + "|"]  # fmt: skip
    for pet in available_pets():
        for method in METHODS:
            chosen = [r for r in runs if r["pet"] == pet and r["method"] == method]
            if not chosen:
                continue
            cells = [
                "-" if method == "joint" and m.startswith("til") else
                mean_std([r[m] for r in chosen])
                for m in METRICS
            ]  # fmt: skip
            if times:
                cells += ["-", "-"]
                if method == "pegp":
                    plain = {r["seed"]: r["train_seconds"] for r in runs
                             if r["pet"] == pet and r["method"] == "sequential"}  # fmt: skip
                    paired = [r["train_seconds"] / plain[r["seed"]] for r in chosen if r["seed"] in plain]
                    shares = [r["capture_seconds"] / r["train_seconds"] for r in chosen]
                    cells[-2:] = [spread(paired) if paired else "-", spread(shares)]
            lines.append(f"| {pet} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(grids: Mapping[str, list[dict]]) -> str:
    """Forgetting of ``pegp`` against ``sequential`` per PET, mean over orders: task-incremental, then
    class-incremental, one column per grid (``{"digits": runs, "MNIST-5k": runs}``, each a grid's ``results.json``)."""
    names = list(grids)
    header = [f"{kind} Forgetting, {name}: pegp / seq" for kind in ("TIL", "CIL") for name in names]
    lines = ["| PET | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for pet in available_pets():
        cells = []
        for metric in ("til_forgetting", "forgetting"):
            for name in names:
                means = {method: [r[metric] for r in grids[name] if r["pet"] == pet and r["method"] == method]
                         for method in ("pegp", "sequential")}  # fmt: skip
                if all(means.values()):
                    cells.append(f"{np.mean(means['pegp']):.1f} / {np.mean(means['sequential']):.1f}")
        if len(cells) == len(header):
            lines.append(f"| {pet} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Bars per PET and method, mean with the std over class orders as error bars: CIL ACC (with ``joint``, the upper
    bound), CIL Forgetting and TIL Forgetting (``pegp`` against ``sequential``)."""
    plt = pyplot()
    pets = [p for p in available_pets() if any(r["pet"] == p for r in runs)]
    panels = (("acc", "class-incremental ACC", METHODS), ("forgetting", "class-incremental Forgetting", METHODS[:2]),
              ("til_forgetting", "task-incremental Forgetting", METHODS[:2]))  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5))
    for axis, (metric, title, methods) in zip(axes, panels, strict=True):
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            values = [[r[metric] for r in runs if r["pet"] == pet and r["method"] == method] for pet in pets]
            x = np.arange(len(pets)) + (i - (len(methods) - 1) / 2) * width
            means = [np.mean(v) if v else np.nan for v in values]
            stds = [np.std(v) if v else 0.0 for v in values]
            axis.bar(x, means, width, yerr=stds, capsize=3, label=method)
        axis.set_xticks(np.arange(len(pets)), pets)
        axis.set(title=title, ylabel="%")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(figure, path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/paradigms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="class-order seeds")
    parser.add_argument("--pets", nargs="+", default=list(PAPER_PARADIGMS), choices=available_pets())
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
            summary = finished(out) or image.run_from_flags(
                [*common, "--methods", "sequential", "pegp", "--output_dir", str(out)]
            )
            if not options.no_joint:
                joint = finished(out / "joint") or image.run_from_flags(
                    [*common, "--methods", "sequential", "--num_tasks", "1", "--output_dir", str(out / "joint")]
                )
                summary["joint"] = joint["sequential"]
            for method, results in summary.items():
                runs.append({"pet": pet, "method": method, "seed": seed, **classification_figures(results),
                             "saturated": len(results["saturated"]),
                             "protected_tensors": len(results["subspace_dims"]),
                             "train_seconds": sum(t["train_seconds"] for t in results["timings"]),
                             "capture_seconds": sum(t["capture_seconds"] for t in results["timings"])})  # fmt: skip
    text = table(runs)
    save_grid(root, runs, text)
    plot(runs, root / "paradigms.png")
    print(f"\nclass-incremental and task-incremental ACC / Forgetting per PET paradigm, {len(seeds)} class order(s)\n")
    print(text)
    return runs


if __name__ == "__main__":
    main()
