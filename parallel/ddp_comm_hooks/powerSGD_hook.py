"""PowerSGD low-rank gradient compression as a z2all comm hook (Vogels et al. 2019, arXiv:1905.13727).

Design page with the data-flow sketch and a bytes table: ``docs/powersgd.md``.

Per bucket, each gradient matrix M (n x m; a k-D gradient is viewed as shape[0] x rest) is replaced by
a rank-r approximation P Q^T that all ranks agree on, and only P (n x r) and Q (m x r) travel:

    M += error                       error feedback: what earlier rounds failed to transmit
    P  = M Q                         Q: last round's Q (warm start) or seeded Gaussian, orthogonalised
    all-reduce(P)  -> orthogonalise(P)
    Q  = M^T P
    all-reduce(Q)  -> Q /= world_size
    M  = P Q^T                       the same on every rank: the averaged low-rank gradient
    error = M_local_before - M       kept for the next round

Matrices too small to be worth it (``(n + m) r * min_compression_rate >= n m``) are concatenated and
all-reduced uncompressed; with the default rate (2) that includes every 1-D gradient (an n x 1 matrix
is compressed only when ``min_compression_rate < n / (n + 1)``). Before ``start_powerSGD_iter`` the
whole bucket is all-reduced plainly (the early phase of training is the most sensitive to gradient noise).

The result equals ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.powerSGD_hook`` on the
same inputs and options (tested bit-for-bit in ``tests/parallel/test_powersgd.py``, 1-D gradients
compressed as n x 1 matrices included).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallel.ddp_comm_hooks.stream_wrapper import run_hook_on_side_stream

logger = logging.getLogger(__name__)

__all__ = ["PowerSGDConfig", "PowerSGDState", "powerSGD_hook"]


@dataclass
class PowerSGDConfig:
    """Hyper-parameters of PowerSGD; the names and defaults are torch's ``PowerSGDState`` arguments."""

    matrix_approximation_rank: int = 1
    """r: rank of P Q^T. Bytes per compressed n x m matrix are (n + m) r instead of n m. Try 1, 2, 4, 8."""
    start_powerSGD_iter: int = 1_000
    """Plain all-reduce for a bucket's first this-many calls, PowerSGD afterwards (about 10% of steps)."""
    min_compression_rate: float = 2.0
    """Compress a matrix only if n m > (n + m) r * this; others travel uncompressed, concatenated. A 1-D
    gradient of n is an n x 1 matrix (r = 1): compressed only if this < n / (n + 1), as in torch."""
    use_error_feedback: bool = True
    """Add the previous round's compression error to the gradient before compressing (needed to converge)."""
    warm_start: bool = True
    """Start each round's power iteration from the last round's Q instead of a fresh random Q."""
    orthogonalization_epsilon: float = 0.0
    """Added to column norms in Gram-Schmidt (ranks <= 2, half precision) so an all-zero column gives 0,
    not NaN. 0 is exact; set e.g. 1e-8 when a whole gradient matrix can be zero. QR (rank > 2) ignores it."""
    random_seed: int = 0
    """Seed of the initial Q; identical on every rank, so all ranks start the power iteration alike."""
    batch_tensors_with_same_shape: bool = False
    """Stack same-shaped matrices of a bucket into one batched matmul (fewer, larger kernels; one copy)."""
    use_side_stream: bool = True
    """On CUDA, run the hook's work on a side stream (``stream_wrapper``). Ignored on CPU."""

    def __post_init__(self) -> None:
        if self.matrix_approximation_rank < 1:
            raise ValueError(f"matrix_approximation_rank must be >= 1, got {self.matrix_approximation_rank}")
        if self.start_powerSGD_iter < 0:
            raise ValueError(f"start_powerSGD_iter must be >= 0, got {self.start_powerSGD_iter}")
        if self.min_compression_rate <= 0:
            raise ValueError(f"min_compression_rate must be > 0, got {self.min_compression_rate}")
        if self.orthogonalization_epsilon < 0:
            raise ValueError(f"orthogonalization_epsilon must be >= 0, got {self.orthogonalization_epsilon}")


