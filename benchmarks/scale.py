"""Memory of the feature covariances and bases at a 7B-class model's width, measured on a random-init Llama with d
4096 and a few layers, and extrapolated to Llama-7B's 32 layers (docs/distributed.md).

For LoRA on ``q_proj`` / ``v_proj`` (and optionally ``down_proj``, whose input is the MLP's 11008 features) it runs
one feature pass and reports the bytes of the distinct covariance sums (LoRA A of ``q_proj`` and ``v_proj`` share
one), with and without ``on_cpu`` (float64 sums on the host, float32 batch products on the device), the time of the
pass and of one basis growth, and the bytes of the bases::

    python benchmarks/scale.py                      # d 4096, 2 layers, q / v
    python benchmarks/scale.py --down_proj          # also LoRA on down_proj (11008 features: slow on a CPU)
    python benchmarks/scale.py --smoke              # d 256, for CI

Writes ``<output_dir>/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pegp_hf.core import FeatureCovariances, GradientProjector
from pegp_hf.tuners import find_protected_tensors

LLAMA_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008}


def extrapolate(rank: int, down_proj: bool, layers: int = LLAMA_7B["layers"]) -> dict[str, float]:
    """Bytes of the covariance sums of LoRA on Llama-7B, every rank holding them all: float64, shared q / v input."""
    d, m = LLAMA_7B["hidden"], LLAMA_7B["intermediate"]
    per_layer = d * d * 8 + 2 * rank * rank * 8  # one shared d x d for A of q and v, r x r for each B
    separate = 2 * d * d * 8 + 2 * rank * rank * 8
    if down_proj:
        per_layer += m * m * 8 + rank * rank * 8
        separate += m * m * 8 + rank * rank * 8
    return {"shared_bytes": layers * per_layer, "separate_bytes": layers * separate,
            "full_bases_bytes": layers * (2 * d * d * 4 + (m * m * 4 if down_proj else 0))}  # fmt: skip


def measure(hidden: int, intermediate: int, layers: int, tokens: int, rank: int, down_proj: bool) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)  # fmt: skip
    targets = ["q_proj", "v_proj", *(["down_proj"] if down_proj else [])]
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, target_modules=targets)).eval()
    with torch.no_grad():  # a non-zero B, as after a first task
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    tensors = find_protected_tensors(model)
    ids = torch.randint(0, 1000, (max(1, tokens // 128), min(tokens, 128)))
    rows = {}
    for on_cpu in (False, True):
        start = time.perf_counter()
        with FeatureCovariances(tensors, on_cpu=on_cpu) as capture, torch.no_grad():
            model(input_ids=ids)
        rows["on_cpu" if on_cpu else "on_device"] = {
            "pass_seconds": time.perf_counter() - start,
            "stored_bytes": capture.stored_bytes,
            "distinct_sums": len({id(c) for c in capture.covariances.values()}),
        }
    projector = GradientProjector(tensors)
    start = time.perf_counter()
    projector.grow(capture.covariances, threshold=0.97)
    rows["grow_seconds"] = time.perf_counter() - start
    rows["bases_bytes"] = sum(b.numel() * 4 for b in projector.bases.values())
    rows["separate_bytes"] = sum(t.feature_dim**2 * 8 for t in tensors)
    rows["protected_dims"] = projector.dims_by_kind()
    return {"hidden": hidden, "intermediate": intermediate, "layers": layers, "tokens": ids.numel(), "rank": rank,
            "targets": targets, **rows}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--down_proj", action="store_true")
    parser.add_argument("--output_dir", default="outputs/scale")
    parser.add_argument("--smoke", action="store_true")
    options = parser.parse_args(argv)
    if options.smoke:
        options.hidden, options.intermediate, options.layers, options.tokens = 256, 512, 1, 64
    results = {
        "measured": measure(options.hidden, options.intermediate, options.layers, options.tokens, options.rank,
                            options.down_proj),
        "llama_7b": extrapolate(options.rank, options.down_proj),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    measured, big = results["measured"], results["llama_7b"]
    print(f"d {measured['hidden']}, {measured['layers']} layers, LoRA on {measured['targets']}: covariance sums "
          f"{measured['on_device']['stored_bytes'] / 1e6:.0f} MB shared ({measured['separate_bytes'] / 1e6:.0f} MB "
          f"separate), pass {measured['on_device']['pass_seconds']:.1f} s on the device / "
          f"{measured['on_cpu']['pass_seconds']:.1f} s with the sums on the CPU, growth "
          f"{measured['grow_seconds']:.1f} s, bases {measured['bases_bytes'] / 1e6:.1f} MB")  # fmt: skip
    print(f"Llama-7B (32 layers): sums {big['shared_bytes'] / 1e9:.1f} GB shared, {big['separate_bytes'] / 1e9:.1f} GB "
          f"separate; bases at most {big['full_bases_bytes'] / 1e9:.1f} GB (float32, k = d)")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
