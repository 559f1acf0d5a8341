"""MainParams: the fp32 "main" copies of 16-bit weights, owned in one place and named like the model.

With bf16/fp16 weights the optimizer steps fp32 copies and rounds them back into the weights. Who owns
the copies matters once more than one optimizer exists (one per DDP bucket with the overlapped step)
and once checkpoints are written: the copies are the truth, the 16-bit weights only their rounding. So
the trainer builds them once, from the weights while they are still fp32 (a fresh init or an fp32
checkpoint loses nothing), before casting the model, and hands them to every
``Float16OptimizerWithFloat16Params`` it builds.

``module`` is a parameter-only ``nn.Module`` whose parameter names are the model's own
(``model.layers.0.mlp.up_proj.weight``...) and whose parameters are the fp32 copies, tied weights
tied here too. torch.distributed.checkpoint's ``get_model_state_dict(module)`` and
``get_optimizer_state_dict(module, inner_optimizer)`` therefore work on it unchanged: a checkpoint
of a 16-bit run has exactly the keys, shapes and fp32 dtype of an fp32 run's, and loads into a run of
any ``--params_dtype``.

Invariants: ``of(weight)`` is the fp32 copy of that weight, a leaf no graph ever reads;
``copy_to_model()`` leaves every weight equal to ``of(weight).to(weight.dtype)``, written in place
(DDP buffer views stay valid).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _shadow(named: list[tuple[str, nn.Parameter]]) -> nn.Module:
    """A module tree holding ``named``'s parameters under their dotted names."""
    root = nn.Module()
    for name, param in named:
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        owner.register_parameter(leaf, param)
    return root


class MainParams:
    """fp32 copies of the given floating-point weights (module docstring)."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]]):
        """``named_params``: ``(name, weight)`` pairs, a tied weight once per name (as
        ``model.named_parameters(remove_duplicate=False)`` yields them). Copies are taken now: call
        before casting the weights to 16 bits."""
        self._main: dict[torch.Tensor, nn.Parameter] = {}
        self._weights: list[torch.Tensor] = []
        named: list[tuple[str, nn.Parameter]] = []
        for name, weight in named_params:
            if not weight.is_floating_point():
                raise TypeError(f"MainParams: {name} is {weight.dtype}, not a floating-point weight")
            main = self._main.get(weight)
            if main is None:
                # requires_grad like the weight: nothing differentiates through it, but torch's
                # optimizer-state helpers (DCP's get_optimizer_state_dict) skip frozen parameters
                main = nn.Parameter(weight.detach().float().clone(), requires_grad=True)
                self._main[weight] = main
                self._weights.append(weight)
            named.append((name, main))
        if not named:
            raise ValueError("MainParams: no weights given")
        self.module = _shadow(named)

    def __contains__(self, weight: torch.Tensor) -> bool:
        return weight in self._main

    def of(self, weight: torch.Tensor) -> nn.Parameter:
        """The fp32 copy of ``weight`` (KeyError for a weight not given at construction)."""
        return self._main[weight]

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round every main copy into its weight, in place."""
        for weight in self._weights:
            weight.detach().copy_(self._main[weight])

    def nbytes(self) -> int:
        """Bytes held by the copies (each once)."""
        return sum(m.numel() * m.element_size() for m in self._main.values())
