"""Prefix tuning: learnable key and value prefixes (``L`` each, per head) prepended to the keys and values of
chosen attention modules, through transformers' ``AttentionInterface``.

Each adapted attention module gets a private copy of its config whose ``_attn_implementation`` is
``"pegp_prefix"``; that function concatenates the prefixes, widens the attention mask (prefix columns are always
visible, causal or not) and calls SDPA (the modules of an eager model run SDPA too; flash and flex attention, whose
masks take other forms, are refused). Other modules and the model's config are untouched.

PEGP condition, per head ``h``: the logit of an old query ``q_h`` on prefix row ``j`` is ``q_h . p_K[h, j]``; it
stays put when ``delta p_K[h]`` is orthogonal to ``span(old q_h)``. Orthogonality of the concatenated key vector
would not keep each head's logits, so every head's key prefix ``(L, head_dim)`` is its own parameter with its own
basis (``key.<h>``), its features being that head's queries. The value prefix cannot be protected by projection
(its effect scales with the attention weights): ``value_prefix="free"`` trains it without protection, as the paper;
``"freeze_after_first_task"`` trains it on the first task only (under ``pegp`` and ``sequential`` alike: the rule is the
PET's).

:func:`init_prefixes_from_activations` starts the prefixes as copies of real tokens' keys and values (Li and Liang
2021, section 7.2: real-word activations as the initialisation), so that they draw attention and carry content
from the first step; the default normal start with a small ``init_std`` keeps them near zero.

``PrefixConfig(reparametrization="mlp")`` builds an :class:`MLPPrefix` instead: Li and Liang's MLP of an embedding,
whose key output layer PEGP protects on its output side (exact once the rest is frozen after the first task).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.tuners.base import Attachment, PETConfig, PETModule, check_not_adapted
from pegp_hf.tuners.discovery import attention_heads, attention_module, find_block_stacks, select_layers
from pegp_hf.tuners.registry import register_tuner

ATTENTION_NAME = "pegp_prefix"


@dataclass
class PrefixConfig(PETConfig):
    """Key / value prefixes.

    Attributes:
        length: prefix length ``L`` per head (PEGP: 10).
        value_prefix: ``"free"`` (trained on every task, unprotected, as the paper) or ``"freeze_after_first_task"``
            (trained on the first task only, by every method that trains the PET).
        init_std: standard deviation of the normal initialisation (of the prefixes; with ``"mlp"``, of what the
            MLP's output layer gives them).
        reparametrization: ``"none"`` (the prefixes are the weights) or ``"mlp"`` (Li and Liang's reparametrisation,
            :class:`MLPPrefix`: the prefixes are an MLP of an embedding, and PEGP protects the MLP's key output
            layer on its output side).
        mlp_hidden: the MLP's hidden width (``"mlp"`` only; Li and Liang: 512).
    """

    pet_type = "prefix"
    length: int = 10
    value_prefix: Literal["free", "freeze_after_first_task"] = "free"
    init_std: float = 0.02
    reparametrization: Literal["none", "mlp"] = "none"
    mlp_hidden: int = 512

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be at least 1, got {self.length}")
        if self.value_prefix not in ("free", "freeze_after_first_task"):
            raise ValueError(f"value_prefix must be 'free' or 'freeze_after_first_task', got {self.value_prefix!r}")
        if self.reparametrization not in ("none", "mlp"):
            raise ValueError(f"reparametrization must be 'none' or 'mlp', got {self.reparametrization!r}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be at least 1, got {self.mlp_hidden}")


class Prefix(PETModule):
    """Key prefixes ``key.<h>`` (``(L, head_dim)`` each, one per head) and value prefixes ``value``
    (``(heads, L, head_dim)``) of one attention module; ``inner_attention`` is the implementation they feed."""

    def __init__(self, num_heads: int, length: int, head_dim: int, config: PrefixConfig, inner_attention: str) -> None:
        super().__init__()
        self.key = nn.ParameterList(
            nn.Parameter(torch.randn(length, head_dim) * config.init_std) for _ in range(num_heads)
        )
        self.value = nn.Parameter(torch.randn(num_heads, length, head_dim) * config.init_std)
        self.freeze_value = config.value_prefix == "freeze_after_first_task"
        self.inner_attention = inner_attention
        # set by init_prefixes_from_activations: while a list, the module records its tokens and adds no prefix
        self.recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``(B, heads, T, head_dim)`` (seen by feature hooks) -> key and value prefixes
        ``(B, heads, L, head_dim)`` in the query's dtype."""
        batch = query.shape[0]
        keys = torch.stack(list(self.key)).to(query.dtype)
        return keys.expand(batch, -1, -1, -1), self.value.to(query.dtype).expand(batch, -1, -1, -1)

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        return [
            ProtectedTensor(f"{name}.key.{h}", "prefix_key", self.key, str(h), self, partial(_head_queries, h))
            for h, key in enumerate(self.key)
            if key.requires_grad
        ]

    def frozen_after_first_task(self) -> list[nn.Parameter]:
        return [self.value] if self.freeze_value else []


class MLPPrefix(PETModule):
    """Prefixes reparametrised by an MLP (Li and Liang 2021): ``Z = tanh(E W_1^T + b_1)`` ``(L, m)`` from an
    embedding ``E`` ``(L, heads * head_dim)``, then per head ``h`` the key prefix ``Z K_h^T + c_h`` (``key_up.<h>``
    ``(head_dim, m)``, ``key_bias`` ``(heads, head_dim)``) and the value prefix from ``value_up`` / ``value_bias``.

    PEGP condition, exact: ``E``, ``W_1``, ``b_1`` and ``key_bias`` are trained on the first task only, so ``Z`` is
    fixed afterwards, and ``delta p_K[h, j] = delta K_h z_j``; an old query ``q_h`` keeps its logit on every prefix
    row when ``q_h^T delta K_h = 0``, i.e. when ``delta K_h`` is orthogonal to ``span(old q_h)`` on its output side.
    So ``key_up.<h>`` is protected as a transposed tensor (its gradient projected from the left) against that
    head's queries. The value layer follows ``value_prefix``, as the direct prefix's value."""

    def __init__(self, num_heads: int, length: int, head_dim: int, config: PrefixConfig, inner_attention: str) -> None:
        super().__init__()
        width, hidden = num_heads * head_dim, config.mlp_hidden
        self.embedding = nn.Parameter(torch.randn(length, width))
        self.hidden = nn.Linear(width, hidden)
        scale = config.init_std / hidden**0.5  # prefix entries of about init_std * rms(Z) <= init_std at the start
        self.key_up = nn.ParameterList(nn.Parameter(torch.randn(head_dim, hidden) * scale) for _ in range(num_heads))
        self.key_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.value_up = nn.Parameter(torch.randn(width, hidden) * scale)
        self.value_bias = nn.Parameter(torch.zeros(width))
        self.freeze_value = config.value_prefix == "freeze_after_first_task"
        self.inner_attention = inner_attention
        self.recorded = None  # (no recording: init_prefixes_from_activations sets direct prefixes only)

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``(B, heads, T, head_dim)`` (seen by feature hooks) -> key and value prefixes
        ``(B, heads, L, head_dim)`` in the query's dtype."""
        batch, heads = query.shape[:2]
        z = torch.tanh(self.hidden(self.embedding))  # (L, m)
        keys = torch.stack([z @ up.T for up in self.key_up]) + self.key_bias[:, None]  # (heads, L, head_dim)
        values = (z @ self.value_up.T + self.value_bias).view(z.shape[0], heads, -1).transpose(0, 1)
        return (keys.to(query.dtype).expand(batch, -1, -1, -1), values.to(query.dtype).expand(batch, -1, -1, -1))

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        return [
            ProtectedTensor(f"{name}.key_up.{h}", "prefix_key_up", self.key_up, str(h), self,
                            partial(_head_queries, h), transposed=True)
            for h, up in enumerate(self.key_up)
            if up.requires_grad
        ]  # fmt: skip

    def frozen_after_first_task(self) -> list[nn.Parameter]:
        fixed = [self.embedding, self.hidden.weight, self.hidden.bias, self.key_bias]
        return fixed + ([self.value_up, self.value_bias] if self.freeze_value else [])


def _head_queries(head: int, args: tuple[Any, ...], output: Any) -> torch.Tensor:
    """Features of head ``head``'s key prefix: its queries ``(B, T, head_dim)``."""
    return args[0][:, head]


def _widen_mask(mask: torch.Tensor | None, length: int, causal: bool, query: torch.Tensor, key: torch.Tensor):
    """The attention mask for ``length`` visible prefix columns before the keys (``None`` if none is needed)."""
    if mask is None:
        if not causal:
            return None
        q_len, k_len = query.shape[2], key.shape[2]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = allowed[None, None]
    visible = torch.zeros if mask.dtype.is_floating_point else torch.ones
    columns = visible(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
    return torch.cat([columns, mask], dim=-1)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ``AttentionInterface`` function: ``module.pegp_prefix``'s prefixes before ``key`` / ``value``
    (``(B, heads, S, head_dim)``), then the module's own attention implementation."""
    prefix: Prefix | MLPPrefix = module.pegp_prefix
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            f"prefixes need as many key / value heads as query heads ({key.shape[1]} vs {query.shape[1]}): grouped-"
            "query attention is not supported"
        )
    if prefix.recorded is not None:  # the base model's own attention, its tokens kept
        prefix.recorded.append((key.detach(), value.detach(), attention_mask))
        return ALL_ATTENTION_FUNCTIONS[prefix.inner_attention](module, query, key, value, attention_mask, **kwargs)
    key_prefix, value_prefix = prefix(query)
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    attention_mask = _widen_mask(attention_mask, key_prefix.shape[2], bool(causal), query, key)
    key, value = torch.cat([key_prefix, key], dim=2), torch.cat([value_prefix, value], dim=2)
    inner = ALL_ATTENTION_FUNCTIONS[prefix.inner_attention]
    return inner(module, query, key, value, attention_mask, is_causal=False, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)


@torch.no_grad()
def init_prefixes_from_activations(model: nn.Module, inputs: Mapping[str, torch.Tensor], seed: int = 0) -> int:
    """Set every :class:`Prefix` of ``model`` to the keys and values of real tokens: one forward of ``inputs`` (a
    batch of the first task's training data, in eval mode, no grad) through the base model, every prefix left out,
    then per attention module ``L`` tokens drawn at random (``seed``) among the visible ones, each prefix row ``j`` of
    head ``h`` the key / value of token ``j``'s head ``h`` (a key and its value stay a pair, as a real token's).

    Call it once, before the first task, on the model as built; a resumed run loads its trained prefixes over it.

    Returns the number of prefix modules set. Raises ``ValueError``, before any prefix changes, when the model has
    no prefix or has MLP prefixes, when a prefixed module did not run, or when a batch holds fewer visible tokens
    than ``L`` (use a larger batch or shorter prefixes).
    """
    if any(isinstance(module, MLPPrefix) for module in model.modules()):
        raise ValueError("prefixes reparametrised by an MLP start from their MLP: initialise direct prefixes only "
                         "(PrefixConfig(reparametrization='none'))")  # fmt: skip
    prefixes = [module for module in model.modules() if isinstance(module, Prefix)]
    if not prefixes:
        raise ValueError("the model has no pegp_hf prefix to initialise: build it with PrefixConfig")
    training = model.training
    for prefix in prefixes:
        prefix.recorded = []
    try:
        model.eval()
        model(**inputs)
        recorded = [prefix.recorded for prefix in prefixes]
    finally:
        for prefix in prefixes:
            prefix.recorded = None
        model.train(training)
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for prefix, calls in zip(prefixes, recorded, strict=True):
        if not calls:
            raise ValueError("a prefix's attention module did not run on the given inputs")
        key, value, mask = calls[0]  # (B, heads, S, head_dim); the module's first call
        tokens = visible_tokens(mask, key.shape[0], key.shape[2])
        length = prefix.value.shape[1]
        if len(tokens) < length:
            raise ValueError(
                f"the batch holds {len(tokens)} visible tokens, fewer than the prefix length {length}: pass more "
                "samples"
            )
        batch_index, token_index = tokens[torch.randperm(len(tokens), generator=generator)[:length]].T
        # (heads, L, head_dim) each
        drawn.append(
            (key[batch_index, :, token_index].transpose(0, 1), value[batch_index, :, token_index].transpose(0, 1))
        )
    for prefix, (keys, values) in zip(prefixes, drawn, strict=True):
        for h, parameter in enumerate(prefix.key):
            parameter.copy_(keys[h])
        prefix.value.copy_(values)
    return len(prefixes)


def visible_tokens(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """``(n, 2)`` (sample, token) indices, in row-major order, of the tokens some query may attend to: all
    ``batch x length`` without a mask, else those whose column of the 4-D mask ``(B or 1, heads or 1, queries,
    length)`` allows attention for some query (boolean: True; additive: above the dtype's lowest value).

    Raises ``ValueError`` for a mask of another shape."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool).nonzero()
    if mask.ndim != 4 or mask.shape[-1] != length or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)}: expected (batch or 1, heads or 1, queries, {length})"
        )
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    return allowed.expand(batch, -1, -1, -1).any(dim=(1, 2)).cpu().nonzero()


def plan_prefixes(model: nn.Module, config: PrefixConfig) -> list[Attachment]:
    """A :class:`Prefix` (or an :class:`MLPPrefix`) as ``pegp_prefix`` on the attention module of the chosen
    blocks."""
    attachments = []
    for _, stack in find_block_stacks(model, config.layers_pattern):
        for index in select_layers(len(stack), config.layers):
            _, attention = attention_module(stack[index])
            check_not_adapted(attention, "pegp_prefix")
            if not hasattr(attention, "config"):
                raise ValueError(f"{type(attention).__name__} has no config: it does not use AttentionInterface")
            current = attention.config._attn_implementation
            if current not in (None, "eager", "sdpa"):
                raise ValueError(
                    f"prefixes run through SDPA; this model uses attn_implementation={current!r}, whose masks take "
                    "other forms: load it with attn_implementation='sdpa'"
                )
            num_heads, head_dim = attention_heads(attention)
            kind = MLPPrefix if config.reparametrization == "mlp" else Prefix
            build = partial(kind, num_heads, config.length, head_dim, config, "sdpa")
            attachments.append(Attachment(attention, "pegp_prefix", build, _route_through_prefix))
    return attachments


def _route_through_prefix(attention: nn.Module) -> None:
    """Give ``attention`` a private config copy that selects :func:`prefix_attention`."""
    attention.config = copy.copy(attention.config)
    attention.config._attn_implementation = ATTENTION_NAME


register_tuner(PrefixConfig, plan_prefixes, size_field="length")
