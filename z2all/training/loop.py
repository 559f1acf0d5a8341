"""The training loop shared by pretrain, SFT and DPO: :class:`Trainer` runs what the builder built.

The loop builds nothing (z2all.training.build does, before it) and knows no component's private
state: a checkpoint is ``CheckpointManager.save(step, TrainState)`` of the components it was given.

One optimizer step ``s`` (0-based; ``step`` in metrics.jsonl is ``s + 1``, the count of completed
steps) consumes the G = ``gradient_accumulation_steps`` global micro-batches ``s*G .. s*G+G-1``;
rank ``r`` of ``W`` runs the ones with ``j % W == r`` (G/W each). Which samples a micro-batch holds
is a pure function of (seed, j) (:class:`z2all.data.sampler.GlobalBatchSampler`), so the data
position is just the step: a resumed run and a run on another world size see the same samples.

Loss normalisation (why 1 rank == W ranks): micro-batch ``j`` has loss ``l_j`` (mean over its own
trainable tokens or pairs, see tasks.py). Each rank back-propagates ``l_j / (G/W)``; data parallelism
then averages gradients over the W ranks, giving ``(1/W) * sum_r sum_{j in r} grad l_j * W/G =
(1/G) * sum_j grad l_j``: the gradient of the step loss ``L = mean_j l_j`` for every W. The logged
``loss`` is that same ``L``, all-reduced over ranks.

The optimizer is a wrapper of optimizer/ (``FP32Optimizer``, or ``Float16OptimizerWithFloat16Params``
with 16-bit weights): it reads the DDP's averaged gradients, owns the fp16 loss scaler (``scale_loss``
before backward; an overflow anywhere skips the step on every rank, ``skipped: true`` in metrics),
clips by the global norm and steps.

A step whose loss or gradient norm is NaN/Inf is never applied, and more than
``--max_nonfinite_steps`` of them in a row raise :class:`NonFiniteStepError`. The decision is taken
from all-reduced numbers, so every rank skips, continues or raises at the same step and none is left
waiting in a collective (docs/training.md, "Non-finite steps").

Everything a run writes is described in docs/training.md. Bit-exact resume rests on four things:
the data position (= step, :class:`~z2all.training.state.TrainProgress`), the optimizer state, every
RNG stream (restored by the checkpoint) and an evaluation that does not draw from the training RNG
streams (it runs under ``torch.random.fork_rng`` and touches no Python/NumPy randomness).
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optimizer import LossScaleUnderflowError, MainParams, MixedPrecisionOptimizer
from parallel import NonFiniteGradError
from z2all.data.sampler import GlobalBatchSampler
from z2all.model import estimate_mfu, peak_flops_for
from z2all.training.checkpoint import CheckpointManager
from z2all.training.checkpoint_format import list_checkpoints
from z2all.training.collectives import all_reduce_sum_
from z2all.training.config import TrainConfig
from z2all.training.heartbeat import Heartbeat
from z2all.training.lr_schedule import CosineSchedule, set_lr
from z2all.training.metrics import MetricsWriter, console_line, write_run_info
from z2all.training.parallelize import DataParallelModel
from z2all.training.run_info import held_bytes, run_info
from z2all.training.runtime import Runtime, set_collective_timeout
from z2all.training.state import TrainProgress, TrainState
from z2all.training.stop_signal import PreemptedStop, StopSignal

logger = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    """The loss or gradient norm was NaN/Inf in more than ``--max_nonfinite_steps`` steps in a row
    (raised on every rank at the same step; train_my_ddp.py exits with ``exit_codes.NONFINITE``)."""


@dataclass
class TrainResult:
    step: int
    """Completed optimizer steps at the end of the run."""
    tokens: int
    """Cumulative token positions processed (all ranks)."""
    history: list[dict[str, Any]]
    """The records this process produced (same on every rank: all values are all-reduced)."""


@dataclass
class TrainerParts:
    """Everything :class:`Trainer` runs, built by z2all.training.build (see there for the order)."""

    cfg: TrainConfig
    rt: Runtime
    model: nn.Module
    """The bare model (not wrapped, not compiled)."""
    run_model: nn.Module
    """What evaluation calls: the model, or its torch.compile wrapper."""
    dp: DataParallelModel
    """The data-parallel wrapper training calls; its hook may own the optimizer (``dp.steps_optimizer``)."""
    optimizer: MixedPrecisionOptimizer | None
    """The optimizer wrapper (optimizer/: it owns the fp16 loss scaler), or None when the per-bucket
    optimizers inside ``dp`` are the optimizer."""
    main_params: MainParams | None
    """The fp32 main copies of 16-bit weights (--params_dtype), or None in fp32."""
    task: Any
    train_data: Any
    val_data: Any
    ref_model: nn.Module | None
    progress: TrainProgress
    """Where the run is (restored by a resume)."""
    state: TrainState
    """What every checkpoint saves: model, optimizer, progress, scaler; RNG and ``dp`` per rank."""
    checkpoints: CheckpointManager
    run_facts: dict[str, Any]
    """What the manifest records for the resume rules (z2all.training.resume.run_facts)."""
    metrics: MetricsWriter | None
    """rank 0 only."""
    tracker: Any
    """rank 0 only (None elsewhere)."""
    model_config: Any = None
    info: dict[str, Any] | None = None
    """Extra facts for run_info.json (tokenizer fingerprint, optimizer backend...)."""


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.params_dtype != "float32":
        return contextlib.nullcontext()  # 16-bit weights: the model computes in their dtype
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


class Trainer:
    """Runs optimizer steps from ``parts.progress.step`` to ``--max_iters`` (module docstring)."""

    def __init__(self, parts: TrainerParts):
        self.p = parts
        cfg, rt = parts.cfg, parts.rt
        self.cfg, self.rank, self.world, self.device = cfg, rt.rank, rt.world, rt.device
        self.schedule = CosineSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
        self.sampler = GlobalBatchSampler(
            len(parts.train_data),
            cfg.train_batch_size,
            cfg.gradient_accumulation_steps,
            cfg.seed,
            rt.rank,
            rt.world,
        )
        # Evaluation reads the held-out split in its natural order: micro-batches 0..eval_iters-1
        # (wrapping around), dealt round-robin to ranks, so val_loss is the same for every W.
        n_val = len(parts.val_data) if parts.val_data is not None else 0
        self.val_sampler = (
            GlobalBatchSampler(n_val, min(cfg.train_batch_size, n_val), 1, cfg.seed, shuffle=False)
            if n_val
            else None
        )
        self.autocast = _autocast(cfg, rt.device)
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        self._measure_memory = True  # on this process's first step (run_info.json's bytes_per_param)
        self.heartbeat = Heartbeat(cfg.out_dir, enabled=rt.rank == 0)  # for monitor_process.py
        self.stop: StopSignal | None = None  # installed by run()
        self.held_bytes: dict[str, int] | None = None
        self._info_measured = False  # run_info.json written with held_bytes
        self._writing = False  # this rank's asynchronous save was in flight as the step began

    # ---- one step -----------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        p, cfg = self.p, self.cfg
        dp, task, opt = p.dp, p.task, p.optimizer
        lr = self.schedule.lr_at(step)
        if opt is not None:
            set_lr(opt, lr)
        dp.set_lr(lr)
        scaler_on = opt is not None and opt.grad_scaler is not None
        loss_scale = float(opt.get_loss_scale()) if scaler_on else None  # what this step's backward uses
        ids = self.sampler.step_indices(step)  # this rank's G/W micro-batches of sample indices
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        n_tokens = 0
        for i, samples in enumerate(ids):
            batch = _to_device(task.collate([p.train_data[k] for k in samples]), self.device)
            last = i == len(ids) - 1
            # Forward AND backward of every micro-step but the last run without gradient sync.
            with contextlib.nullcontext() if last else dp.no_sync():
                with self.autocast:
                    res = task.micro_loss(dp, batch, p.ref_model)
                # l_j / (G/W): see the module docstring for why this makes W ranks == 1 rank.
                micro = res.loss / len(ids)
                (opt.scale_loss(micro) if opt is not None else micro).backward()
            loss_sum += res.loss.detach().double()
            for k, v in res.stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v.double()
            n_tokens += res.n_tokens
        # A loss scaler's overflow is routine: it skips the step, --check_for_nan_in_grad does not raise.
        try:
            dp.finish_grad_sync(allow_nonfinite=scaler_on)
        except NonFiniteGradError as e:
            # --check_for_nan_in_grad raises on every rank together; it is a non-finite stop like the
            # one below, with its exit code.
            raise NonFiniteStepError(f"step {step + 1}: {e}") from e
        # invariant: dp.grad_of(param) is the all-rank average of the step gradient (scaled in fp16)

        # One all-reduce (and one host read) carries the step's sums BEFORE the optimizer step: a
        # non-finite loss is then known on every rank alike, and the step is not taken.
        keys = sorted(stat_sums)
        stop = float(self.stop is not None and self.stop.requested())  # a stop request on any rank
        # an asynchronous save that failed on any rank: every rank raises its error at this step
        save_failed = float(p.checkpoints.save_failed())
        flags = (float(n_tokens), stop, save_failed, float(self._writing))
        counts = [torch.tensor(v, dtype=torch.float64, device=self.device) for v in flags]
        packed = torch.stack([loss_sum, *counts] + [stat_sums[k] for k in keys])
        sums = all_reduce_sum_(packed).tolist()
        if sums[3] > 0:
            self._save_failed(step)
        loss_bad = not math.isfinite(sums[0])
        overflow = False
        if dp.steps_optimizer:
            # --overlap_optim_step: each bucket's optimizer already stepped inside its comm hook (no
            # clipping possible, validated in the config); the norm is of the averaged gradient.
            grad_norm = self._grad_norm()
        elif loss_bad:
            # Never applied, and not the scaler's business: the loss is computed before any scaling.
            grad_norm = opt.grad_norm() / (loss_scale or 1.0)
        else:
            # The wrapper decides on every rank alike: an fp16 overflow (one all-reduced flag) skips the
            # step and backs the scale off; a non-finite norm (bf16/fp32) skips it. Either way nothing
            # moves but the scaler.
            try:
                stepped, norm, _ = opt.step()
            except LossScaleUnderflowError as e:
                raise NonFiniteStepError(f"step {step + 1}: {e}") from e
            overflow = not stepped and norm is None
            grad_norm = math.nan if norm is None else norm
        grad_bad = not math.isfinite(grad_norm) and not overflow
        if self._measure_memory and (dp.steps_optimizer or not (overflow or loss_bad or grad_bad)):
            # the first step actually applied: its state is all alive here (run_info.json)
            self.held_bytes = held_bytes(self.p)
            self._measure_memory = False
        if opt is not None:
            opt.zero_grad()
        dp.zero_grad()

        g = cfg.gradient_accumulation_steps
        rec: dict[str, Any] = {"step": step + 1, "loss": sums[0] / g, "lr": lr, "grad_norm": grad_norm}
        if loss_scale is not None:
            rec["loss_scale"] = loss_scale
        if overflow or ((loss_bad or grad_bad) and not dp.steps_optimizer):
            rec["skipped"] = True  # not applied: a loss-scale overflow, or a non-finite loss / norm
        rec["_tokens"] = int(sums[1])
        rec["_stop"] = sums[2] > 0  # the same on every rank: the step after which all stop
        rec["_writing"] = sums[4] > 0  # a save was being written on some rank as the step began
        rec["_nonfinite"] = loss_bad or grad_bad
        rec["_overflow"] = overflow
        for i, k in enumerate(keys):
            rec[k] = sums[5 + i] / g
        return rec

    def _grad_norm(self) -> float:
        """Global L2 norm of the averaged gradients (equal on every rank after the sync)."""
        grads = [g for g in map(self.p.dp.grad_of, self.params) if g is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over ``eval_iters`` fixed global micro-batches of the held-out split, shared by ranks.

        Runs under fork_rng so the training RNG streams continue as if no evaluation happened.
        """
        if self.val_sampler is None:
            return None
        # ZeRO-1 --overlap_param_gather: a rank with no evaluation batch (eval_iters < world) runs no
        # forward to wait in, so every rank completes the weights' all-gathers first
        self._finish_param_sync()
        p = self.p
        model = p.run_model
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for j in range(self.rank, self.cfg.eval_iters, self.world):
                samples = self.val_sampler.global_micro_batch(j)
                batch = _to_device(p.task.collate([p.val_data[k] for k in samples]), self.device)
                with self.autocast:
                    total += p.task.micro_loss(model, batch, p.ref_model).loss.double()
        model.train(was_training)
        return float(all_reduce_sum_(total)) / self.cfg.eval_iters

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Steps from the restored position to ``--max_iters``; closes the tracker at the end (also
        after a non-finite stop: its last records are the diagnosis)."""
        self.stop = StopSignal(self.cfg.exit_after_minutes)  # SIGTERM/SIGINT: stop with a checkpoint
        failed = True
        try:
            result = self._run()
            failed = False
            return result
        finally:
            try:
                # an asynchronous save still in flight (the run stopped with an error) completes: it
                # holds a good state (its checks passed); the stop handlers still take a SIGTERM
                self.p.checkpoints.close()
            except Exception as e:  # noqa: BLE001 - the error that stopped the run comes first
                if not failed:
                    raise
                logger.error("the checkpoint in flight could not be written either: %s", e)
            finally:
                self.stop.restore()
                if self.p.tracker is not None:
                    self.p.tracker.close()

    def _save_failed(self, step: int) -> None:
        """Every rank, at the same step: an asynchronous save failed on some rank; raise its error."""
        self.p.checkpoints.wait()  # this rank's write ended too (its outcome was agreed): raises it
        raise RuntimeError(
            f"step {step + 1}: rank {self.rank}: an asynchronous checkpoint failed on another rank "
            "(see its error)"
        )

    def _run(self) -> TrainResult:
        p, cfg, rank, device = self.p, self.cfg, self.rank, self.device
        start_step, tokens = p.progress.step, p.progress.tokens
        history: list[dict[str, Any]] = []
        p.model.train()
        if p.ref_model is not None:
            p.ref_model.eval()
        if start_step >= cfg.max_iters:
            logger.info("nothing to do: checkpoint step %d >= --max_iters=%d", start_step, cfg.max_iters)
        if cfg.async_save and start_step < cfg.max_iters:
            # the snapshot's host buffers are allocated now (start-up), not by the first save
            p.checkpoints.warm_up_async(p.state)
        step_seconds = 0.0
        nonfinite_streak = 0  # consecutive non-finite steps (each skipped, not applied)
        overflow_streak = 0  # consecutive fp16 loss-scale overflows (each skipped)
        for step in range(start_step, cfg.max_iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self._writing = p.checkpoints.saving()  # an asynchronous save drains beside this step
            t0 = time.perf_counter()
            rec = self.train_step(step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step_seconds = dt if step == start_step else 0.9 * step_seconds + 0.1 * dt
            step_tokens = rec.pop("_tokens")
            tokens += step_tokens
            rec["tokens"] = tokens
            rec["tokens_per_s"] = step_tokens / dt if dt > 0 else 0.0
            rec["mfu"] = self._mfu(rec["tokens_per_s"])
            rec["comm_bytes"] = p.dp.pop_comm_bytes()
            if rec.pop("_writing"):
                rec["ckpt_writing"] = True
            done = step + 1
            last = done == cfg.max_iters
            stop_now = rec.pop("_stop")
            if step == start_step:
                set_collective_timeout(cfg.dist_timeout)  # start-up is over: --dist_init_timeout no more
            nonfinite_streak = nonfinite_streak + 1 if rec.pop("_nonfinite") else 0
            overflow_streak = overflow_streak + 1 if rec.pop("_overflow") else 0
            if overflow_streak > cfg.max_skipped_steps:
                history.append(rec)
                if rank == 0:
                    p.metrics.write(rec)
                raise self._overflow_stop(rec, overflow_streak)
            if nonfinite_streak > cfg.max_nonfinite_steps:
                history.append(rec)
                if rank == 0:
                    p.metrics.write(rec)  # the bad step stays visible in metrics.jsonl (loss: null)
                raise self._nonfinite_stop(rec, nonfinite_streak)
            if nonfinite_streak and rank == 0:
                logger.warning(
                    "step %d: non-finite loss %s / grad_norm %s: skipped (%d in a row, "
                    "--max_nonfinite_steps=%d)",
                    done,
                    rec["loss"],
                    rec["grad_norm"],
                    nonfinite_streak,
                    cfg.max_nonfinite_steps,
                )
            if cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or last):
                self.heartbeat.beat(done, "eval")
                val = self.evaluate()
                if val is not None:
                    rec["val_loss"] = val
            p.progress.step, p.progress.tokens = done, tokens
            job = None
            if last or stop_now or (cfg.save_interval > 0 and done % cfg.save_interval == 0):
                self.heartbeat.beat(done, "save")
                self._finish_param_sync()  # ZeRO-1: complete weights on every rank before they are read
                t_save = time.perf_counter()
                # what the loop waits for: the checks and the host snapshot (async), or the write
                job = p.checkpoints.begin_save(done, p.state, p.run_facts, blocking=not cfg.async_save)
                rec["ckpt_blocking_s"] = time.perf_counter() - t_save
            history.append(rec)
            if rank == 0:
                p.metrics.write(rec)  # before the checkpoint of this step can exist (metrics.py)
                p.tracker.log({k: v for k, v in rec.items() if k != "step"}, done)
                if done == start_step + 1 or (self.held_bytes is not None and not self._info_measured):
                    # written again once a step was applied (bytes_per_param)
                    write_run_info(cfg.out_dir, run_info(p, self.world, device, self.held_bytes))
                    self._info_measured = self.held_bytes is not None
                if done % cfg.log_interval == 0 or last or done == start_step + 1:
                    log_line = console_line(rec, cfg.max_iters, step_seconds, _peak_memory_gb(device))
                    logger.info(log_line)
            if job is not None:
                p.checkpoints.commit_save(job)  # async: written and published in the background
                if stop_now and not last:
                    p.checkpoints.wait()  # the request's checkpoint is on disk before the exit
                    raise PreemptedStop(
                        f"stopped on request ({self.stop.reason()}) after step {done}: saved {job.final}; "
                        "continue with --resume",
                        timed=self.stop.timed(),
                    )
            self.heartbeat.beat(done, "step")
        self.heartbeat.beat(p.progress.step, "save")
        p.checkpoints.wait()  # the last checkpoint is complete before the run returns
        self._finish_param_sync()
        return TrainResult(step=max(start_step, cfg.max_iters), tokens=tokens, history=history)

    def _finish_param_sync(self) -> None:
        finish = getattr(self.p.optimizer, "finish_param_sync", None)
        if finish is not None:
            finish()

    # ---- reports ------------------------------------------------------------------------------------------
    def _nonfinite_stop(self, rec: dict[str, Any], streak: int) -> NonFiniteStepError:
        """The error that stops a run at a non-finite step: which step, what was seen, what is on disk."""
        cfg = self.cfg
        self._wait_quietly()  # a save in flight holds the newest good state: name it when complete
        saved = list_checkpoints(cfg.out_dir)
        newest = (
            f"the newest checkpoint is {saved[0][1]}" if saved else f"there is no checkpoint in {cfg.out_dir}"
        )
        how = (
            "the bucket optimizers of --overlap_optim_step had already applied it"
            if self.p.dp.steps_optimizer
            else "it was not applied"
        )
        loss, norm = rec["loss"], rec["grad_norm"]
        bad = " and ".join(k for k, v in (("loss", loss), ("gradient norm", norm)) if not math.isfinite(v))
        return NonFiniteStepError(
            f"step {rec['step']}: non-finite {bad} (loss {loss:.4g}, gradient norm {norm:.4g}), {streak} "
            f"step(s) in a row (--max_nonfinite_steps={cfg.max_nonfinite_steps}); {how} and nothing was "
            f"saved: {newest}. Lower --learning_rate and --resume"
        )

    def _wait_quietly(self) -> None:
        """Wait for the save in flight; its failure is logged, not raised (the stop's error comes first)."""
        try:
            self.p.checkpoints.wait()
        except Exception as e:  # noqa: BLE001
            logger.error("the asynchronous checkpoint in flight failed: %s", e)

    def _overflow_stop(self, rec: dict[str, Any], streak: int) -> NonFiniteStepError:
        self._wait_quietly()  # as in _nonfinite_stop
        saved = list_checkpoints(self.cfg.out_dir)
        newest = f"the newest checkpoint is {saved[0][1]}" if saved else "there is no checkpoint yet"
        return NonFiniteStepError(
            f"step {rec['step']}: float16 gradients overflowed in {streak} steps in a row (each skipped; "
            f"--max_skipped_steps={self.cfg.max_skipped_steps}), at loss scale {rec.get('loss_scale')}; "
            f"nothing was saved: {newest}. Lower --learning_rate or --initial_loss_scale, or train in "
            "bfloat16 (--dtype, --params_dtype), and --resume"
        )

    def _mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation on GPU (None on CPU or an unknown GPU): achieved / (world x peak)."""
        if self.device.type != "cuda" or self.p.model_config is None:
            return None
        peak = peak_flops_for(torch.cuda.get_device_name(self.device))
        if peak is None:
            return None
        achieved = estimate_mfu(self.p.model_config, self.cfg.max_seq_len, tokens_per_s, peak * self.world)
        return float(achieved)


def _peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated by this rank, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