@dataclass
class _Group:
    """Matrices of one bucket that share a shape, compressed together (one batch, or one each)."""

    shape: tuple[int, int]  # (n, m): each gradient viewed as shape[0] x rest
    rank: int  # r = min(n, m, matrix_approximation_rank)
    grad_indices: list[int]  # positions in bucket.gradients(), in bucket order


@dataclass
class _BucketPlan:
    """Which gradients of a bucket are compressed and where their P and Q live; a pure function of shapes.

    P memory holds, group after group (groups in order of first appearance of their shape), a
    (batch, n, r) block; Q memory the matching (batch, m, r) blocks. This is torch's layout, so the
    state dicts of both implementations can be compared entry by entry.
    """

    shapes: list[torch.Size]
    uncompressed: list[int] = field(default_factory=list)
    groups: list[_Group] = field(default_factory=list)
    p_numel: int = 0
    q_numel: int = 0
    numel_before: int = 0  # elements of all gradients
    numel_after: int = 0  # elements sent when compressing: P + Q + uncompressed


def _make_plan(grads: list[torch.Tensor], cfg: PowerSGDConfig) -> _BucketPlan:
    plan = _BucketPlan(shapes=[g.shape for g in grads])
    by_shape: dict[tuple[int, int], _Group] = {}
    for i, g in enumerate(grads):
        plan.numel_before += g.numel()
        if g.dim() == 0:  # a scalar is no matrix (torch's hook would fail on shape[0])
            plan.uncompressed.append(i)
            plan.numel_after += g.numel()
            continue
        # shape[0] x rest, as torch: a 1-D gradient of n is an n x 1 matrix, compressed (at r = 1)
        # only when min_compression_rate < n / (n + 1).
        n, m = g.shape[0], g.numel() // g.shape[0]
        r = min(n, m, cfg.matrix_approximation_rank)
        if (n + m) * r * cfg.min_compression_rate >= n * m:
            plan.uncompressed.append(i)
            plan.numel_after += g.numel()
            continue
        if (n, m) not in by_shape:
            by_shape[(n, m)] = _Group(shape=(n, m), rank=r, grad_indices=[])
        by_shape[(n, m)].grad_indices.append(i)
        plan.p_numel += n * r
        plan.q_numel += m * r
        plan.numel_after += (n + m) * r
    plan.groups = list(by_shape.values())
    return plan


