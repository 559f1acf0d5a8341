"""Weight-decay parameter groups: decay parameters with ndim >= ``decay_ndim_min``, not the others.

The default (``OptimizerConfig.decay_ndim_min = 2``) is the GPT-2/Llama rule: Linear and Embedding
weights decay; norm weights and biases (1-D) do not. Order within each group is the input order, so
a wrapper's flattened parameter order (and its state_dict's ``main_params``) is a pure function of
the parameter list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def weight_decay_param_groups(
    params: Iterable[torch.Tensor], weight_decay: float, decay_ndim_min: int = 2
) -> list[dict[str, Any]]:
    """[decay group, no-decay group] of the trainable ``params``; an empty group is dropped."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= decay_ndim_min]
    no_decay = [p for p in params if p.ndim < decay_ndim_min]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
