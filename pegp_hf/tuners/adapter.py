"""Bottleneck adapters: ``a(x) = scale * W_up act(W_down x)``, ``W_down`` ``(r, d)``, ``W_up`` ``(d, r)``, no biases.

Placed on the MLP or the attention module of chosen blocks (or on any module matched by ``target_modules``):
``parallel`` adds ``a(input)`` to the module's output (as AdaptFormer, though here the input is the module's, i.e.
after the block's LayerNorm, not the residual stream), ``sequential`` adds ``a(output)`` to it (Houlsby).
``W_up`` starts at zero, so the model starts unchanged.

PEGP condition: ``W_down`` is protected against the adapter input ``x`` (every token) and ``W_up`` against the
bottleneck activation ``act(W_down x)``. With both, ``a(x_old)`` is unchanged exactly (``delta W_down x = 0`` keeps
the activation, ``delta W_up act(.) = 0`` keeps the output); one alone guarantees nothing. Biases would add the same
vector to every input and cannot be protected, so there are none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from transformers.activations import ACT2FN

from pegp_hf.core.protected import ProtectedTensor, module_input
from pegp_hf.tuners.base import Attachment, PETConfig, PETModule, check_not_adapted
from pegp_hf.tuners.discovery import attention_module, find_block_stacks, hidden_size, mlp_module, select_layers
from pegp_hf.tuners.registry import register_tuner


@dataclass
class AdapterConfig(PETConfig):
    """Bottleneck adapters.

    Attributes:
        width: bottleneck width ``r`` (PEGP: 5).
        branch: ``"mlp"`` or ``"attention"``: the module of each chosen block the adapter sits on.
        placement: ``"parallel"`` (adapter input = the module's input) or ``"sequential"`` (= its output).
        scale: the factor on the adapter output.
        activation: a ``transformers.activations.ACT2FN`` name.
        target_modules: a regex on module names inside the chosen stacks that replaces ``branch`` / ``layers``, e.g.
            ``r"layer\\.\\d+\\.output\\.dense$"`` with ``placement="sequential"`` for BERT's feed-forward output. The
            adapted input (parallel) or output (sequential) must have the model's width.
    """

    pet_type = "adapter"
    width: int = 5
    branch: Literal["mlp", "attention"] = "mlp"
    placement: Literal["parallel", "sequential"] = "parallel"
    scale: float = 1.0
    activation: str = "relu"
    target_modules: str | None = None

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be at least 1, got {self.width}")
        if self.branch not in ("mlp", "attention"):
            raise ValueError(f"branch must be 'mlp' or 'attention', got {self.branch!r}")
        if self.placement not in ("parallel", "sequential"):
            raise ValueError(f"placement must be 'parallel' or 'sequential', got {self.placement!r}")
        if self.activation not in ACT2FN:
            raise ValueError(f"unknown activation {self.activation!r}; use a transformers ACT2FN name such as 'relu'")


class BottleneckAdapter(PETModule):
    """``down`` (``(r, d)``) -> activation -> ``up`` (``(d, r)``, zero at start) -> ``* scale``."""

    def __init__(self, dim: int, config: AdapterConfig) -> None:
        super().__init__()
        self.down = nn.Linear(dim, config.width, bias=False)
        self.up = nn.Linear(config.width, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.activation = ACT2FN[config.activation]
        self.scale = config.scale
        self.parallel = config.placement == "parallel"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., d)``, computed in the adapter's dtype and returned in the input's."""
        if hidden_states.shape[-1] != self.down.in_features:
            raise ValueError(
                f"the adapter expects inputs of width {self.down.in_features}, got {hidden_states.shape[-1]}: choose "
                "target_modules / placement so that the adapted module's input (parallel) or output (sequential) has "
                "the model's width"
            )
        hidden = hidden_states.to(self.down.weight.dtype)
        return (self.scale * self.up(self.activation(self.down(hidden)))).to(hidden_states.dtype)

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        # W_down x = 0 silences the branch only where act(0) = 0 (relu, gelu, silu, tanh; not sigmoid)
        silent = float(self.activation(torch.zeros(1))) == 0.0
        tensors = [
            ProtectedTensor(
                f"{name}.down.weight",
                "adapter_down",
                self.down,
                "weight",
                self.down,
                module_input,
                reference="null" if silent else None,
            ),
            ProtectedTensor(f"{name}.up.weight", "adapter_up", self.up, "weight", self.up, module_input),
        ]
        return [tensor for tensor in tensors if tensor.parameter.requires_grad]


def _add_adapter(target: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook of an adapted module: add ``target.pegp_adapter`` of its input or output to its output."""
    adapter: BottleneckAdapter = target.pegp_adapter
    hidden = output[0] if isinstance(output, tuple) else output
    source = (args[0] if args else kwargs["hidden_states"]) if adapter.parallel else hidden
    hidden = hidden + adapter(source)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _targets(model: nn.Module, config: AdapterConfig) -> list[tuple[nn.Module, int]]:
    """``(module, width)`` pairs to adapt; ``width`` is that of the stack the module belongs to."""
    stacks = find_block_stacks(model, config.layers_pattern)
    if config.target_modules is not None:
        found = [
            (module, hidden_size(stack[0]))
            for stack_name, stack in stacks
            for name, module in stack.named_modules(prefix=stack_name)
            if re.search(config.target_modules, name)
        ]
        if not found:
            raise ValueError(
                f"no module name inside the chosen stacks matches target_modules={config.target_modules!r}"
            )
        return found
    targets = []
    for _, stack in stacks:
        for index in select_layers(len(stack), config.layers):
            block = stack[index]
            module = (mlp_module if config.branch == "mlp" else attention_module)(block)[1]
            targets.append((module, hidden_size(block)))
    return targets


def plan_adapters(model: nn.Module, config: AdapterConfig) -> list[Attachment]:
    """A :class:`BottleneckAdapter` as ``pegp_adapter`` on every target module."""
    attachments = []
    for module, width in _targets(model, config):
        check_not_adapted(module, "pegp_adapter")
        attachments.append(Attachment(module, "pegp_adapter", partial(BottleneckAdapter, width, config), _install))
    return attachments


def _install(module: nn.Module) -> None:
    module.register_forward_hook(_add_adapter, with_kwargs=True)


register_tuner(AdapterConfig, plan_adapters, size_field="width")