class PowerSGDState:
    """Configuration plus per-bucket memory of PowerSGD: pass as ``state`` to ``register_comm_hook``.

    Memory per bucket index (the same dicts torch's ``PowerSGDState`` keeps):
    ``error_dict[i]``: (bucket numel,) local compression error, fed back next round;
    ``p_memory_dict[i]`` / ``q_memory_dict[i]``: flat P and Q of all compressed matrices (warm start).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, config: PowerSGDConfig | None = None):
        self.process_group = process_group
        self.config = config if config is not None else PowerSGDConfig()
        self.error_dict: dict[int, torch.Tensor] = {}
        self.p_memory_dict: dict[int, torch.Tensor] = {}
        self.q_memory_dict: dict[int, torch.Tensor] = {}
        self.iter = 0  # finished iterations: incremented when the last bucket (highest index) is hooked
        # A bucket compresses once it has been hooked start_powerSGD_iter times. Counting per bucket
        # (not via `iter`) keeps the switch-over correct whatever order buckets are launched in.
        self._bucket_calls: dict[int, int] = defaultdict(int)
        self._plans: dict[int, _BucketPlan] = {}
        # Seeds of fresh Qs come from numpy's RandomState(random_seed), as in torch's hook, so both
        # draw the same Gaussians. Its state is a pure function of (random_seed, draws): that is
        # what state_dict() saves, so a resumed run draws the same seeds.
        self._rng = np.random.RandomState(self.config.random_seed)
        self._seed_draws = 0
        self._announced_start = False
        logger.info("PowerSGD config: %s", asdict(self.config))

    def _next_seed(self) -> int:
        self._seed_draws += 1
        return int(self._rng.randint(1_000_000_000))

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (``torch.load(weights_only=True)`` safe); the process group is not saved."""
        return {
            "config": asdict(self.config),
            "iter": self.iter,
            "seed_draws": self._seed_draws,
            "bucket_calls": dict(self._bucket_calls),
            "error_dict": dict(self.error_dict),
            "p_memory_dict": dict(self.p_memory_dict),
            "q_memory_dict": dict(self.q_memory_dict),
        }

    def continue_from(self, iteration: int) -> None:
        """Resume without saved memories (another world size or bucket layout): every bucket counts as
        hooked ``iteration`` times, so compression resumes where it was instead of warming up again.
        Error feedback and P/Q memories start empty; the seed stream starts over."""
        self.iter = int(iteration)
        self._bucket_calls = defaultdict(lambda: int(iteration))

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        saved = PowerSGDConfig(**sd["config"])
        if asdict(saved) != asdict(self.config):
            raise ValueError(
                f"PowerSGD state was saved with config {asdict(saved)}, this run has {asdict(self.config)}"
            )
        self.iter = int(sd["iter"])
        self._rng = np.random.RandomState(self.config.random_seed)
        self._seed_draws = 0
        for _ in range(int(sd["seed_draws"])):
            self._next_seed()
        self._bucket_calls = defaultdict(int, {int(k): int(v) for k, v in sd["bucket_calls"].items()})
        self.error_dict = {int(k): v for k, v in sd["error_dict"].items()}
        self.p_memory_dict = {int(k): v for k, v in sd["p_memory_dict"].items()}
        self.q_memory_dict = {int(k): v for k, v in sd["q_memory_dict"].items()}

    def _plan_for(self, index: int, grads: list[torch.Tensor]) -> _BucketPlan:
        plan = self._plans.get(index)
        if plan is None:
            plan = self._plans[index] = _make_plan(grads, self.config)
            logger.info(
                "PowerSGD bucket %d: %d matrices compressed in %d shape groups, %d tensors uncompressed, "
                "%d -> %d elements per round",
                index,
                sum(len(g.grad_indices) for g in plan.groups),
                len(plan.groups),
                len(plan.uncompressed),
                plan.numel_before,
                plan.numel_after,
            )
        elif plan.shapes != [g.shape for g in grads]:
            raise ValueError(f"PowerSGD: bucket {index} changed its gradient shapes since the first call")
        return plan


def _orthogonalize(matrices: torch.Tensor, epsilon: float) -> None:
    """Make the columns of each (n, r) matrix in the batch (B, n, r) orthonormal, in place.

    Gram-Schmidt for r <= 2 and half precision (cheap, and QR has no fp16/bf16 kernel), Householder QR
    otherwise; the same split as torch's hook, so both give the same numbers.
    """
    rank = matrices.shape[2]
    if rank <= 2 or matrices.dtype in (torch.float16, torch.bfloat16):
        for i in range(rank):
            col = matrices[:, :, i : i + 1]  # (B, n, 1)
            col /= torch.linalg.vector_norm(col, dim=1, keepdim=True) + epsilon
            if i + 1 < rank:
                rest = matrices[:, :, i + 1 :]  # (B, n, r - i - 1): remove its component along `col`
                rest -= torch.sum(col * rest, dim=1, keepdim=True) * col
    else:
        q, _ = torch.linalg.qr(matrices)  # reduced QR: q is (B, n, r)
        matrices.copy_(q)


def _allreduce_average(group: dist.ProcessGroup, bucket: Any) -> torch.futures.Future:
    """Averaged all-reduce of the whole bucket, pre-divided (gloo has no AVG), as torch's allreduce_hook."""
    buffer = bucket.buffer()
    bucket.record_comm_bytes(buffer.numel() * buffer.element_size())
    buffer.div_(dist.get_world_size(group))
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda f: f.value()[0])


