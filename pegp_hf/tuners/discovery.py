"""Find the parts of a transformer that pegp_hf's tuners attach to, by structure rather than by class or 4.x names.

- a **block stack** is an ``nn.ModuleList`` whose every element contains an attention module (ViT ``vit.layers``,
  Dinov2 / BERT ``encoder.layer``, CLIP ``vision_model.encoder.layers`` and ``text_model.encoder.layers``);
- the **attention module** of a block is its shallowest submodule owning query / key / value linear layers
  (``q_proj``/``k_proj``/``v_proj`` or ``query``/``key``/``value``: ViT, CLIP, BERT, Llama, Qwen2, Gemma) or one fused
  projection (``c_attn``: GPT-2, ``qkv_proj``, ``query_key_value``): the module that calls the attention function;
- the **MLP** of a block is its child named ``mlp``, ``ffn`` or ``feed_forward``.

``layers_pattern`` (a regex searched in the stack's dotted name) picks stacks, e.g. ``"vision_model"`` for the image
tower of a CLIP model; ``target_modules`` of the adapter overrides the structural choice of its target.
"""

from __future__ import annotations

import re

from torch import nn

QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "query_key_value")
MLP_NAMES = ("mlp", "ffn", "feed_forward")
PAPER_DEPTH_SHARE = 5 / 12  # PEGP puts its tuners in layers 0-4 of a 12-layer ViT-B


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    """The layer a PEFT layer wraps (``base_layer``), or ``module``."""
    return getattr(module, "base_layer", module)


def _is_linear(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's), or a PEFT layer wrapping one."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(_unwrapped(module), nn.Linear | Conv1D)


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` owns query, key and value linear children, or a fused query-key-value one (PEFT-wrapped or
    not)."""
    separate = any(all(_is_linear(getattr(module, n, None)) for n in names) for names in QKV_NAMES)
    return separate or any(_is_linear(getattr(module, name, None)) for name in FUSED_QKV_NAMES)


def _query_projection(attention: nn.Module) -> tuple[nn.Module, int]:
    """The query projection (or the fused one) of ``attention``, and how many projections it computes (1 or 3)."""
    for names in QKV_NAMES:
        if _is_linear(getattr(attention, names[0], None)):
            return _unwrapped(getattr(attention, names[0])), 1
    name = next(name for name in FUSED_QKV_NAMES if _is_linear(getattr(attention, name, None)))
    return _unwrapped(getattr(attention, name)), 3


def query_value_names(block: nn.Module) -> list[str]:
    """The names, relative to ``block``, of its attention's query and value projections (``self_attn.q_proj`` and
    ``self_attn.v_proj``), or of its fused query-key-value projection (``attn.c_attn``)."""
    prefix, attention = attention_module(block)
    for names in QKV_NAMES:
        if all(_is_linear(getattr(attention, n, None)) for n in names):
            return [f"{prefix}.{names[0]}", f"{prefix}.{names[2]}"]
    fused = [n for n in FUSED_QKV_NAMES if _is_linear(getattr(attention, n, None))]
    if not fused:
        raise ValueError(f"{type(attention).__name__} has no known query / value projection: pass target_modules")
    return [f"{prefix}.{fused[0]}"]


def _features(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of an ``nn.Linear`` or a ``Conv1D`` (whose weight is ``(in, out)``)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.weight.shape[0], layer.weight.shape[1]


def find_block_stacks(model: nn.Module, layers_pattern: str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """``(name, stack)`` for every block stack of ``model`` whose name matches ``layers_pattern`` (all if ``None``).

    Raises:
        ValueError: when none is found.
    """
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(any(is_attention(m) for m in block.modules()) for block in module)
        and (layers_pattern is None or re.search(layers_pattern, name))
    ]
    if not stacks:
        raise ValueError(
            f"found no transformer block stack (an nn.ModuleList of blocks with q/k/v projections)"
            f"{'' if layers_pattern is None else f' whose name matches layers_pattern={layers_pattern!r}'} "
            f"in {type(model).__name__}"
        )
    return stacks


def select_layers(depth: int, layers: list[int] | str | None) -> list[int]:
    """The block indices to adapt: ``layers`` (negative indices count from the end), ``"all"``, or by default the
    first ``5/12`` of the depth, at least one (PEGP's layers 0-4 of 12, scaled to the model)."""
    if layers is None:
        return list(range(max(1, round(depth * PAPER_DEPTH_SHARE))))
    if layers == "all":
        return list(range(depth))
    if isinstance(layers, str):
        raise ValueError(f"layers must be a list of block indices, 'all' or None, got {layers!r}")
    chosen = sorted({index % depth if -depth <= index < depth else index for index in layers})
    wrong = [index for index in chosen if not 0 <= index < depth]
    if wrong or not chosen:
        raise ValueError(f"layers={layers} do not index a stack of {depth} blocks")
    return chosen


def attention_module(block: nn.Module) -> tuple[str, nn.Module]:
    """``(relative name, module)`` of the shallowest attention module inside ``block``."""
    found = [(name.count("."), name, m) for name, m in block.named_modules() if name and is_attention(m)]
    if not found:
        raise ValueError(f"{type(block).__name__} holds no module with q/k/v projections")
    _, name, module = min(found, key=lambda item: item[0])
    return name, module


def attention_heads(attention: nn.Module) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of an attention module, from its ``head_dim`` (or ``attention_head_size``)
    attribute and the width of its query projection."""
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "attention_head_size", None)
    if not head_dim:
        raise ValueError(f"{type(attention).__name__} has no head_dim / attention_head_size attribute")
    heads = getattr(attention, "num_heads", None)
    if heads is None:
        projection, fused = _query_projection(attention)
        if fused == 3 and hasattr(attention, "num_key_value_heads"):
            raise ValueError(f"{type(attention).__name__} fuses queries with fewer key / value heads: set num_heads")
        heads = _features(projection)[1] // fused // head_dim
    return int(heads), int(head_dim)


def hidden_size(block: nn.Module) -> int:
    """The width of the residual stream: the input width of the block's query projection."""
    return _features(_query_projection(attention_module(block)[1])[0])[0]


def mlp_module(block: nn.Module) -> tuple[str, nn.Module]:
    """``(relative name, module)`` of the block's MLP child."""
    for name in MLP_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name, getattr(block, name)
    raise ValueError(
        f"{type(block).__name__} has no child named {' / '.join(MLP_NAMES)}: set the adapter's target_modules to the "
        "feed-forward module (a regex on module names)"
    )
