"""What a checkpoint holds: a dict of components, each owning its ``state_dict`` / ``load_state_dict``.

Every component follows the ``torch.distributed.checkpoint`` ``Stateful`` protocol. The checkpoint
manager (:mod:`z2all.training.checkpoint`) asks each one for its state and hands it back on resume;
it knows no component's fields, and no component knows the file layout. :class:`TrainState` sorts
them in two kinds:

- ``shared``: equal on every rank (model, optimizer, progress, loss scaler). With 16-bit weights the
  model entry is the fp32 main copies (:class:`MainParamsState`) and the optimizer entry the inner
  AdamW over them, in the same layout as an fp32 run's. Saved once through DCP
  under the component's name, replicated entries deduplicated across ranks, so any world size loads
  them. ZeRO-1's sharded optimizer state plugs in here: DCP writes each rank's shard.
- ``per_rank``: this rank's own (every RNG stream, the comm-hook state of the data-parallel wrapper).
  Saved as ``rank_<R>.pt`` with ``torch.save`` and loaded with ``weights_only=True``.

Protocol rule: an EMPTY state dict means "as freshly built" (an optimizer that never stepped, a
disabled loss scaler). Nothing is written for it, and on resume ``load_state_dict({})`` puts the
component back to that state. A component may define ``load_template()``: the state dict DCP fills on
load, when it differs from what ``state_dict()`` returns for a fresh object (the optimizer's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from optimizer import DynamicGradScaler, MainParams
from parallel import unwrap_model
from z2all.training.checkpoint_io import model_config_dict
from z2all.training.rng_state import get_rng_state, set_rng_state


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ModelState:
    """The bare model's weights under the model's own names (no DDP ``module.`` / compile prefixes)."""

    def __init__(self, model: nn.Module):
        self.module = unwrap_model(model)

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # strict: the manager has checked keys and shapes against the checkpoint's metadata
        set_model_state_dict(self.module, state_dict)

    def config_dict(self) -> dict | None:
        """The model config recorded in the manifest (a resume must build the same model)."""
        return model_config_dict(self.module)


class MainParamsState(ModelState):
    """A 16-bit run's model entry: the fp32 main copies (optimizer.MainParams) under the model's own
    names, so the checkpoint has exactly the keys, shapes and dtype of an fp32 run's and loads into a
    run of any ``--params_dtype``. The 16-bit weights are not saved: they are the copies' rounding,
    restored by ``load_state_dict``. The model must keep no state beyond its parameters."""

    def __init__(self, model: nn.Module, main: MainParams):
        super().__init__(model)
        self.main = main
        extra = sorted(set(get_model_state_dict(self.module)) - set(get_model_state_dict(main.module)))
        if extra:
            raise ValueError(f"16-bit params: the model holds state besides trainable weights: {extra[:4]}")

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.main.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.main.module, state_dict)
        self.main.copy_to_model()


class ShardedMainParamsState(ModelState):
    """ZeRO-1 with 16-bit weights: the model entry is the fp32 main params, each rank writing (and
    filling on load) only the chunks of its shards, under the model's names and shapes
    (parallel/distributed_optimizer/sharded_state.py): the same files as an unsharded run's."""

    def __init__(self, model: nn.Module, optimizer):
        super().__init__(model)
        self.optimizer = optimizer
        self.named = list(self.module.named_parameters(remove_duplicate=False))

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.sharded_main_params(self.named)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_sharded_main_params()  # the shards were filled in place by DCP


class ShardedOptimizerState:
    """ZeRO-1's optimizer entry: AdamW moments per parameter name and shape, each rank its chunks
    (the layout of :class:`OptimizerState`, so either loads the other's checkpoints)."""

    def __init__(self, model: nn.Module, optimizer):
        self.optimizer = optimizer
        self.named = list(unwrap_model(model).named_parameters())

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.sharded_optimizer_state(self.named)

    def load_template(self) -> dict[str, Any]:
        return self.optimizer.sharded_optimizer_state(self.named, for_load=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_sharded_optimizer_state(state_dict, self.named)


class OptimizerState:
    """A ``torch.optim.Optimizer`` over the model's parameters, keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.module = unwrap_model(model)
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        # An optimizer that never stepped has no state, and get_optimizer_state_dict would create it
        # by a zero-lr step (bumping AdamW's step count in the live run): nothing to save instead.
        if not self.optimizer.state:
            return {}
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_template(self) -> dict[str, Any]:
        # May create the state by that zero-lr step: harmless here, DCP overwrites all of it.
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:  # saved before its first step
            self.optimizer.state.clear()
            return
        set_optimizer_state_dict(self.module, self.optimizer, state_dict)


class LossScalerState:
    """The fp16 dynamic loss scaler (optimizer.DynamicGradScaler); empty without one (bf16/fp32)."""

    def __init__(self, scaler: DynamicGradScaler | None):
        self.scaler = scaler
        self._as_built = scaler.state_dict() if scaler is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def template_for(self, saved_keys: set[str]) -> dict[str, Any]:
        """What DCP fills: this scaler's layout, or torch.amp.GradScaler's (``scale`` a float,
        ``_growth_tracker``), which z2all saved before issue 11."""
        if "_growth_tracker" in saved_keys:
            return {"scale": 0.0, "_growth_tracker": 0}
        return self.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # {}: saved without a scaler (a bf16/fp32 run, or another --dtype): the scaler starts as built
        if self.scaler is None:
            return
        if "_growth_tracker" in state_dict:  # torch's GradScaler: the scale and growth count carry over
            state_dict = {
                "scale": torch.tensor([float(state_dict["scale"])]),
                "growth_tracker": int(state_dict["_growth_tracker"]),
                "hysteresis_tracker": self.scaler.hysteresis,
            }
        self.scaler.load_state_dict(state_dict or self._as_built)


@dataclass
class TrainProgress:
    """The data position and the token count. The samples of step s are a pure function of
    (seed, s) (z2all.data.sampler), so the step alone says where the data continues."""

    step: int = 0
    """Completed optimizer steps."""
    tokens: int = 0
    """Token positions processed by all ranks so far."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step, self.tokens = int(state_dict["step"]), int(state_dict["tokens"])


class RNGState:
    """Every RNG stream of this process (Python, NumPy, torch CPU and CUDA): z2all.training.rng_state."""

    def state_dict(self) -> dict[str, Any]:
        return get_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # {}: a rank the checkpoint has no file of; the manager seeds its streams by the run's rule
        if state_dict:
            set_rng_state(state_dict)


@dataclass
class TrainState:
    """The components a checkpoint saves and restores (see the module docstring)."""

    shared: dict[str, Stateful]
    """Equal on every rank; saved through DCP under their names."""
    per_rank: dict[str, Stateful] = field(default_factory=lambda: {"rng": RNGState()})
    """This rank's own; saved in ``rank_<R>.pt``."""

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **shared: Stateful):
        """Model (+ optimizer) + any further shared components, and this rank's RNG streams."""
        parts: dict[str, Stateful] = {"model": ModelState(model)}
        if optimizer is not None:
            parts["optim"] = OptimizerState(model, optimizer)
        return cls({**parts, **shared})

    @property
    def model(self) -> ModelState | None:
        m = self.shared.get("model")
        return m if isinstance(m, ModelState) else None