def _done_future(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result([value])
    return fut


def _powerSGD_round(state: PowerSGDState, bucket: Any) -> torch.futures.Future:
    """One call of the hook for one bucket (on whatever stream is current). See the module docstring.

    Every collective is issued from this calling thread, in the fixed order uncompressed -> P -> Q,
    never from a Future callback: with several buckets in flight, callbacks run on collective threads
    in racy order, and ranks that issued collectives in different orders would deadlock or mix data.
    """
    cfg = state.config
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    index = bucket.index()
    calls = state._bucket_calls[index]
    state._bucket_calls[index] = calls + 1
    if bucket.is_last():
        state.iter += 1
    if calls < cfg.start_powerSGD_iter:
        return _allreduce_average(group, bucket)
    if not state._announced_start:
        state._announced_start = True
        logger.info("PowerSGD compression starts (bucket %d, call %d)", index, calls)

    buffer = bucket.buffer()  # (N,) flat gradients incl. zero padding
    grads = bucket.gradients()  # views into `buffer`
    plan = state._plan_for(index, grads)

    local = None
    if cfg.use_error_feedback:
        if index in state.error_dict:
            buffer.add_(state.error_dict[index])
        else:
            state.error_dict[index] = torch.zeros_like(buffer)
        local = buffer.clone()  # M + error before compression: the error is measured against this
    old_error = state.error_dict.get(index)  # kept if this round turns out non-finite

    # --- uncompressed tensors: one contiguous message -------------------------------------------
    uncompressed = [grads[i] for i in plan.uncompressed]
    unc_flat = torch.cat([t.reshape(-1) for t in uncompressed]) if uncompressed else buffer.new_empty(0)

    # --- P and Q memory (flat, per bucket) and their per-group views ----------------------------
    fresh_q = not cfg.warm_start or index not in state.p_memory_dict
    if fresh_q:
        state.p_memory_dict[index] = buffer.new_empty(plan.p_numel)
        state.q_memory_dict[index] = buffer.new_empty(plan.q_numel)
    p_mem, q_mem = state.p_memory_dict[index], state.q_memory_dict[index]
    mats, ps, qs, stacked = [], [], [], []
    p_off = q_off = 0
    for grp in plan.groups:
        n, m = grp.shape
        views = [grads[i].view(n, m) for i in grp.grad_indices]  # (n, m) views into `buffer`
        if cfg.batch_tensors_with_same_shape and len(views) > 1:
            mats.append(torch.stack(views))  # (B, n, m): a copy, written back after decompression
            stacked.append(True)
        else:
            mats.extend(v.unsqueeze(0) for v in views)  # (1, n, m) views: decompression writes in place
            stacked.extend([False] * len(views))
        for batch in [len(views)] if stacked[-1] else [1] * len(views):
            ps.append(p_mem[p_off : p_off + batch * n * grp.rank].view(batch, n, grp.rank))
            qs.append(q_mem[q_off : q_off + batch * m * grp.rank].view(batch, m, grp.rank))
            p_off += batch * n * grp.rank
            q_off += batch * m * grp.rank

    if fresh_q:
        gen = torch.Generator(device="cpu").manual_seed(state._next_seed())
        for q in qs:
            q.copy_(torch.randn(q.shape, generator=gen, dtype=q.dtype))  # drawn on CPU: same on all devices
    # What the memories hold before this round touches them: restored if the round is non-finite.
    p_before, q_before = p_mem.clone(), q_mem.clone()
    for q in qs:
        _orthogonalize(q, cfg.orthogonalization_epsilon)
    for mat, q, p in zip(mats, qs, ps):
        torch.bmm(mat, q, out=p)  # P = M Q: (B, n, m) @ (B, m, r) -> (B, n, r)

    bucket.record_comm_bytes((unc_flat.numel() + plan.p_numel + plan.q_numel) * buffer.element_size())
    unc_fut = (
        dist.all_reduce(unc_flat, group=group, async_op=True).get_future()
        if unc_flat.numel()
        else _done_future(unc_flat)
    )
    if plan.p_numel:
        # Q = M^T P needs the all-reduced P, so this one collective is waited for here.
        dist.all_reduce(p_mem, group=group, async_op=True).wait()
        for p in ps:
            _orthogonalize(p, cfg.orthogonalization_epsilon)
        for mat, p, q in zip(mats, ps, qs):
            torch.bmm(mat.transpose(1, 2), p, out=q)  # Q = M^T P: (B, m, n) @ (B, n, r) -> (B, m, r)
        q_fut = dist.all_reduce(q_mem, group=group, async_op=True).get_future()
    else:
        q_fut = _done_future(q_mem)

    # Decompression is queued on the stream current now (the side stream under stream_wrapper). The
    # result Future is CUDA-aware: set_result records an event on that stream, and whoever waits on
    # the Future (finish_grad_sync, stream_wrapper) makes its own stream wait for the event.
    device = buffer.device
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    result: torch.futures.Future = torch.futures.Future(devices=[device] if stream is not None else None)

    def _decompress() -> torch.Tensor:
        # wait() on each collective's own (CUDA-aware, on NCCL) Future makes THIS stream wait for
        # the collective; collect_all's Future carries no devices, so its completion alone does not.
        unc_fut.wait()
        q_fut.wait()
        # Both collectives are complete: unc_flat and q_mem hold sums over ranks; p_mem is orthonormal.
        # Every rank sees the same sums, so `finite` (a device flag: no host sync) is the same on all.
        finite = torch.isfinite(unc_flat).all() & torch.isfinite(q_mem).all() & torch.isfinite(p_mem).all()
        unc_flat.div_(world_size)
        off = 0
        for t in uncompressed:
            t.copy_(unc_flat[off : off + t.numel()].view_as(t))
            off += t.numel()
        q_mem.div_(world_size)
        for p, q, mat in zip(ps, qs, mats):
            torch.bmm(p, q.transpose(1, 2), out=mat)  # M = P Q^T: (B, n, r) @ (B, r, m) -> (B, n, m)
        k = 0
        for grp in plan.groups:  # copy stacked batches back into the bucket's gradient views
            n, m = grp.shape
            if stacked[k]:
                for j, i in enumerate(grp.grad_indices):
                    grads[i].view(n, m).copy_(mats[k][j])
                k += 1
            else:
                k += len(grp.grad_indices)
        # A non-finite round (an Inf/NaN gradient on any rank, routine with fp16 loss scaling) leaves
        # error feedback and P/Q memories as they were, so the next round is finite again, and hands
        # back a result that is surely non-finite so the loss scaler skips the step.
        if local is not None:
            state.error_dict[index] = torch.where(finite, local - buffer, old_error)
        p_mem.copy_(torch.where(finite, p_mem, p_before))
        q_mem.copy_(torch.where(finite, q_mem, q_before))
        buffer[:1].add_(torch.where(finite, 0.0, float("nan")).to(buffer.dtype))
        if not cfg.warm_start:
            state.p_memory_dict.pop(index, None)
            state.q_memory_dict.pop(index, None)
        return buffer

    def _run(_: torch.futures.Future) -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                result.set_result(_decompress())
        except Exception as exc:  # handed to whoever waits on `result`
            result.set_exception(exc)

    torch.futures.collect_all([unc_fut, q_fut]).add_done_callback(_run)
    return result


def powerSGD_hook(state: PowerSGDState, bucket: Any) -> torch.futures.Future:
    """Comm hook: average ``bucket`` over the group with PowerSGD; the Future's value is ``bucket.buffer()``.

    ``ddp.register_comm_hook(PowerSGDState(None, PowerSGDConfig(matrix_approximation_rank=4)),
    powerSGD_hook)``
    """
    if state.config.use_side_stream:
        return run_hook_on_side_stream(_powerSGD_round, state, bucket)
    return _powerSGD_round(state, bucket)
