"""Zero-shot retention on the CLIP recipe's embedded default: ``sequential``, ``pegp``, ``pegp`` with a reference
set ("task 0": the base split's images, ``--reference base``, or its images and captions, ``--reference
base_with_captions``), with replay of old-class image prototypes (``--prototype_replay``) and a re-fit of the text
projection on their stored embeddings (``--refit_scale``), joint training of every
class at once, and both methods on a LoRA initialised by PEFT's CorDA
in knowledge-preserved mode (``--lora_init corda_kpm``, the initialisation-only anchor), over several class orders
(docs/clip.md).

Runs the experiment of ``recipes/clip_bitm.py`` (:mod:`pegp_hf.experiments.crossmodal`) once per (setting, class
order) and writes ``<output_dir>/results.json`` (every run's figures) and ``<output_dir>/table.md`` (mean +- std over
orders)::

    python benchmarks/clip_reference.py --seeds 0 1 2
    python benchmarks/clip_reference.py --seeds 0 --settings reference_eps09 reference_eps0999 reference_128 \
        --output_dir outputs/clip_reference_sweep           # other thresholds and sizes of the reference
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings reference_captions \
        --output_dir outputs/clip_reference_captions   # the base captions too: a reference for the text tower
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings no_training \
        --output_dir outputs/clip_no_training        # the aligned model as it is: what no learning scores
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings prototypes prototypes_reference joint \
        --output_dir outputs/clip_prototypes         # replay of old-class image prototypes, and joint training
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings prototypes_stored prototypes_stored_reference \
        --output_dir outputs/clip_prototypes_stored  # the old images' own embeddings replayed
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings prototypes_text_free prototypes_stored_text_free \
        --output_dir outputs/clip_text_free          # the text tower left unprotected, kept by replay alone
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings refit refit_w3 refit_w10 \
        stored_reference_text_free --output_dir outputs/clip_refit  # the text projection re-fitted on stored embeddings
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings refit_margin refit_margin_w3 refit_margin_w1 \
        --output_dir outputs/clip_refit_margin  # its reference term keeping decisions instead of probabilities
    python benchmarks/clip_reference.py --seeds 0 --settings prototypes_w1 prototypes_covariance \
        prototypes_reference_w3 prototypes_reference_means --output_dir outputs/clip_prototypes_sweep
    python benchmarks/clip_reference.py --seeds 0 1 2 --settings corda --output_dir outputs/clip_corda
                                                    # LoRA from PEFT's CorDA (knowledge-preserved mode) instead
    python benchmarks/clip_reference.py --smoke      # 2 tasks, 2 steps each, first seed only

Runs whose ``results.json`` already exists under ``<output_dir>/<setting>/order<k>/`` are read back, not run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pegp_hf.experiments import crossmodal
from pegp_hf.experiments.grid import finished, labelled_table, save_grid, split_flags

# the stored embeddings kept current enough to re-fit on: eps 0.999 on the image tower, every training image stored
STORED_1024 = ["--prototype_replay", "10", "--prototype_spread", "stored", "--threshold", "0.999",
               "--feature_samples", "1024"]  # fmt: skip


def refit(reference_weight: int, margin: float | None = None) -> tuple[list[str], dict[str, str]]:
    """The setting of the text projection's re-fit at scale 100 with this reference weight, on top of
    ``stored_reference_text_free``: the KL reference term, or with a ``margin`` the decision-margin term."""
    flags = ["--methods", "pegp", "--protect", "vision_model", "--reference", "base", *STORED_1024, "--refit_scale",
             "100", "--refit_reference_weight", str(reference_weight)]  # fmt: skip
    term = f"reference weight {reference_weight}"
    if margin is not None:
        flags += ["--refit_reference_loss", "margin", "--refit_margin", str(margin)]
        term = f"decision margin {margin}, weight {reference_weight}"
    return flags, {"pegp": f"pegp on the image tower only + reference + stored embeddings + text projection re-fit "
                           f"(scale 100, {term})"}  # fmt: skip


# setting -> (the recipe's flags, the label of each method's row)
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "baseline": (["--methods", "pegp", "sequential"], {"sequential": "sequential", "pegp": "pegp"}),
    "reference": (["--methods", "pegp", "--reference", "base"], {"pegp": "pegp + reference (eps 0.99, 512 images)"}),
    "reference_eps09": (["--methods", "pegp", "--reference", "base", "--reference_threshold", "0.9"],
                        {"pegp": "pegp + reference (eps 0.9, 512 images)"}),
    "reference_eps0999": (["--methods", "pegp", "--reference", "base", "--reference_threshold", "0.999"],
                          {"pegp": "pegp + reference (eps 0.999, 512 images)"}),
    "reference_128": (["--methods", "pegp", "--reference", "base", "--reference_samples", "128"],
                      {"pegp": "pegp + reference (eps 0.99, 128 images)"}),
    "reference_captions": (["--methods", "pegp", "--reference", "base_with_captions"],
                           {"pegp": "pegp + reference of images and captions (eps 0.99, 512 each)"}),
    "no_training": (["--methods", "sequential", "--learning_rate", "0"],
                    {"sequential": "no training (the aligned model, learning rate 0)"}),
    "prototypes": (["--methods", "pegp", "sequential", "--prototype_replay", "10"],
                   {"pegp": "pegp + prototypes (weight 10)", "sequential": "sequential + prototypes (weight 10)"}),
    "prototypes_reference": (["--methods", "pegp", "--reference", "base", "--prototype_replay", "10"],
                             {"pegp": "pegp + reference + prototypes (weight 10)"}),
    "prototypes_w1": (["--methods", "pegp", "--prototype_replay", "1"], {"pegp": "pegp + prototypes (weight 1)"}),
    "prototypes_covariance": (["--methods", "pegp", "--prototype_replay", "10", "--prototype_spread", "covariance"],
                              {"pegp": "pegp + prototypes (weight 10, covariance spread)"}),
    "prototypes_reference_w3": (["--methods", "pegp", "--reference", "base", "--prototype_replay", "3"],
                                {"pegp": "pegp + reference + prototypes (weight 3)"}),
    "prototypes_reference_means": (["--methods", "pegp", "--reference", "base", "--prototype_replay", "10",
                                    "--prototype_noise", "0"],
                                   {"pegp": "pegp + reference + prototype means only (weight 10, noise 0)"}),
    "prototypes_stored": (["--methods", "pegp", "--prototype_replay", "10", "--prototype_spread", "stored"],
                          {"pegp": "pegp + stored embeddings (weight 10)"}),
    "prototypes_stored_reference": (["--methods", "pegp", "--reference", "base", "--prototype_replay", "10",
                                     "--prototype_spread", "stored"],
                                    {"pegp": "pegp + reference + stored embeddings (weight 10)"}),
    "prototypes_text_free": (["--methods", "pegp", "--protect", "vision_model", "--prototype_replay", "10"],
                             {"pegp": "pegp on the image tower only + prototypes (weight 10)"}),
    "prototypes_stored_text_free": (["--methods", "pegp", "--protect", "vision_model", "--prototype_replay", "10",
                                     "--prototype_spread", "stored"],
                                    {"pegp": "pegp on the image tower only + stored embeddings (weight 10)"}),
    "stored_reference_text_free": (["--methods", "pegp", "--protect", "vision_model", "--reference", "base",
                                    *STORED_1024],
                                   {"pegp": "pegp on the image tower only + reference + stored embeddings (weight 10, "
                                            "eps 0.999, 1024 per task)"}),
    **{name: refit(weight) for name, weight in (("refit", 5), ("refit_w3", 3), ("refit_w10", 10))},
    **{name: refit(weight, 0.05) for name, weight in (("refit_margin", 2), ("refit_margin_w3", 3),
                                                      ("refit_margin_w1", 1))},
    "joint": (["--methods", "sequential", "--num_tasks", "1"],
              {"sequential": "joint (every class in one task; no old task, so no hallucination figure)"}),
    "corda": (["--methods", "pegp", "sequential", "--lora_init", "corda_kpm"],
              {"pegp": "pegp, CorDA KPM init", "sequential": "sequential, CorDA KPM init"}),
}  # fmt: skip
SMOKE = ["--num_tasks", "2", "--max_steps", "2", "--alignment_epochs", "20", "--zero_shot_samples", "100",
         "--feature_samples", "32", "--reference_samples", "32", "--corda_samples", "8"]  # fmt: skip
COLUMNS = {"zero_shot_before": "zero-shot before", "zero_shot_after": "zero-shot after the last task",
           "acc": "CIL ACC", "forgetting": "CIL Forgetting", "til_acc": "TIL ACC", "til_forgetting": "TIL Forgetting",
           "hallucination": "hallucination after the last task"}  # fmt: skip


def figures(results: dict[str, Any]) -> dict[str, float | None]:
    """The table's figures of one method's results."""
    last = results["task_metrics"][-1]
    return {
        "zero_shot_before": results["initial_metrics"].get("zero_shot_acc"),
        "zero_shot_after": last.get("zero_shot_acc"),
        "acc": results["class_incremental"]["average"],
        "forgetting": results["class_incremental"]["forgetting"],
        "til_acc": results["task_incremental"]["average"],
        "til_forgetting": results["task_incremental"]["forgetting"],
        "hallucination": last.get("hallucination_rate"),
        "image_to_text": results["image_to_text"]["average"],  # not in the table: joint runs' caption matching
        "reference_share": results["initial_metrics"].get("reference_protected_share/lora_A"),
    }


def table(runs: list[dict[str, Any]]) -> str:
    """One row per method label, mean +- std over the class orders it ran on (their count in the last column)."""
    return labelled_table(runs, COLUMNS, "method")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/clip_reference")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="class-order seeds")
    parser.add_argument("--settings", nargs="+", default=["baseline", "reference"], choices=list(SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="2 tasks, 2 steps each, first seed only")
    options = parser.parse_args(own)
    seeds = options.seeds[:1] if options.smoke else options.seeds
    root = Path(options.output_dir)
    runs = []
    for setting in options.settings:
        flags, labels = SETTINGS[setting]
        for seed in seeds:
            out = root / setting / f"order{seed}"
            common = [*flags, "--class_order_seed", str(seed), "--output_dir", str(out), "--disable_tqdm", "true",
                      *(SMOKE if options.smoke else []), *passthrough]  # fmt: skip
            summary = finished(out) or crossmodal.run(*crossmodal.parse_args(common))
            runs += [{"setting": setting, "label": labels[method], "method": method, "seed": seed,
                      **figures(results)} for method, results in summary.items()]  # fmt: skip
    text = table(runs)
    save_grid(root, runs, text)
    print(f"\nCLIP embedded default, {len(seeds)} class order(s)\n\n{text}")
    return runs


if __name__ == "__main__":
    main()
