"""Optimizer wrappers with one interface for fp32, bf16 and fp16 training (Megatron's design).

``FP32Optimizer`` steps fp32 weights in place. ``Float16OptimizerWithFloat16Params`` takes bf16/fp16
weights (for instance views into a DDP buffer), keeps an fp32 "main" copy of each, steps the inner
AdamW on the main copies and rounds them back into the weights. Both are a
``MixedPrecisionOptimizer`` and the trainer calls only: ``scale_loss``, ``zero_grad``,
``step() -> (stepped, grad_norm, num_zeros)``, ``state_dict``, ``load_state_dict``, ``param_groups``
(for the learning-rate schedule). Design, data flow and memory table: docs/optimizer.md.

``step()`` in order, on every rank:

    1. gradients -> fp32 main grads: from ``param.main_grad`` when it exists (the DDP buffer,
       fp32 or 16-bit), else ``param.grad``; None stays None (a parameter without a gradient
       is not stepped, which is not the same as a zero gradient under AdamW's weight decay).
    2. with a scaler (fp16): unscale by 1/scale and find Inf/NaN, then ONE all-reduce(MAX) of the
       one-element flag over ``process_group``; ``scaler.update(found_inf)``; on an overflow
       return (False, None, None) on every rank.
    3. global L2 norm of the fp32 main grads (``torch.nn.utils.get_total_norm``); a non-finite
       norm (bf16/fp32 without a scaler) returns (False, norm, None).
    4. clip to ``config.grad_clip`` when > 0 (``torch.nn.utils.clip_grads_with_norm_``: the same
       arithmetic as ``clip_grad_norm_``), inner ``optimizer.step()``, copy main -> 16-bit weights.

Invariants:
- A skipped step changes no weight, no main param, no optimizer state and not the optimizer's step
  count (the inner optimizer is simply not called); only the scaler's trackers move.
- Every rank takes the same branch. Step 2's flag is all-reduced; step 3's norm needs no collective
  because DDP has made the gradients bit-identical on every rank. Parameters sharded over ranks
  (ZeRO-1, next) pass ``grad_norm_process_group``: the squared local norms are then summed over it.
- ``main_params[i]`` belongs to ``model_params[i]``, flattened in param-group order; a 16-bit
  weight always equals ``main.to(weight.dtype)`` after a step or a load. Weights are written in
  place (``copy_``), never rebound, so DDP's buffer views stay valid.
- Main params given as a ``MainParams`` (the trainer's way) belong to it: ``state_dict()`` then has
  ``"main_params": None`` and the owner checkpoints them (named like the model, optimizer/main_params.py).
- ``grad_of`` says where a weight's gradient is (default ``_model_grad``); the trainer passes its
  DDP's, which returns None for a parameter no rank used, as torch DDP leaves its ``.grad`` None.
- ``state_dict()`` holds only tensors, ints, floats, strings, None and containers of them, so it
  round-trips through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from optimizer.adamw import build_adamw
from optimizer.config import OptimizerConfig
from optimizer.grad_scaler import DynamicGradScaler
from optimizer.main_params import MainParams

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
"""Builds the inner optimizer from param groups (dicts with "params" and per-group overrides)."""
GradOf = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``weight -> its gradient this step, or None`` (not stepped). Default: :func:`_model_grad`."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_STATE_KEYS = {"optimizer", "main_params", "grad_scaler"}


def adamw_factory(config: OptimizerConfig) -> OptimizerFactory:
    """The default inner optimizer: ``build_adamw`` with the config's AdamW settings."""

    def build(param_groups: list[dict]) -> torch.optim.Optimizer:
        return build_adamw(
            param_groups,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            weight_decay=config.weight_decay,
            backend=config.backend,
        )

    return build


