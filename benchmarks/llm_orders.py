"""The language recipe over several task orders: ``pegp`` against ``sequential`` and ``joint`` on SmolLM2-135M
(docs/llm.md).

Runs the experiment of ``recipes/llm_continual.py`` (:mod:`pegp_hf.experiments.language`) once per task order
(``--task_order_seed``: 0 is newsgroups -> reuters -> reviews -> tweets, 1 the reverse, k > 1 a seeded
permutation) and writes
``<output_dir>/results.json`` (every run's figures) and ``<output_dir>/table.md`` (mean +- std over orders)::

    python benchmarks/llm_orders.py --seeds 0 1 2
    python benchmarks/llm_orders.py --seeds 0 1 2 --output_dir outputs/llm_orders_eps099 -- --threshold 0.99 \\
        --methods pegp
    python benchmarks/llm_orders.py --seeds 0 1 2 --output_dir outputs/llm_orders_reference --joint_from \\
        outputs/llm_orders -- --methods pegp sequential   # intransigence against another grid's joint runs
    python benchmarks/llm_orders.py --smoke       # seconds of training: 2 tasks, 1 step each

Runs whose ``results.json`` already exists are read back, not run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pegp_hf.experiments import language
from pegp_hf.experiments.grid import finished, mean_std, save_grid, split_flags

SMOKE = ["--tasks", "reuters", "tweets", "--train_size", "8", "--test_size", "4", "--max_steps", "1",
         "--general_texts", "4", "--feature_samples", "8", "--reference_texts", "4"]  # fmt: skip
SAME_SETUP = ("model", "tasks", "train_size", "test_size", "max_text_tokens", "lora", "trained_from_layer")
FIGURES = ("acc", "forgetting", "intransigence", "exact_match", "answer_loss", "perplexity_increase", "agreement_loss")


def figures(method: str, results: dict[str, Any]) -> dict[str, Any]:
    """The table's figures of one method's results (``joint``: its per-task means; ``intransigence`` only where the
    same order ran ``joint``)."""
    if method == "joint":
        seconds = results["timings"][0]["train_seconds"]
        return {"acc": results["accuracy"], "exact_match": results["exact_match"],
                "answer_loss": results["answer_loss"], "train_seconds": seconds}  # fmt: skip
    last, before = results["task_metrics"][-1], results["initial_metrics"]
    return {
        "acc": results["acc"], "forgetting": results["forgetting"], "intransigence": results.get("intransigence"),
        "exact_match": results["exact_match"]["average"], "answer_loss": results["answer_loss"]["average"],
        "perplexity_increase": last.get("general_perplexity_increase"),
        "perplexity": [before.get("general_perplexity"), last.get("general_perplexity")],
        "agreement_loss": None if "answer_agreement" not in last else 100.0 - last["answer_agreement"],
        "train_seconds": sum(t["train_seconds"] for t in results["timings"]),
        "capture_seconds": sum(t["capture_seconds"] for t in results["timings"]),
        "tasks": results["tasks"],
    }  # fmt: skip


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| method | ACC | Forgetting | intransigence | exact match | answer loss | perplexity increase "
             "| agreement loss (%) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in ("sequential", "pegp", "joint"):
        chosen = [r for r in runs if r["method"] == method]
        if not chosen:
            continue
        cells = []
        for key in FIGURES:
            values = [r[key] for r in chosen if r.get(key) is not None]
            cells.append("-" if not values else mean_std(values) if key != "answer_loss" else
                         f"{np.mean(values):.3f} +- {np.std(values):.3f}")  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seconds = {m: {r["seed"]: r["train_seconds"] for r in runs if r["method"] == m} for m in ("pegp", "sequential")}
    ratios = [seconds["pegp"][s] / seconds["sequential"][s] for s in seconds["pegp"] if s in seconds["sequential"]]
    shares = [r["capture_seconds"] / r["train_seconds"] for r in runs if r["method"] == "pegp"]
    if ratios:
        lines.append(f"\npegp's training time / sequential's: {np.mean(ratios):.3f} ({min(ratios):.3f} - "
                     f"{max(ratios):.3f}); feature pass / training time: {np.mean(shares):.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/llm_orders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="task-order seeds")
    parser.add_argument("--smoke", action="store_true", help="2 tasks, 1 step each, first seed only")
    parser.add_argument("--joint_from", default=None, help="a grid folder of the same orders whose joint runs give "
                        "the intransigence of a grid without joint (same tasks, sizes, model: checked)")  # fmt: skip
    options = parser.parse_args(own)
    seeds = options.seeds[:1] if options.smoke else options.seeds
    root = Path(options.output_dir)
    runs = []
    for seed in seeds:
        out = root / f"order{seed}"
        flags = ["--task_order_seed", str(seed), "--output_dir", str(out), "--disable_tqdm", "true",
                 *(SMOKE if options.smoke else []), *passthrough]  # fmt: skip
        summary = finished(out) or language.run(*language.parse_args(flags))
        if "joint" not in summary and options.joint_from:
            joint = finished(Path(options.joint_from) / f"order{seed}")
            if joint is None or "joint" not in joint:
                raise ValueError(f"--joint_from {options.joint_from}: order {seed} has no finished joint run there")
            ours = next(iter(summary.values()))
            differ = [key for key in SAME_SETUP if joint["joint"].get(key) != ours.get(key)]
            if differ:
                raise ValueError(f"--joint_from {options.joint_from}: order {seed}'s joint run differs in {differ}; "
                                 "give a grid of the same tasks, sizes, model and LoRA")  # fmt: skip
            language.add_intransigence({**summary, "joint": joint["joint"]})
        language.add_intransigence(summary)  # runs read back from before it was recorded get it too
        runs += [{"method": method, "seed": seed, **figures(method, results)} for method, results in summary.items()]
    text = table(runs)
    save_grid(root, runs, text)
    print(f"\nSmolLM2-135M, {len(seeds)} task order(s)\n\n{text}")
    return runs


if __name__ == "__main__":
    main()
