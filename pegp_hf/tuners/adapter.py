"""Bottleneck adapters: ``a(x) = scale * W_up act(W_down x)``, ``W_down`` ``(r, d)``, ``W_up`` ``(d, r)``, no biases.

Placed on the MLP or the attention module of chosen blocks (or on any module matched by ``target_modules``):
``parallel`` adds ``a(input)`` to the module's output (AdaptFormer), ``sequential`` adds ``a(output)`` to it (Houlsby).
``W_up`` starts at zero, so the model starts unchanged.

PEGP condition: ``W_down`` is protected against the adapter input ``x`` (every token) and ``W_up`` against the
bottleneck activation ``act(W_down x)``. With both, ``a(x_old)`` is unchanged exactly (``delta W_down x = 0`` keeps
the activation, ``delta W_up act(.) = 0`` keeps the output); one alone guarantees nothing. Biases would add the same
vector to every input and cannot be protected, so there are none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.activations import ACT2FN

from pegp_hf.tuners.base import PETConfig, PETModule, ProtectedTensor, module_input
from pegp_hf.tuners.discovery import attention_module, find_block_stacks, hidden_size, mlp_module, select_layers


@dataclass
class AdapterConfig(PETConfig):
    """Bottleneck adapters.

    Attributes:
        width: bottleneck width ``r`` (PEGP: 5).
        branch: ``"mlp"`` or ``"attention"``: the module of each chosen block the adapter sits on.
        placement: ``"parallel"`` (adapter input = the module's input) or ``"sequential"`` (= its output).
        scale: the factor on the adapter output.
        activation: a ``transformers.activations.ACT2FN`` name.
        target_modules: a regex on module names that replaces the structural choice (``branch`` / ``layers``), e.g.
            ``r"encoder\\.layer\\.\\d+\\.output$"``; the targets' input and output width must be the model's width.
    """

    pet_type = "adapter"
    width: int = 5
    branch: Literal["mlp", "attention"] = "mlp"
    placement: Literal["parallel", "sequential"] = "parallel"
    scale: float = 1.0
    activation: str = "relu"
    target_modules: str | None = None

    def __post_init__(self) -> None:
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
        """``(..., d)`` -> ``(..., d)``."""
        return self.scale * self.up(self.activation(self.down(hidden_states)))

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        tensors = [
            ProtectedTensor(f"{name}.down.weight", "adapter_down", self.down, "weight", self.down, module_input),
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
    """``(module, width)`` pairs to adapt."""
    stacks = find_block_stacks(model, config.layers_pattern)
    if config.target_modules is not None:
        width = hidden_size(stacks[0][1][0])
        found = [(m, width) for name, m in model.named_modules() if name and re.search(config.target_modules, name)]
        if not found:
            raise ValueError(f"no module name matches target_modules={config.target_modules!r}")
        return found
    targets = []
    for _, stack in stacks:
        for index in select_layers(len(stack), config.layers):
            block = stack[index]
            module = (mlp_module if config.branch == "mlp" else attention_module)(block)[1]
            targets.append((module, hidden_size(block)))
    return targets


def inject_adapters(model: nn.Module, config: AdapterConfig) -> None:
    """Add a :class:`BottleneckAdapter` as ``pegp_adapter`` to every target module, in place."""
    for module, width in _targets(model, config):
        module.pegp_adapter = BottleneckAdapter(width, config)
        module.register_forward_hook(_add_adapter, with_kwargs=True)
