"""Where a projected prompt update still moves old outputs (issue 16): per layer, the change of the old tokens'
attention outputs on task-1 test images between the task-1 and the task-2 prompts, split exactly into three parts.

The image recipe (``--pet prompt``, two tasks) trains ``pegp`` and ``sequential``; then, for each, the backbone is
loaded with its ``task-1`` and its ``task-2`` prompts, and every block's query, key and value projections are read
on the same task-1 test images. With ``A(Q, K, V)`` the softmax attention of the old tokens' queries (every row but
the prompt rows ``1 .. L``), primes for the task-2 state and ``p`` / ``x`` for the prompt rows / the other rows::

    total      = A(Q', [K'p, K'x], [V'p, V'x]) - A(Q, [Kp, Kx], [Vp, Vx])
    propagated = A(Q', [Kp,  K'x], [Vp,  V'x]) - A(Q, [Kp, Kx], [Vp, Vx])   # the old tokens drifted upstream
    keys       = A(Q', [K'p, K'x], [Vp,  V'x]) - A(Q', [Kp, K'x], [Vp, V'x])  # the prompt rows' attention weights
    values     = A(Q', [K'p, K'x], [V'p, V'x]) - A(Q', [K'p, K'x], [Vp, V'x])  # the prompt rows' values

so ``total = propagated + keys + values`` to float error (the parts are taken in that order: another order would
split the cross terms differently). At a prompted block rows ``1 .. L`` hold that block's prompt; at a block without
one they hold what the prompt rows became in the blocks before, so there ``keys`` and ``values`` are the change
through those rows (the prompt's own update and the drift those rows took on upstream). Each part is reported as
its Frobenius norm over images, tokens and heads relative to that of ``A(Q, K, V)``. ``key logits`` is
``|Q' (K'p - Kp)^T| / |Q' Kp^T|``: the change of the old queries' logits on the prompt rows, which the paper's
condition (``x dp^T = 0`` on the raw prompt, before LayerNorm and ``W_K``) is meant to remove. Writes
``<output_dir>/results.json`` and ``<output_dir>/table.md``::

    python benchmarks/prompt_drift.py -- --backbone dinov2-small --dataset digits --num_train_epochs 3 \\
        --optim adamw_torch --learning_rate 0.001 --threshold 0.97     # the DINOv2 digits setting of the benchmarks
    python benchmarks/prompt_drift.py --smoke                        # seconds: tiny ViT, 1 epoch

Flags after ``--`` go to the recipe. A finished recipe run under ``<output_dir>/run`` is read back, not run again,
if it was made with the same flags (``<output_dir>/run/flags.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pegp_hf.experiments import image
from pegp_hf.experiments.grid import finished, save_grid, split_flags
from pegp_hf.tuners.discovery import QKV_NAMES, attention_heads, attention_module, find_block_stacks
from pegp_hf.tuners.model import load_pet_pretrained

SMOKE = ["--dataset", "digits", "--num_train_epochs", "1", "--feature_samples", "64"]
PARTS = ("propagated", "keys", "values", "total")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention without a mask: ``(B, H, T, d_h)`` queries on ``(B, H, S, d_h)`` keys and values."""
    weights = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
    return weights @ value


def decompose(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], rows: slice) -> dict[str, float]:
    """The parts of the change of the old tokens' attention outputs (module docstring), relative to their size.

    Args:
        before, after: ``{"query", "key", "value"}`` ``(B, H, S, d_h)`` of one layer in the two states.
        rows: the prompt rows of the sequence (``slice(1, 1 + L)``).
    """
    old = torch.ones(before["query"].shape[2], dtype=torch.bool)
    old[rows] = False

    def mixed(keys_from: dict, values_from: dict) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = after["key"].clone(), after["value"].clone()
        key[:, :, rows], value[:, :, rows] = keys_from["key"][:, :, rows], values_from["value"][:, :, rows]
        return key, value

    query, query_after = before["query"][:, :, old], after["query"][:, :, old]
    reference = attend(query, before["key"], before["value"])
    upstream = attend(query_after, *mixed(before, before))
    new_keys = attend(query_after, *mixed(after, before))
    final = attend(query_after, after["key"], after["value"])
    size = reference.norm()
    parts = {"propagated": upstream - reference, "keys": new_keys - upstream, "values": final - new_keys,
             "total": final - reference}  # fmt: skip
    figures = {name: float(part.norm() / size) for name, part in parts.items()}
    figures["sum_error"] = float((parts["propagated"] + parts["keys"] + parts["values"] - parts["total"]).norm() / size)
    prompt_keys = before["key"][:, :, rows]
    logits = query_after @ prompt_keys.transpose(-1, -2)
    figures["key_logits"] = float((query_after @ (after["key"][:, :, rows] - prompt_keys).transpose(-1, -2)).norm()
                                  / logits.norm())  # fmt: skip
    return figures


