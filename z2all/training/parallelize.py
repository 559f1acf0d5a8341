"""Wrap a single-device model for data parallelism, from the outside (the model knows nothing of it).

:class:`DataParallelModel` gives the loop one interface over three cases:

- world size 1: the bare module; no communication. With 16-bit ``--params_dtype`` the z2all DDP
  wraps it on one rank too (its buffers hold the 16-bit weights and the fp32 ``main_grad`` the
  optimizer wrapper reads through :meth:`DataParallelModel.grad_of`); the runtime made a one-rank group.
- ``--ddp_impl=torch``: ``torch.nn.parallel.DistributedDataParallel`` on its own default path (its C++
  all-reduce, no Python hook) unless ``--comm_hook`` asks for one; its ``comm_bytes`` are then
  computed from the gradient sizes (every synced step all-reduces every trainable gradient).
- ``--ddp_impl=z2all``: ``parallel.DistributedDataParallel`` (docs/architecture.md), which counts
  its own bytes in ``comm_bytes``.

Per optimizer step the loop does::

    for each micro-step but the last:  with dp.no_sync(): loss.backward()   # no communication
    last micro-step:                   loss.backward(); dp.finish_grad_sync()
    # invariant here: every param.grad holds the gradient averaged over all ranks
    optimizer.step(); dp.zero_grad()

``comm_bytes`` counts the payload of gradient collectives (the bytes of the tensors all-reduced, per
rank), not the wire traffic of the ring algorithm (about 2(W-1)/W times that).

Construction order (z2all.training.build): model -> this wrapper (buffers, hooks) -> the optimizer
over :meth:`DataParallelModel.named_trainable_parameters`, or, with ``--overlap_optim_step``, no main
optimizer at all: the per-bucket optimizers built inside the comm hook are the optimizer's one home.

Its state is a per-rank checkpoint component (``state_dict`` / ``load_state_dict``): PowerSGD's error
feedback and P/Q memories and the per-bucket optimizers are per rank and per bucket, so they are
restored only when the world size and the bucket layout (``--bucket_size``) match the checkpoint's;
otherwise PowerSGD's restart with a warning naming what changed, while its iteration count continues
(:meth:`DataParallelModel.start_at`: no second warm-up). Per-bucket optimizers hold the AdamW moments,
which must not restart: z2all.training.resume refuses such a resume before anything is built.

No ``from __future__ import annotations`` here: torch DDP checks a comm hook's return annotation
at runtime and needs the real ``torch.futures.Future[torch.Tensor]`` object, not a string.
"""

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as torch_default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from parallel import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    NonFiniteGradError,
    param_name,
)
from parallel import ddp_comm_hooks as hooks
from parallel.ddp_comm_hooks.optimizer_overlap_hooks import OptimizerOverlapState, optimizer_overlap_hook
from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDConfig, PowerSGDState, powerSGD_hook
from z2all.training.config import ConfigError

logger = logging.getLogger(__name__)
_NONE: frozenset = frozenset()  # no parameter unused this step (the usual case): nothing to build


class _ByteCounter:
    """State of the counting hooks for torch DDP: bytes handed to collectives since the last reset."""

    def __init__(self, process_group=None, inner_state: Any = None):
        self.process_group = process_group
        self.inner_state = inner_state
        self.bytes = 0


def _counting_compress_hook(dtype: torch.dtype):
    """fp16/bf16 compression: cast, all-reduce, cast back (torch's default_hooks), counted."""
    inner = (
        torch_default_hooks.fp16_compress_hook
        if dtype == torch.float16
        else torch_default_hooks.bf16_compress_hook
    )

    def hook(state: _ByteCounter, bucket) -> torch.futures.Future[torch.Tensor]:
        state.bytes += bucket.buffer().numel() * torch.tensor([], dtype=dtype).element_size()
        return inner(state.process_group, bucket)

    return hook


def _counting_powersgd_hook(state: _ByteCounter, bucket) -> torch.futures.Future[torch.Tensor]:
    """torch's PowerSGD hook; bytes read from its own compression statistics (P, Q and uncompressed)."""
    ps = state.inner_state
    buf = bucket.buffer()
    if ps.iter < ps.start_powerSGD_iter:
        state.bytes += buf.numel() * buf.element_size()
        return torch_powersgd.powerSGD_hook(ps, bucket)
    before = ps.total_numel_after_compression
    fut = torch_powersgd.powerSGD_hook(ps, bucket)
    state.bytes += (ps.total_numel_after_compression - before) * buf.element_size()
    return fut


