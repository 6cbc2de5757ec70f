"""Visual prompt tuning (VPT, deep): ``L`` learnable tokens ``p`` (``(L, d)``) at positions ``1 .. L`` of the input
of chosen blocks, right after the CLS token.

At the first chosen block of a stack the tokens are inserted (the sequence grows from ``T`` to ``T + L``), or, with
``insert=False``, they overwrite positions ``1 .. L`` (CoOp-style text prompts: the caller reserves ``L``
placeholder tokens after the first token, so sequence length, causal mask and EOS pooling stay as they are). Deeper
chosen blocks overwrite the same positions with their own prompt. After the last block of the stack inserted tokens
are removed again, so heads that read the CLS or the mean of patch tokens see the usual layout.

PEGP condition: the prompt rows enter the block as tokens, next to the old token inputs ``X``; the update ``delta p``
must be orthogonal to the union of ``span(X)`` and ``span(old p)`` (PGP; the official code sums two PCA bases whose
rows mean different things, we stack the vectors). That union is the block's input sequence after the prompt is put
in, so one hook on the :class:`Prompt` module's output gives the features: ``X p^T`` is kept. The ``L`` prompt rows
are few and start small next to ``T`` tokens, so an energy threshold would drop them: the features scale the prompt
rows of each batch to the tokens' total energy, and the two spans enter the basis with equal weight (at eps 0.97 at
most 6% of either part's energy is left out). This is ``condition="paper"``.

That condition is the one for the raw prompt; the keys see ``LN(p) W_K^T``. ``condition="keys"`` protects the old
queries' logits on the prompt rows through both: head ``h``'s logit of an old token's query ``q_h`` on prompt row
``p`` moves by ``q_h^T W_K,h J(p) dp`` to first order, ``J(p) = diag(gamma) (I - 1 1^T / d - p^ p^T / d) / sigma``
the LayerNorm's Jacobian (``p^`` the normalised row). With ``dp`` orthogonal to ``1`` and to the old prompt rows
``J(p) dp = diag(gamma) dp / sigma``, so it is enough that ``dp`` is also orthogonal to ``diag(gamma) W_K,h^T q_h`` for
every old query and head: the features are those ``T x heads`` vectors per image, the prompt rows and ``1`` (each
part scaled to the same energy). It is exact for the logit's linear part; what is left is second order (``sigma``
grows with ``|dp|^2 / d``). The value path is not covered by either condition: the change ``sum_l a_il W_V J dp_l``
reaches every old token with its own weights ``a_il``, and only a ``dp`` that leaves ``LN(p)`` unchanged keeps it for
all of them (docs/method.md). ``"keys"`` needs a pre-LayerNorm block with separate query / key projections, one key
head per query head and no rotation or per-head norm of queries and keys (ViT, DINOv2, CLIP; the norm named in
``PRE_ATTENTION_NORMS``); decoders with rotary positions (Llama, Qwen2, Gemma) and BERT-style post-LayerNorm blocks
are refused. It reads ``gamma``, ``W_Q`` and ``W_K`` of the unwrapped projections when features are taken.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.tuners.base import Attachment, PETConfig, PETModule, check_not_adapted
from pegp_hf.tuners.discovery import (
    QKV_NAMES,
    attention_heads,
    attention_module,
    find_block_stacks,
    hidden_size,
    select_layers,
)
from pegp_hf.tuners.registry import register_tuner


@dataclass
class PromptConfig(PETConfig):
    """Deep visual prompts.

    Attributes:
        length: prompt tokens ``L`` per block (PEGP: 10).
        insert: insert the tokens after the first one (vision); ``False``: overwrite positions ``1 .. L``, for inputs
            that hold ``L`` placeholder tokens there (text towers: CoOp context tokens before the class name).
        init_std: standard deviation of the normal initialisation.
        condition: ``"paper"``: the update is orthogonal to the block's old input tokens and prompt rows (PGP);
            ``"keys"``: orthogonal to the old queries seen through ``W_K`` and the LayerNorm in front of the
            attention, to ``1`` and to the prompt rows, which keeps the old queries' logits on the prompt rows to
            first order (module docstring).
    """

    pet_type = "prompt"
    length: int = 10
    insert: bool = True
    init_std: float = 0.02
    condition: Literal["paper", "keys"] = "paper"

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be at least 1, got {self.length}")
        if self.condition not in ("paper", "keys"):
            raise ValueError(f"condition must be 'paper' or 'keys', got {self.condition!r}")


# the LayerNorm in front of the attention, by name (ViT, DINOv2, CLIP, GPT-2; Llama / Qwen2 name theirs too)
PRE_ATTENTION_NORMS = ("layernorm_before", "norm1", "layer_norm1", "input_layernorm", "ln_1")


@dataclass(frozen=True)
class KeyPath:
    """What turns a block's input rows into attention keys and queries: ``norm``, then ``query`` / ``key`` linear
    layers (PEFT wrappers removed) with ``heads`` heads. Held as a plain attribute, so the modules stay where they
    are registered."""

    norm: nn.Module
    query: nn.Linear
    key: nn.Linear
    heads: int


def key_path(block: nn.Module) -> KeyPath:
    """The :class:`KeyPath` of a pre-LayerNorm block.

    Raises:
        ValueError: the block has no norm named in ``PRE_ATTENTION_NORMS`` with a ``weight`` of the hidden size,
            fuses its query, key and value projections, has fewer key than query heads, normalises queries or keys
            per head (``q_norm`` / ``k_norm``), or rotates them by position (it takes ``position_embeddings``: RoPE),
            none of which the features model.
    """
    _, attention = attention_module(block)
    if "position_embeddings" in inspect.signature(block.forward).parameters or any(
        hasattr(attention, name) for name in ("q_norm", "k_norm")
    ):
        raise ValueError(
            f"condition='keys' models the logit as q^T W_K LN(p); {type(block).__name__} rotates or normalises its "
            "queries and keys per head (RoPE, q_norm / k_norm), which the features leave out: use condition='paper'"
        )
    names = next((n for n in QKV_NAMES if all(isinstance(getattr(attention, m, None), nn.Module) for m in n)), None)
    projections = [getattr(getattr(attention, m), "base_layer", getattr(attention, m)) for m in names or ()]
    if not projections or not all(isinstance(layer, nn.Linear) for layer in projections):
        raise ValueError(
            f"condition='keys' reads separate query and key nn.Linear layers; {type(attention).__name__} has none: "
            "use condition='paper'"
        )
    norms = [getattr(block, n) for n in PRE_ATTENTION_NORMS if isinstance(getattr(block, n, None), nn.Module)]
    norm = norms[0] if norms else None
    width = projections[1].in_features
    weight = getattr(norm, "weight", None)
    if norm is None or (weight is not None and weight.shape != (width,)):
        raise ValueError(
            f"condition='keys' needs the LayerNorm in front of the attention of {type(block).__name__}, a child named "
            f"one of {PRE_ATTENTION_NORMS} with a weight of size {width} (a pre-LayerNorm block): use "
            "condition='paper'"
        )
    if projections[1].out_features != projections[0].out_features:
        raise ValueError(
            f"condition='keys' needs one key head per query head; {type(attention).__name__} has "
            f"{projections[1].out_features} key and {projections[0].out_features} query features (grouped-query "
            "attention): use condition='paper'"
        )
    return KeyPath(norm, projections[0], projections[1], attention_heads(attention)[0])


class Prompt(PETModule):
    """``L`` prompt tokens for one block: ``forward`` puts them into the block's input ``(B, T, d)``."""

    def __init__(self, length: int, dim: int, insert: bool, init_std: float, path: KeyPath | None = None) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, dim) * init_std)
        self.insert = insert
        self.path = path  # condition="keys": where the features are read; None: condition="paper"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, T + L, d)`` when inserting, else ``(B, T, d)`` with rows ``1 .. L`` replaced."""
        batch, length = hidden_states.shape[0], self.prompt.shape[0]
        tokens = self.prompt.to(hidden_states.dtype).expand(batch, -1, -1)
        if self.insert:
            return torch.cat([hidden_states[:, :1], tokens, hidden_states[:, 1:]], dim=1)
        if hidden_states.shape[1] < 1 + length:
            raise ValueError(f"a sequence of {hidden_states.shape[1]} tokens has no room for {length} prompt tokens")
        return torch.cat([hidden_states[:, :1], tokens, hidden_states[:, 1 + length :]], dim=1)

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        if not self.prompt.requires_grad:
            return []
        if self.path is None:
            return [ProtectedTensor(f"{name}.prompt", "prompt", self, "prompt", self, self.tokens_and_prompt_rows)]
        return [ProtectedTensor(f"{name}.prompt", "prompt", self, "prompt", self.path.norm, self.keys_ones_and_rows)]

    @torch.no_grad()
    def tokens_and_prompt_rows(self, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Features of the prompt: the block input ``(B, T + L, d)`` as it is, its prompt rows ``1 .. L`` scaled to
        the other rows' total energy (the layout kept, so token selection by attention mask still lines up)."""
        length = self.prompt.shape[0]
        features = output.detach().float().clone()
        rows = features[:, 1 : 1 + length]
        energy = features.pow(2).sum() - rows.pow(2).sum()
        rows.mul_((energy / rows.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)).sqrt())
        return features

    @torch.no_grad()
    def keys_ones_and_rows(self, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Features of the prompt under ``condition="keys"``, read on the pre-attention norm (input: the block input
        ``(B, S, d)``, ``S = T + L``, with the prompt in rows ``1 .. L``; output: its normalised rows), as
        ``(B, S, max(heads, 2), d)`` so that token selection by attention mask still lines up: at an old token, its
        ``diag(gamma) W_K,h^T q_h`` for every head; at prompt row ``l``, the row itself, and at row ``1`` also ``1``,
        both scaled to the old tokens' energy; zeros elsewhere (they add nothing to the sums).

        Raises:
            RuntimeError: the norm's input does not hold this prompt in rows ``1 .. L`` (it is not the norm in front
                of this block's attention).
        """
        length, path = self.prompt.shape[0], self.path
        hidden = args[0]
        if hidden.ndim != 3 or not torch.equal(hidden[0, 1 : 1 + length], self.prompt.to(hidden.dtype)):
            raise RuntimeError(
                f"{type(path.norm).__name__} does not read this block's prompted input, so it is not the LayerNorm in "
                "front of the attention: use condition='paper'"
            )
        normed = output.detach().float()
        batch, seq, dim = normed.shape
        bias = None if path.query.bias is None else path.query.bias.float()
        queries = F.linear(normed, path.query.weight.float(), bias).view(batch, seq, path.heads, -1)
        key_weight = path.key.weight.float().view(path.heads, queries.shape[-1], dim)
        gamma = torch.ones(dim, device=normed.device) if path.norm.weight is None else path.norm.weight.float()
        seen = torch.einsum("bthe,hed->bthd", queries, key_weight) * gamma
        seen = F.pad(seen, (0, 0, 0, max(0, 2 - path.heads)))  # room for a row and 1 at prompt row 1
        seen[:, 1 : 1 + length] = 0
        energy = seen.pow(2).sum()
        rows = self.prompt.detach().float()
        seen[:, 1 : 1 + length, 0] = (
            rows * (energy / (batch * rows.pow(2).sum()).clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        )
        seen[:, 1, 1] = (energy / (batch * dim)).sqrt()
        return seen


def _put_prompt(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """Forward pre-hook of a prompted block: its hidden states go through ``block.pegp_prompt``."""
    prompt: Prompt = block.pegp_prompt
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if prompt.insert and (mask is not None or kwargs.get("is_causal")):
        raise ValueError(
            "prompt insertion changes the sequence length, but this block gets an attention mask or is causal (a "
            "text tower): use PromptConfig(insert=False, layers_pattern=...) with placeholder tokens after the first "
            "token"
        )
    if args:
        return (prompt(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": prompt(kwargs["hidden_states"])}


def _remove_inserted(block: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook of a stack's last block: drop the ``block.pegp_inserted_tokens`` tokens after the first."""
    count = block.pegp_inserted_tokens
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = torch.cat([hidden[:, :1], hidden[:, 1 + count :]], dim=1)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def plan_prompts(model: nn.Module, config: PromptConfig) -> list[Attachment]:
    """A :class:`Prompt` as ``pegp_prompt`` on the chosen blocks of every matching stack; with insertion, the stack's
    last block drops the inserted tokens again."""
    attachments = []
    for _, stack in find_block_stacks(model, config.layers_pattern):
        for position, index in enumerate(select_layers(len(stack), config.layers)):
            block, insert = stack[index], config.insert and position == 0
            check_not_adapted(block, "pegp_prompt")
            path = key_path(block) if config.condition == "keys" else None
            build = partial(Prompt, config.length, hidden_size(block), insert, config.init_std, path)
            install = partial(_install, last=stack[-1] if insert else None, length=config.length)
            attachments.append(Attachment(block, "pegp_prompt", build, install))
    return attachments


def _install(block: nn.Module, last: nn.Module | None, length: int) -> None:
    block.register_forward_pre_hook(_put_prompt, with_kwargs=True)
    if last is not None:
        last.pegp_inserted_tokens = length
        last.register_forward_hook(_remove_inserted)


register_tuner(PromptConfig, plan_prompts, size_field="length")
