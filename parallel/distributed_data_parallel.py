"""Our data-parallel wrapper: bucketed gradient buffers, overlapped per-bucket collectives, comm hooks.

Data flow of one iteration (design page with the full picture: ``docs/ddp.md``)::

    backward: AccumulateGrad(p): p.grad is None at p's first gradient of the iteration -> a fresh
              tensor, which the post-accumulate hook copies into p.main_grad (no memset of the buffer
              per step) before making p.grad the main_grad view (same dtype), so later micro-steps
              add in place; the hook marks p used, and ready in its bucket
              bucket complete?  -> launch every complete bucket from ``_next_bucket`` on, in index
                                   order: hook(state, GradBucket) -> Future (async collective); the
                                   last bucket's padding carries one "used here" flag per parameter
    finish_grad_sync(): launch the rest in index order; wait all Futures; p.grad = averaged grad, or
              None for a parameter that got no gradient on ANY rank (as torch DDP with
              find_unused_parameters=True)
    optimizer.step(); zero_grad_buffer()  (every p.grad None again)

THE ordering invariant (why there is no hang and no corruption with gloo or NCCL): on every rank,
collectives are issued in strictly increasing global bucket index, each bucket exactly once per
iteration (with a comm hook or reduce-scatter, followed by one all-reduce of the used flags, issued
after every bucket completed). Launched buckets always form a prefix
``[0, _next_bucket)``. A bucket whose gradients arrive early (out-of-order backward) waits until all
lower buckets are complete; a bucket holding a parameter that got no gradient this step (unused)
never completes during backward, so it and all later buckets are launched by ``finish_grad_sync()``,
again in index order. Which buckets overlap with backward may thus differ between ranks, but the
SEQUENCE of collectives never does.

Global bucket index = expected readiness. Backward produces gradients roughly in reverse
registration order, so a bucket is expected ready when its earliest-registered parameter is. With
several buffers (parameters of several dtypes, e.g. fp32 norms beside bf16 linears) the buckets of
all buffers are numbered by that expectation, interleaving the buffers, so each can launch while
backward still runs; numbering buffer after buffer would make every bucket of the second buffer
wait for the last bucket of the first, i.e. for the end of backward. The numbering is a pure
function of the module's parameters, hence the same on every rank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from parallel.ddp_comm_hooks.bucket import GradBucket
from parallel.ddp_comm_hooks.default_hooks import DefaultHookState, _allreduce_future, reduce_scatter_hook
from parallel.distributed_data_parallel_config import DistributedDataParallelConfig
from parallel.nonfinite_grads import _NonFiniteGradCheck
from parallel.param_and_grad_buffer import ParamAndGradBuffer, _Bucket
from parallel.unwrap import _ModuleWrapper, unwrap_model

logger = logging.getLogger(__name__)

CommHook = Callable[[object, GradBucket], torch.futures.Future]


class DistributedDataParallel(_ModuleWrapper):
    """Wrap any ``nn.Module`` for data-parallel training over ``process_group`` (default: world)."""

    def __init__(
        self,
        config: DistributedDataParallelConfig,
        module: nn.Module,
        process_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedDataParallel needs an initialised torch.distributed process group "
                "(launch with torchrun and call torch.distributed.init_process_group first)"
            )
        if not isinstance(config, DistributedDataParallelConfig):
            raise TypeError(f"config must be a DistributedDataParallelConfig, got {type(config).__name__}")
        self.config = config
        self.module = module
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.dp_size = dist.get_world_size(self.process_group)
        self.dp_rank = dist.get_rank(self.process_group)

        # named_parameters() de-duplicates shared (tied) parameters: each appears once, first name.
        # Names are the model's own: named inside any torch.compile / DDP wrapper (parallel/unwrap.py).
        self.param_to_name: dict[nn.Parameter, str] = {
            p: n for n, p in unwrap_model(module).named_parameters()
        }
        params = [p for p in self.param_to_name if p.requires_grad]  # registration order
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"all trainable parameters must be on one device, found {sorted(map(str, devices))}"
            )

        # Parameters still start in their own storage: broadcast them first, then copy into buffers.
        if config.broadcast_params:
            self._broadcast_from_rank0(module)

        # One buffer per (param dtype, grad dtype), in order of first appearance.
        groups: dict[tuple[torch.dtype, torch.dtype], list[nn.Parameter]] = {}
        for p in params:
            grad_dtype = torch.float32 if config.grad_reduce_in_fp32 else p.dtype
            groups.setdefault((p.dtype, grad_dtype), []).append(p)
        # The small first bucket goes to the buffer holding the last registered parameter: its
        # gradient is expected first in backward.
        first_group = next(k for k, g in groups.items() if any(p is params[-1] for p in g))
        self.param_and_grad_buffers: list[ParamAndGradBuffer] = []
        for key, group_params in groups.items():
            self.param_and_grad_buffers.append(
                ParamAndGradBuffer(
                    group_params,
                    key[0],
                    key[1],
                    data_parallel_size=self.dp_size,
                    bucket_size=config.bucket_size,
                    first_bucket_size=config.first_bucket_size if key == first_group else config.bucket_size,
                    alignment=config.bucket_alignment,
                    first_bucket_index=0,
                    # The buffer of the first registered parameter holds the globally last bucket:
                    # room there for the used-parameter flags (one element per parameter).
                    tail_reserve=len(params) if any(p is params[0] for p in group_params) else 0,
                )
            )
        # Global collective order = expected readiness (module docstring): a bucket is ready once its
        # earliest-registered parameter's gradient arrived, expected at position len - 1 - reg_index.
        reg_index = {p: i for i, p in enumerate(params)}
        self.buckets: list[_Bucket] = sorted(
            (b for buf in self.param_and_grad_buffers for b in buf.buckets),
            key=lambda b: -min(reg_index[p] for p in b.params),
        )
        for i, b in enumerate(self.buckets):
            b.index = i
        last = self.buckets[-1]
        # Used-parameter flags ride in the last bucket's padding through the default all-reduce
        # (``_sync_unused_params``): no extra collective. Averaging divides them by W; > 0 means used.
        self._flags_slot = last.grad_data[last.numel_unpadded : last.numel_unpadded + len(params)]
        self._params = params  # registration order: the order of the used-flags vector
        self._param_to_bucket: dict[nn.Parameter, _Bucket] = {p: b for b in self.buckets for p in b.params}
        self._grad_buckets = [
            GradBucket(
                index=b.index,
                is_last=b.index == len(self.buckets) - 1,
                buffer=b.grad_data,
                params=b.params,
                param_names=[self.param_to_name[p] for p in b.params],
                offsets=b.offsets,
                record_comm_bytes=self._record_comm_bytes,
            )
            for b in self.buckets
        ]

        self._default_state = DefaultHookState(self.process_group, config.average_in_collective)
        self._comm_hook: CommHook | None = None
        self._comm_hook_state: object = None
        self._comm_bytes = 0
        # Per-iteration state (reset by zero_grad_buffer()).
        self._futures: list[torch.futures.Future | None] = [None] * len(self.buckets)
        self._next_bucket = 0  # buckets [0, _next_bucket) have been launched this iteration
        self._grads_synced = False  # finish_grad_sync() ran; main grads hold averages
        self._locally_used: set[nn.Parameter] = set()  # got a gradient on this rank (any micro-step)
        self._pending_flags: tuple[torch.Tensor, dist.Work] | None = None  # see _sync_unused_params
        self._nonfinite = _NonFiniteGradCheck(
            self.buckets, self.param_to_name, self.process_group, self.dp_rank, self.dp_size
        )  # check_for_nan_in_grad (nonfinite_grads.py)
        self._sync_enabled = True  # False inside no_sync()
        self._backward_seen = False
        self.unused_params: list[nn.Parameter] = []
        """After ``finish_grad_sync()``: parameters no rank produced a gradient for this iteration
        (their ``.grad`` is None, so an optimizer leaves them, weight decay and momentum included)."""

        self._grad_is_view: set[nn.Parameter] = set()
        self._plan_grad_views()
        self._reset_grads()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        logger.info(
            "DDP: %d params in %d buffer(s), %d bucket(s) %s, world %d, overlap=%s",
            len(params),
            len(self.param_and_grad_buffers),
            len(self.buckets),
            [b.end - b.start for b in self.buckets][:8],
            self.dp_size,
            config.overlap_grad_reduce,
        )

    # --- construction helpers -------------------------------------------------------------------
    def _broadcast_from_rank0(self, module: nn.Module) -> None:
        src = dist.get_global_rank(self.process_group, 0)
        with torch.no_grad():
            for t in list(self.param_to_name) + list(module.buffers()):
                dist.broadcast(t.data, src=src, group=self.process_group)

    # --- backward-time path ---------------------------------------------------------------------
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        """Post-accumulate-grad hook: move ``param.grad`` into ``main_grad``, maybe launch buckets."""
        grad = param.grad
        if grad is None:
            return
        self._backward_seen = True
        if self._grads_synced:
            name = self.param_to_name[param]
            raise RuntimeError(
                f"gradient of '{name}' arrived after finish_grad_sync(): call ddp.zero_grad_buffer() "
                "after optimizer.step() and before the next backward"
            )
        bucket = self._param_to_bucket[param]
        if self._futures[bucket.index] is not None:
            name = self.param_to_name[param]
            raise RuntimeError(
                f"gradient of '{name}' arrived after its bucket {bucket.index} was already launched this "
                "iteration (a second backward outside no_sync()?). Wrap all but the last micro-step "
                "in ddp.no_sync()."
            )
        main_grad = param.main_grad
        if grad is not main_grad and grad.data_ptr() != main_grad.data_ptr():
            # A fresh .grad: the first gradient of this iteration (``.grad`` is None after
            # zero_grad_buffer()), or grad dtype != param dtype, or the user set .grad to None. The
            # first one overwrites main_grad (which holds last iteration's values: no memset needed),
            # later ones add; the fresh tensor is freed. Otherwise AccumulateGrad already added in
            # place into main_grad (the view we made .grad), as torch DDP's gradient_as_bucket_view.
            # (detach: under backward(create_graph=True) the fresh .grad carries a graph)
            if param not in self._locally_used:
                main_grad.copy_(grad.detach())
            elif grad.requires_grad and param in self._grad_is_view:
                # create_graph=True: AccumulateGrad built .grad = view + new out of place, so the
                # fresh tensor already holds what main_grad accumulated.
                main_grad.copy_(grad.detach())
            else:
                main_grad.add_(grad.detach())  # fp32 main_grad += bf16 grad upcasts exactly
            param.grad = main_grad if param in self._grad_is_view else None
        self._locally_used.add(param)
        if not self._sync_enabled:
            return
        bucket.params_ready.add(param)
        if self.config.overlap_grad_reduce and len(bucket.params_ready) == len(bucket.params):
            # Launch the longest complete prefix from _next_bucket on (ordering invariant).
            while self._next_bucket < len(self.buckets):
                nxt = self.buckets[self._next_bucket]
                if len(nxt.params_ready) != len(nxt.params):
                    break
                self._launch(nxt)

    def _launch(self, bucket: _Bucket) -> None:
        """Start the collective of ``bucket``. Precondition: bucket.index == self._next_bucket."""
        assert bucket.index == self._next_bucket, "collectives must be issued in bucket order"
        gb = self._grad_buckets[bucket.index]
        gb._reset()
        if bucket is self.buckets[-1] and self._flags_ride_along:
            # The last bucket is launched once this rank's usage is final: every bucket before it is
            # complete, or we are in finish_grad_sync() (a bucket with an unused parameter never
            # completes during backward, so it holds the prefix back until then).
            if len(self._locally_used) == len(self._params):
                self._flags_slot.fill_(1)
            else:
                used = [p in self._locally_used for p in self._params]
                self._flags_slot.copy_(torch.tensor(used, dtype=self._flags_slot.dtype))
        gb._all_used = all(p in self._locally_used for p in bucket.params)
        if not gb._all_used:
            for p in bucket.params:  # no gradient here this iteration: its slot still holds the last one
                if p not in self._locally_used:
                    p.main_grad.zero_()
        if self.config.check_for_nan_in_grad:
            # A device tensor, read once in finish_grad_sync(): no host sync inside backward.
            self._nonfinite.record_launch(bucket)
        if self._sets_grad and bucket.grad_data.dtype == bucket.param_data.dtype:
            # Same dtype: .grad becomes the main_grad view now, so a hook's fut.then() callback (e.g.
            # an optimizer step per bucket) already sees the in-place reduced gradient in p.grad.
            for p in bucket.params:
                p.grad = p.main_grad
        if self._comm_hook is not None:
            fut = self._comm_hook(self._comm_hook_state, gb)
        elif self.config.use_distributed_optimizer:
            fut = reduce_scatter_hook(self._default_state, gb)
        else:
            fut = _allreduce_future(self._default_state, gb)  # allreduce_hook minus its .then()
        if not isinstance(fut, torch._C.Future):  # torch.futures.Future and .then() results
            raise TypeError(
                f"comm hook returned {type(fut).__name__} for bucket {bucket.index}, not a Future"
            )
        self._futures[bucket.index] = fut
        self._next_bucket += 1

    def _plan_grad_views(self) -> None:
        """Which parameters' ``.grad`` becomes the ``main_grad`` view once their gradient arrived: all
        whose grad dtype is the param dtype, unless only shards are valid (reduce-scatter, no hook)."""
        self._grad_is_view = {
            p
            for b in self.buckets
            if self._sets_grad and b.grad_data.dtype == b.param_data.dtype
            for p in b.params
        }

    def _reset_grads(self) -> None:
        """Start an iteration: every ``.grad`` None (torch's ``zero_grad(set_to_none=True)``), so the
        first gradient of each parameter arrives as a fresh tensor that the hook copies into
        ``main_grad``: no memset of the grad buffer per step. Where dtypes allow, the hook then makes
        ``.grad`` the ``main_grad`` view, so further micro-steps accumulate straight into the buffer."""
        for p in self._params:
            p.grad = None

    @property
    def _sets_grad(self) -> bool:
        # With the default reduce-scatter only a shard is valid, so .grad would be misleading.
        return not (self.config.use_distributed_optimizer and self._comm_hook is None)

    # --- public API ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate into main grads without any communication."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def start_grad_sync(self) -> None:
        """Launch every bucket not launched yet, in index order (idempotent within an iteration)."""
        while self._next_bucket < len(self.buckets):
            self._launch(self.buckets[self._next_bucket])

    def finish_grad_sync(self, *, allow_nonfinite: bool = False) -> None:
        """Wait for all bucket collectives; afterwards every ``param.grad`` holds the averaged gradient.

        For same-dtype grads ``param.grad`` is a view into the grad buffer; for bf16/fp16 params with
        fp32 grads it is a copy in the param dtype (``param.main_grad`` keeps the fp32 value), or None
        with ``config.param_grad_copies=False`` (the optimizer reads ``main_grad``). A
        parameter that got no gradient on any rank this iteration gets ``param.grad = None`` (listed in
        ``unused_params``), so the optimizer does not move it. With ``use_distributed_optimizer``
        (default hook) only each bucket's local shard of ``main_grad`` is valid and ``param.grad`` is
        left unset. Calling it twice in one iteration is a no-op.

        ``check_for_nan_in_grad`` checks once, here, after every collective completed (one host sync),
        and raises RuntimeError naming the rank and parameters. ``allow_nonfinite=True`` skips that
        check: pass it when a dynamic loss scaler inspects the gradients next and skips the step on an
        overflow, which is then routine and not an error.
        """
        if self._grads_synced:
            return
        self.start_grad_sync()
        for bucket, fut in zip(self.buckets, self._futures, strict=True):
            value = fut.wait()
            if isinstance(value, list) and len(value) == 1:
                value = value[0]  # a collective's own Future (``work.get_future()``) holds [tensor]
            if not isinstance(value, torch.Tensor) or value.numel() != bucket.grad_data.numel():
                raise RuntimeError(
                    f"comm hook Future for bucket {bucket.index} must hold a tensor of "
                    f"{bucket.grad_data.numel()} elements, got {getattr(value, 'shape', type(value))}"
                )
            if value.data_ptr() != bucket.grad_data.data_ptr():
                bucket.grad_data.copy_(value)
        # After every bucket has COMPLETED (not merely launched): the same position on every rank even
        # for a hook that issues collectives from Future callbacks (torch's powerSGD_hook does).
        self.unused_params = self._sync_unused_params()
        self._grads_synced = True
        if self.config.check_for_nan_in_grad and not allow_nonfinite:
            self._nonfinite.raise_if_nonfinite(
                sharded=self.config.use_distributed_optimizer and self._comm_hook is None
            )
        if self._sets_grad:
            unused = set(self.unused_params)
            for bucket in self.buckets:
                for p in bucket.params:
                    if p in unused:
                        p.grad = None
                    elif p.main_grad.dtype == p.dtype:
                        p.grad = p.main_grad
                    else:  # config.param_grad_copies=False: the optimizer reads main_grad itself
                        p.grad = p.main_grad.to(p.dtype) if self.config.param_grad_copies else None
        after_grad_sync = getattr(self._comm_hook_state, "after_grad_sync", None)
        if after_grad_sync is not None:
            after_grad_sync()  # e.g. the overlapped optimizer's deferred steps (bucket.py)

    @property
    def _flags_ride_along(self) -> bool:
        """The used-parameter flags travel in the last bucket's padding: only through our own all-reduce
        (a hook may transform or not reduce padding; a reduce-scatter leaves it on one rank only)."""
        return self._comm_hook is None and not self.config.use_distributed_optimizer

    def _sync_unused_params(self) -> list[nn.Parameter]:
        """The parameters that got no gradient on ANY rank this iteration (all buckets are complete).

        Default path: the flags came with the last bucket's all-reduce. With a comm hook or
        reduce-scatter: one all-reduce (MAX) of a byte per parameter, after every bucket COMPLETED,
        so it has the same place on every rank even for hooks that issue collectives from Future
        callbacks (torch's powerSGD_hook does). Either way, when every parameter got a gradient here
        nothing is unused anywhere, and the flags are not read (no host sync).
        """
        all_used_here = len(self._locally_used) == len(self._params)
        if self._flags_ride_along:
            if all_used_here:
                self._flags_slot.zero_()  # padding is zero between iterations
                return []
            flags = self._flags_slot.tolist()
            self._flags_slot.zero_()
            return [p for p, f in zip(self._params, flags, strict=True) if f == 0]
        device = self.buckets[0].grad_data.device
        flags = torch.tensor(
            [p in self._locally_used for p in self._params], dtype=torch.uint8, device=device
        )
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group, async_op=True)
        if all_used_here:
            self._pending_flags = (flags, work)  # keeps the tensor alive; waited in zero_grad_buffer()
            return []
        work.wait()
        return [p for p, used in zip(self._params, flags.tolist(), strict=True) if not used]

    def zero_grad_buffer(self) -> None:
        """End the iteration: forget its gradients and reset per-iteration bucket state.

        Afterwards every ``param.grad`` is None, as after torch's ``optimizer.zero_grad()``. The grad
        buffer is not memset: each parameter's first gradient of the next iteration overwrites its
        ``main_grad`` (a parameter that gets none has its slot zeroed before its bucket is reduced),
        so ``main_grad`` is meaningful only after ``finish_grad_sync()``.
        """
        for fut in self._futures:
            if fut is not None and not fut.done():
                fut.wait()  # never zero a buffer a collective may still write into
        if self._pending_flags is not None:
            self._pending_flags[1].wait()
            self._pending_flags = None
        for buf in self.param_and_grad_buffers:
            buf.reset()  # main grads are overwritten by the next backward: not zeroed here
        self._reset_grads()
        self._futures = [None] * len(self.buckets)
        self._next_bucket = 0
        self._grads_synced = False
        self._locally_used = set()
        self._nonfinite.reset()
        self.unused_params = []

    def register_comm_hook(self, state: object, hook: CommHook) -> None:
        """Replace the per-bucket collective by ``hook(state, bucket) -> Future[Tensor]`` (see bucket.py)."""
        if not callable(hook):
            raise TypeError(f"comm hook must be callable, got {type(hook).__name__}")
        if self._comm_hook is not None:
            raise RuntimeError("register_comm_hook may only be called once")
        if self._backward_seen:
            raise RuntimeError("register_comm_hook must be called before the first backward")
        self._comm_hook, self._comm_hook_state = hook, state
        self._plan_grad_views()  # a hook makes the whole buffer valid even with the distributed optimizer

    def bucket_layout(self) -> list[list]:
        """``[[padded numel, [param names]], ...]`` in bucket-index order: what per-bucket hook state
        (PowerSGD memories, per-bucket optimizers) is keyed by; plain lists, so checkpoints can hold it."""
        return [[b.end - b.start, [self.param_to_name[p] for p in b.params]] for b in self.buckets]

    @property
    def comm_bytes(self) -> int:
        """Payload bytes this rank handed to gradient collectives since ``reset_comm_stats()``."""
        return self._comm_bytes

    def reset_comm_stats(self) -> None:
        self._comm_bytes = 0

    def _record_comm_bytes(self, n: int) -> None:
        self._comm_bytes += n

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict: keys carry NO ``module.`` prefix."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load into the wrapped module in place (parameters stay views into the buffers)."""
        if assign:
            raise ValueError("assign=True would detach parameters from the DDP buffers; load in place")
        return self.module.load_state_dict(state_dict, strict=strict)