class DataParallelModel:
    """One interface over no wrapping, torch DDP and z2all DDP (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        cfg,
        device: torch.device,
        make_bucket_optimizer=None,
    ):
        """``make_bucket_optimizer``: with --overlap_optim_step, ``[(name, param)] -> optimizer`` for one
        bucket (the same factory that builds the main optimizer otherwise)."""
        self.module = module  # the model (maybe torch.compile'd): what the optimizer holds
        self.impl = "none"
        self._check_nan = bool(getattr(cfg, "check_for_nan_in_grad", False))
        self._counter: _ByteCounter | None = None
        self._grad_bytes_per_sync = 0  # torch DDP on its default path: bytes of one full all-reduce
        self._synced_steps = 0
        self._powersgd = None  # z2all PowerSGDState, whose state_dict goes into checkpoints
        self._overlap = None  # z2all OptimizerOverlapState: per-bucket optimizers stepped in the hook
        self._lr = None
        self._layout: list = []
        self._restored = False  # whether load_state_dict restored the hook state (else start_at warns)
        self._unused_cache = None  # (DDP's unused_params list, as a set)
        self._not_restored_why = "the checkpoint holds no PowerSGD state"
        self.wrapped: nn.Module = module
        self.world = 1
        self._bucket_size = cfg.bucket_size
        self._half_params = getattr(cfg, "params_dtype", "float32") != "float32"
        self._zero = bool(getattr(cfg, "use_distributed_optimizer", False))
        grouped = dist.is_available() and dist.is_initialized()
        if not grouped or dist.get_world_size() == 1:
            if cfg.comm_hook != "allreduce":
                logger.info("world size 1: --comm_hook=%s has nothing to compress", cfg.comm_hook)
            if self._half_params or self._zero:
                # 16-bit weights, ZeRO-1: the buffers (fp32 gradients beside the weights) on one rank too
                if not grouped:
                    raise ValueError("16-bit --params_dtype needs a process group (distributed_runtime)")
                self.impl = "z2all"
                self._wrap_z2all(cfg, None, single=True)
            return
        self.world = dist.get_world_size()
        self.impl = cfg.ddp_impl
        if cfg.ddp_impl == "torch":
            self._wrap_torch(cfg, device)
        else:
            self._wrap_z2all(cfg, make_bucket_optimizer)

    # ---- construction -------------------------------------------------------------------------------
    def _wrap_torch(self, cfg, device: torch.device) -> None:
        device_ids = [device.index] if device.type == "cuda" else None
        bucket_cap_mb = max(1, cfg.bucket_size * 4 // 2**20)
        if cfg.comm_hook == "powersgd" and dist.get_backend() == "gloo":
            # torch's powerSGD_hook issues its Q all-reduce from a Future.then callback, which gloo runs
            # on a worker thread: with >1 bucket those collectives can pair up differently on different
            # ranks (see parallel/ddp_comm_hooks/bucket.py). One bucket for all gradients is safe.
            # (An explicit bucket_cap_mb also sets torch's first-bucket cap, so nothing is split off.)
            grad_bytes = sum(
                p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad
            )
            single = grad_bytes // 2**20 + 1
            if single > bucket_cap_mb:
                logger.info(
                    "--ddp_impl=torch --comm_hook=powersgd on gloo: one gradient bucket of %d MiB instead of "
                    "%d MiB (torch's PowerSGD hook is only safe with a single bucket on gloo)",
                    single,
                    bucket_cap_mb,
                )
                bucket_cap_mb = single
        self.wrapped = TorchDDP(self.module, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb)
        if cfg.comm_hook == "powersgd":
            ps = torch_powersgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=cfg.powersgd_rank,
                start_powerSGD_iter=cfg.powersgd_start_iter,  # >= 2, checked by TrainConfig
                use_error_feedback=True,
                warm_start=True,
                random_seed=cfg.seed,
            )
            # The hook counts its own iterations (one per synced backward = one per optimizer step);
            # a resumed run continues the plain/compressed phase where it was (start_at). Error feedback
            # and warm start memories are not checkpointed, so a PowerSGD resume is close, not bit-exact.
            self._counter = _ByteCounter(None, ps)
            self.wrapped.register_comm_hook(self._counter, _counting_powersgd_hook)
        elif cfg.comm_hook in ("fp16", "bf16"):
            self._counter = _ByteCounter(None)
            dtype = torch.float16 if cfg.comm_hook == "fp16" else torch.bfloat16
            self.wrapped.register_comm_hook(self._counter, _counting_compress_hook(dtype))
        else:
            # The reference's best path: torch DDP's own C++ all-reduce, no Python hook in the way.
            self._grad_bytes_per_sync = sum(
                p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad
            )

    def _wrap_z2all(self, cfg, make_bucket_optimizer, single: bool = False) -> None:
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.grad_reduce_in_fp32,
            # the optimizer wrapper reads the fp32 main_grad (grad_of): no 16-bit copy of it in .grad,
            # except for the overlapped step, whose bucket optimizers tell used from unused by .grad
            param_grad_copies=not self._half_params or (cfg.overlap_optim_step and not single),
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            bucket_size=cfg.bucket_size,
            # the small first bucket (communication starts early) is never larger than the others
            first_bucket_size=min(DistributedDataParallelConfig.first_bucket_size, cfg.bucket_size),
            check_for_nan_in_grad=cfg.check_for_nan_in_grad,
            use_distributed_optimizer=self._zero,
        )
        # Under --compile the DDP reports the model's own names (it drops `_orig_mod.` itself).
        self.wrapped = DistributedDataParallel(ddp_cfg, self.module)
        self._layout = self.wrapped.bucket_layout()
        if single:  # one rank: nothing to compress, no bucket to step early
            return
        hook, hook_state = None, None  # None: the DDP's built-in averaging all-reduce
        if cfg.comm_hook == "powersgd":
            ps_cfg = PowerSGDConfig(
                matrix_approximation_rank=cfg.powersgd_rank,
                start_powerSGD_iter=cfg.powersgd_start_iter,
                random_seed=cfg.seed,
            )
            self._powersgd = PowerSGDState(None, ps_cfg)
            self._powersgd_as_built = self._powersgd.state_dict()
            hook, hook_state = powerSGD_hook, self._powersgd
        elif cfg.comm_hook in ("fp16", "bf16"):
            hook = hooks.fp16_compress_hook if cfg.comm_hook == "fp16" else hooks.bf16_compress_hook
        if cfg.overlap_optim_step:
            if make_bucket_optimizer is None:
                raise ValueError("--overlap_optim_step needs a per-bucket optimizer factory")

            def make(named_params):
                opt = make_bucket_optimizer(named_params)
                for group in opt.param_groups:  # built mid-backward: start at this step's LR
                    group["lr"] = self._lr if self._lr is not None else group["lr"]
                return opt

            self._overlap = OptimizerOverlapState(hook or hooks.allreduce_hook, hook_state, make)
            self.wrapped.register_comm_hook(self._overlap, optimizer_overlap_hook)
        elif hook is not None:
            self.wrapped.register_comm_hook(hook_state, hook)

    # ---- checkpoint component (per rank) -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's comm-hook state (z2all PowerSGD, overlapped optimizers); {} when stateless."""
        if self._powersgd is None and self._overlap is None:
            return {}  # nothing stateful: the layout alone is not worth a checkpoint entry
        state: dict[str, Any] = {
            "world_size": self.world,
            "bucket_layout": self._layout,
            "bucket_size": self._bucket_size,
        }
        if self._powersgd is not None:
            state["powersgd"] = self._powersgd.state_dict()
        if self._overlap is not None:
            state["overlap_optim"] = self._overlap.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what fits this run's world size and buckets (module docstring); {}: as built."""
        self._restored, self._not_restored_why = False, "the checkpoint holds no PowerSGD state"
        if self._powersgd is not None:  # whatever an earlier (failed) load attempt restored goes
            self._powersgd.load_state_dict(self._powersgd_as_built)
        if not state:
            return
        changed = _what_changed(state, self.world, self._layout, self._bucket_size)
        if self._overlap is not None and state.get("overlap_optim") is not None:
            if changed is not None:  # z2all.training.resume refuses this first; never restart the moments
                raise ConfigError(
                    "cannot resume --overlap_optim_step: its per-bucket AdamW state was saved for other "
                    f"buckets ({changed}); resume with the saved --bucket_size and world size"
                )
            self._overlap.load_state_dict(state["overlap_optim"])
        if self._powersgd is not None and state.get("powersgd") is not None:
            if changed is None:
                try:  # error feedback, warm-start P/Q and per-bucket call counts of this rank: exact
                    self._powersgd.load_state_dict(state["powersgd"])
                    self._restored = True
                except ValueError as e:  # saved with another --powersgd_rank / start iter: restart
                    self._not_restored_why = str(e)
            else:
                self._not_restored_why = changed

    def start_at(self, step: int) -> None:
        """The run continues after ``step`` completed steps: hook state that was not restored continues
        its iteration count (PowerSGD's warm-up is not run twice)."""
        if self._counter is not None and self._counter.inner_state is not None:
            self._counter.inner_state.iter = step  # torch's PowerSGD counts synced backwards
        if self._powersgd is not None and not self._restored and step > 0:
            self._powersgd.continue_from(step)
            logger.warning(
                "resuming PowerSGD at step %d without its saved error feedback and P/Q memories (%s): "
                "they restart, the warm-up does not, so losses are close to, not identical with, an "
                "uninterrupted run",
                step,
                self._not_restored_why,
            )

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(model's own name, parameter)`` of what the optimizer steps, in registration order."""
        return [(param_name(n), p) for n, p in self.module.named_parameters() if p.requires_grad]

    def grad_of(self, param: nn.Parameter) -> torch.Tensor | None:
        """``param``'s averaged gradient after :meth:`finish_grad_sync`, or None when no rank used it:
        z2all DDP's ``main_grad`` (fp32 with --grad_reduce_in_fp32, whatever the weights' dtype), else
        ``param.grad``. What the optimizer wrapper steps (its ``grad_of``)."""
        if self.impl == "z2all":
            return None if param in self._unused() else param.main_grad
        return param.grad

    def _unused(self) -> set:
        unused = self.wrapped.unused_params
        if not unused:
            return _NONE
        if self._unused_cache is None or self._unused_cache[0] is not unused:
            self._unused_cache = (unused, set(unused))
        return self._unused_cache[1]

    @property
    def steps_optimizer(self) -> bool:
        """True when the comm hook runs the optimizer step itself (--overlap_optim_step)."""
        return self._overlap is not None

    def set_lr(self, lr: float) -> None:
        """LR for optimizers the hook owns (the loop sets the main optimizer's itself)."""
        self._lr = lr
        if self._overlap is not None:
            self._overlap.set_lr(lr)

    def bucket_optimizers(self) -> list:
        """The per-bucket optimizers of --overlap_optim_step built so far (none otherwise)."""
        return list(self._overlap.optimizers.values()) if self._overlap is not None else []

    # ---- the per-step protocol ----------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def no_sync(self):
        """Context for accumulation micro-steps: gradients accumulate locally, nothing is sent."""
        if self.impl == "none":
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def finish_grad_sync(self, allow_nonfinite: bool = False) -> None:
        """After the last backward of a step: wait until every param.grad is the all-rank average.

        With ``check_for_nan_in_grad`` a NaN/Inf gradient raises RuntimeError naming the parameter(s)
        (z2all DDP checks itself once all collectives are done). ``allow_nonfinite``: a dynamic loss
        scaler looks at the gradients next and skips the step on an overflow, so there is nothing to
        raise. Reduced grads are equal on every rank, so every rank raises together.
        """
        self._synced_steps += 1
        if self.impl == "z2all":
            self.wrapped.finish_grad_sync(allow_nonfinite=allow_nonfinite)
        # torch DDP finishes its all-reduces inside backward() (autograd waits on the hook futures).
        elif self._check_nan and not allow_nonfinite:
            bad = [
                param_name(n)
                for n, p in self.module.named_parameters()
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
            if bad:
                rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
                raise NonFiniteGradError(
                    f"non-finite (NaN/Inf) gradient on rank {rank} after the gradient sync "
                    f"(--check_for_nan_in_grad), in parameter(s): {', '.join(bad)}"
                )

    def zero_grad(self) -> None:
        """Drop every gradient before the next step (``param.grad = None``, as
        ``optimizer.zero_grad(set_to_none=True)``; z2all DDP also resets its grad buffer)."""
        if self.impl == "z2all":
            self.wrapped.zero_grad_buffer()
        else:
            for p in self.module.parameters():
                p.grad = None

    def pop_comm_bytes(self) -> int:
        """Bytes this rank handed to gradient collectives since the last call."""
        if self.impl == "torch":
            if self._counter is None:  # default path: every synced step all-reduced every gradient
                n, self._synced_steps = self._synced_steps * self._grad_bytes_per_sync, 0
                return n
            n, self._counter.bytes = self._counter.bytes, 0
            return n
        if self.impl == "z2all":
            n = int(self.wrapped.comm_bytes)
            self.wrapped.reset_comm_stats()
            return n
        return 0


def _what_changed(state: dict, world: int, layout: list, bucket_size: int) -> str | None:
    """Why a checkpoint's per-bucket hook state does not fit this run, or None when it does."""
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world:
        return f"saved on world size {saved_world}, this run has {world}"
    saved = state.get("bucket_layout")
    if saved is None:  # a checkpoint of a z2all before the layout was recorded: it cannot be checked
        return "saved without its bucket layout (an older z2all)"
    if saved != layout:  # plain lists on both sides (DistributedDataParallel.bucket_layout, weights_only)
        return (
            f"--bucket_size={state.get('bucket_size')} when saved, --bucket_size={bucket_size} now "
            f"({len(saved)} vs {len(layout)} buckets)"
        )
    return None