def _as_groups(param_groups: Iterable) -> list[dict]:
    groups = list(param_groups)
    if not groups:
        raise ValueError("optimizer wrapper: got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [{**g, "params": list(g["params"])} for g in groups]


def _model_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``param`` this step: DDP's ``main_grad`` when present, else ``param.grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


class MixedPrecisionOptimizer:
    """The common step; subclasses decide what the main params are and how gradients reach them."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model_params: list[torch.Tensor],
        main_params: list[torch.Tensor],
        config: OptimizerConfig,
        grad_scaler: DynamicGradScaler | None,
        process_group: dist.ProcessGroup | None,
        grad_norm_process_group: dist.ProcessGroup | None,
        grad_of: GradOf | None = None,
        owns_main_params: bool = True,
        device: torch.device | None = None,
    ):
        """``device``: where the step's flags and norms live; default: the first main param's (a
        ZeRO-1 rank may own no parameter at all and pass its buffers' device)."""
        assert len(model_params) == len(main_params)
        self.optimizer = optimizer
        self._device = device if device is not None else main_params[0].device
        self._grad_of = grad_of or _model_grad
        # False: the main params were given (a MainParams object), whose owner checkpoints them
        self._owns_main_params = owns_main_params
        self.config = config
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.grad_norm_process_group = grad_norm_process_group
        self._model_params = model_params
        self._main_params = main_params

    # ---- what the trainer reads ---------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups (over the main params): a schedule sets ``group["lr"]`` here."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The inner optimizer's per-parameter state (keyed by main param)."""
        return self.optimizer.state

    @property
    def model_params(self) -> list[torch.Tensor]:
        return list(self._model_params)

    @property
    def main_params(self) -> list[torch.Tensor]:
        """The fp32 tensors the inner optimizer steps, ``main_params[i]`` for ``model_params[i]``."""
        return list(self._main_params)

    def get_loss_scale(self) -> torch.Tensor | None:
        return None if self.grad_scaler is None else self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` with a scaler (call backward on this), else ``loss`` itself."""
        return loss if self.grad_scaler is None else loss * self.grad_scaler.scale.to(loss.device)

    # ---- the step -----------------------------------------------------------------------------------
    def _copy_model_grads_to_main_grads(self) -> None:
        raise NotImplementedError

    def _copy_main_params_to_model_params(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Drop every gradient (set to None) of the model and main params. DDP's ``main_grad`` buffer is
        left alone: zeroing it is the DDP wrapper's ``zero_grad_buffer``."""
        for p in self._model_params:
            p.grad = None
        for p in self._main_params:
            p.grad = None

    def _unscale_and_find_inf(self, grads: list[torch.Tensor]) -> bool:
        """Multiply ``grads`` by 1/scale in place; True when any is Inf/NaN on any rank."""
        device = self._device
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            # the fused kernel torch's GradScaler and Megatron use: unscale and test in one pass
            inv_scale = self.grad_scaler.inv_scale.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        # Unconditional, even on a rank with no gradient: every rank must issue the same collectives.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(found_inf.item())

    def _global_grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        else:  # nothing here (a ZeRO-1 rank owning no element): 0, on the device the collective needs
            norm = torch.zeros((), dtype=torch.float32, device=self._device)
        if self.grad_norm_process_group is not None:
            # sharded params: each rank holds different gradients; ||g||^2 is the sum of the shards'
            squared = norm.double() ** 2
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.grad_norm_process_group)
            norm = squared.sqrt().to(norm.dtype)
        return norm

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The global L2 norm of the current gradients as ``step()`` would see them (still scaled
        with a scaler), without stepping; collective for sharded parameters (every rank calls)."""
        self._copy_model_grads_to_main_grads()
        return float(self._global_grad_norm([p.grad for p in self._main_params if p.grad is not None]))

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, None]:
        """(stepped, grad_norm, num_zeros). ``grad_norm`` is the global norm before clipping (None on a
        loss-scale overflow); ``num_zeros`` is always None (counting zero gradients is not done)."""
        self._copy_model_grads_to_main_grads()
        grads = [p.grad for p in self._main_params if p.grad is not None]
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_find_inf(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        norm = self._global_grad_norm(grads)
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            return False, grad_norm, None
        if self.config.grad_clip > 0.0:
            torch.nn.utils.clip_grads_with_norm_(self._main_params, self.config.grad_clip, norm)
        self.optimizer.step()
        self._copy_main_params_to_model_params()
        return True, grad_norm, None

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"optimizer": inner state, "main_params": [fp32 tensor per param, in order], "grad_scaler":
        its state or None}. Tensors are references, as in ``torch.optim.Optimizer.state_dict``."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "main_params": [p.detach() for p in self._main_params] if self._owns_main_params else None,
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the inner state and the main params (the truth: the weights become their rounding).

        A checkpoint of another precision loads: a saved scaler state without a scaler here is dropped,
        and a scaler here with none saved starts at its initial scale (both logged)."""
        keys = set(state)
        if keys != _STATE_KEYS:
            raise ValueError(
                f"optimizer state_dict: missing keys {sorted(_STATE_KEYS - keys)}, "
                f"unexpected keys {sorted(keys - _STATE_KEYS)}"
            )
        saved = state["main_params"]
        if saved is None:  # main params kept by their owner (a MainParams), restored by it
            self.optimizer.load_state_dict(state["optimizer"])
            self._load_scaler(state["grad_scaler"])
            return
        if len(saved) != len(self._main_params):
            raise ValueError(
                f"optimizer state_dict: {len(saved)} main params saved, this optimizer has "
                f"{len(self._main_params)}"
            )
        for i, (mine, theirs) in enumerate(zip(self._main_params, saved)):
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"optimizer state_dict: main param {i} has shape {tuple(theirs.shape)}, "
                    f"expected {tuple(mine.shape)}"
                )
        self.optimizer.load_state_dict(state["optimizer"])
        for mine, theirs in zip(self._main_params, saved):
            mine.copy_(theirs)
        self._copy_main_params_to_model_params()
        self._load_scaler(state["grad_scaler"])

    def _load_scaler(self, scaler_state: dict | None) -> None:
        if self.grad_scaler is not None and scaler_state is not None:
            self.grad_scaler.load_state_dict(scaler_state)
        elif scaler_state is not None:
            logger.info("optimizer state_dict: loss-scaler state ignored (this run has no loss scaler)")
        elif self.grad_scaler is not None:
            logger.info(
                "optimizer state_dict: no loss-scaler state saved; starting at scale %g",
                float(self.grad_scaler.scale.item()),
            )


class FP32Optimizer(MixedPrecisionOptimizer):
    """fp32 weights stepped in place (they are their own main params). With a scaler it serves fp16
    autocast over fp32 weights: the same unscale, overflow all-reduce and skip as fp16 weights."""

    def __init__(
        self,
        param_groups: Iterable,
        config: OptimizerConfig,
        *,
        inner_factory: OptimizerFactory | None = None,
        grad_scaler: DynamicGradScaler | None = None,
        process_group: dist.ProcessGroup | None = None,
        grad_norm_process_group: dist.ProcessGroup | None = None,
        grad_of: GradOf | None = None,
    ):
        groups = _as_groups(param_groups)
        params = [p for g in groups for p in g["params"]]
        for i, p in enumerate(params):
            if p.dtype != torch.float32:
                raise TypeError(
                    f"FP32Optimizer: param {i} is {p.dtype}; use Float16OptimizerWithFloat16Params"
                )
        optimizer = (inner_factory or adamw_factory(config))(groups)
        super().__init__(
            optimizer, params, params, config, grad_scaler, process_group, grad_norm_process_group, grad_of
        )

    def _copy_model_grads_to_main_grads(self) -> None:
        for p in self._model_params:
            g = self._grad_of(p)
            if g is not None and g is not p.grad:
                p.grad = g  # DDP's fp32 main_grad, aliased: no copy

    def _copy_main_params_to_model_params(self) -> None:
        pass  # the main params are the weights


class Float16OptimizerWithFloat16Params(MixedPrecisionOptimizer):
    """bf16/fp16 weights with fp32 main copies. fp32 params in the groups (e.g. norm weights kept in
    fp32) are stepped in place like ``FP32Optimizer``'s. fp16 weights require a ``DynamicGradScaler``."""

    def __init__(
        self,
        param_groups: Iterable,
        config: OptimizerConfig,
        *,
        inner_factory: OptimizerFactory | None = None,
        grad_scaler: DynamicGradScaler | None = None,
        process_group: dist.ProcessGroup | None = None,
        grad_norm_process_group: dist.ProcessGroup | None = None,
        grad_of: GradOf | None = None,
        main_params: MainParams | None = None,
    ):
        """``main_params``: the fp32 copies to step, owned (and checkpointed) by the caller; every
        16-bit weight must be in it. None: the wrapper clones its own from the weights now."""
        groups = _as_groups(param_groups)
        shared_mains = main_params
        model_params, main_params, main_groups = [], [], []
        for g in groups:
            main_group = {**g, "params": []}
            for p in g["params"]:
                i = len(model_params)
                if p.dtype == torch.float16 and grad_scaler is None:
                    raise ValueError(f"param {i} is float16: fp16 weights need a DynamicGradScaler")
                if p.dtype in _HALF_DTYPES and shared_mains is not None:
                    main = shared_mains.of(p)
                elif p.dtype in _HALF_DTYPES:
                    main = p.detach().clone().float()  # a leaf, requires_grad=False
                elif p.dtype == torch.float32:
                    main = p
                else:
                    raise TypeError(f"Float16OptimizerWithFloat16Params: param {i} has dtype {p.dtype}")
                model_params.append(p)
                main_params.append(main)
                main_group["params"].append(main)
            main_groups.append(main_group)
        optimizer = (inner_factory or adamw_factory(config))(main_groups)
        super().__init__(
            optimizer,
            model_params,
            main_params,
            config,
            grad_scaler,
            process_group,
            grad_norm_process_group,
            grad_of,
            owns_main_params=shared_mains is None,
        )

    def _copy_model_grads_to_main_grads(self) -> None:
        for model, main in zip(self._model_params, self._main_params):
            g = self._grad_of(model)
            if main is model:
                if g is not None and g is not model.grad:
                    model.grad = g.float()
            else:
                # .float() of an fp32 main_grad is the buffer itself (unscaling then edits it in place:
                # harmless, the DDP zeroes it before the next backward); of a 16-bit one, a new fp32 copy
                main.grad = None if g is None else g.float()

    def _copy_main_params_to_model_params(self) -> None:
        for model, main in zip(self._model_params, self._main_params):
            if main is not model:
                model.detach().copy_(main)  # round to nearest even, in place