@contextmanager
def reading_qkv(model: nn.Module):
    """Within the block, ``{block index: {"query", "key", "value"}}`` of the backbone's last forward, each
    ``(B, H, S, d_h)`` (the first block stack's blocks)."""
    read: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    _, stack = find_block_stacks(model)[0]
    for index, block in enumerate(stack):
        _, attention = attention_module(block)
        heads, head_dim = attention_heads(attention)
        names = next((n for n in QKV_NAMES if all(hasattr(attention, name) for name in n)), None)
        if names is None:
            raise ValueError(f"{type(attention).__name__} fuses its query, key and value projections: the drift is "
                             "read from separate q / k / v projections")  # fmt: skip

        def keep(kind: str, index: int = index, heads: int = heads, head_dim: int = head_dim):
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                batch, length, _ = output.shape
                per_head = output.detach().float().view(batch, length, heads, head_dim).transpose(1, 2)
                read.setdefault(index, {})[kind] = per_head

            return hook

        for kind, name in zip(("query", "key", "value"), names, strict=True):
            handles.append(getattr(attention, name).register_forward_hook(keep(kind)))
    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()


def measure(flags: list[str], run_dir: Path, method: str, images: int) -> list[dict[str, Any]]:
    """One row per block from the first prompted one: the parts of ``method``'s drift on task-1 test images."""
    script, args = image.parse_args([*flags, "--output_dir", str(run_dir)])
    train, test, label_column = image.load_data(script)
    tasks = image.build_tasks(script, train, test, label_column)
    num_labels = 1 + max(max(task.classes) for task in tasks)
    model = image.build_model(script, num_labels, args.seed).eval()
    batch = tasks[0].test.select(range(min(images, len(tasks[0].test))))[:]
    pixels = torch.stack([torch.as_tensor(p) for p in batch["pixel_values"]])
    states = []
    for task in (1, 2):
        load_pet_pretrained(model, run_dir / method / f"task-{task}")
        with torch.no_grad(), reading_qkv(model) as read:
            model(pixel_values=pixels)
        states.append(read)
    blocks = find_block_stacks(model)[0][1]
    prompted = {i for i, block in enumerate(blocks) if hasattr(block, "pegp_prompt")}
    if not prompted:
        raise ValueError("the model has no prompts: the drift is measured for --pet prompt (do not pass another --pet)")
    length = blocks[min(prompted)].pegp_prompt.prompt.shape[0]
    return [{"method": method, "layer": i, "prompted": i in prompted,
             **decompose(states[0][i], states[1][i], slice(1, 1 + length))}
            for i in sorted(states[0]) if i >= min(prompted)]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (method, layer): the parts relative to the old outputs, and the key-logit change."""
    lines = ["| method | layer | prompted | propagated | keys | values | total | key logits |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = [f"{row[name]:.2e}" for name in (*PARTS, "key_logits")]
        lines.append(f"| {row['method']} | {row['layer']} | {'yes' if row['prompted'] else 'no'} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/prompt_drift")
    parser.add_argument("--images", type=int, default=64, help="task-1 test images the drift is measured on")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, digits, 1 epoch")
    options = parser.parse_args(own)
    root = Path(options.output_dir)
    flags = ["--pet", "prompt", "--num_tasks", "2", "--methods", "pegp", "sequential", "--plots", "false",
             "--disable_tqdm", "true", "--logging_steps", "1000", *(SMOKE if options.smoke else []),
             *passthrough]  # fmt: skip
    recorded = root / "run" / "flags.json"
    if finished(root / "run") is None:
        image.run_from_flags([*flags, "--output_dir", str(root / "run")])
        recorded.write_text(json.dumps(flags) + "\n")
    elif not recorded.exists() or json.loads(recorded.read_text()) != flags:
        raise ValueError(f"{root / 'run'} holds a run made with other flags than {flags}: give another --output_dir")
    rows = [row for method in ("pegp", "sequential") for row in measure(flags, root / "run", method, options.images)]
    text = table(rows)
    save_grid(root, rows, text)
    print(f"\nchange of the old tokens' attention outputs, relative to their size, task 1 -> task 2\n\n{text}")
    return rows


if __name__ == "__main__":
    main()
