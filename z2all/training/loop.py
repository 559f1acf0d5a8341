"""The training loop shared by pretrain, SFT and DPO: ``train(cfg)``.

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

A step whose loss or gradient norm is NaN/Inf is never applied, and more than
``--max_nonfinite_steps`` of them in a row raise :class:`NonFiniteStepError`. The decision is taken
from all-reduced numbers, so every rank skips, continues or raises at the same step and none is left
waiting in a collective (docs/training.md, "Non-finite steps").

Everything a run writes is described in docs/training.md. Bit-exact resume rests on four things:
the data position (= step), the optimizer state, every RNG stream (restored by the checkpoint) and an
evaluation that does not draw from the training RNG streams (it runs under ``torch.random.fork_rng``
and touches no Python/NumPy randomness).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel import NonFiniteGradError
from z2all.data.sampler import GlobalBatchSampler
from z2all.training.config import ConfigError, TrainConfig
from z2all.training.lr_schedule import CosineSchedule, set_lr
from z2all.training.metrics import MetricsWriter, console_line, write_run_info
from z2all.training.parallelize import DataParallelModel, unwrap
from z2all.training.rng_state import rank_seed, seed_all
from z2all.training.trackers import build_tracker

log = logging.getLogger(__name__)


@dataclass
class Components:
    """What the loop trains: built by :func:`z2all.training.build.build_components`, or injected."""

    model: nn.Module
    """The bare model on its device (not wrapped, not compiled); what checkpoints hold."""
    optimizer: torch.optim.Optimizer
    """Optimizer over ``model``'s trainable parameters."""
    task: Any
    """A task from tasks.py: ``collate(samples) -> batch``, ``micro_loss(model, batch, ref_model)``."""
    train_data: Any
    """Indexable, sized dataset of training samples."""
    val_data: Any = None
    """Held-out samples for evaluation, or None."""
    ref_model: nn.Module | None = None
    """DPO's frozen reference model."""
    model_config: Any = None
    """The Z2allConfig (for FLOPs/MFU and run_info.json), if known."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts for run_info.json (tokenizer fingerprint, optimizer backend...)."""
    make_bucket_optimizer: Any = None
    """--overlap_optim_step: ``[(name, param)] -> optimizer`` for one DDP bucket (same hyper-parameters)."""


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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _Trainer:
    def __init__(self, cfg: TrainConfig, comp: Components, device: torch.device, rank: int, world: int):
        self.cfg, self.comp, self.device, self.rank, self.world = cfg, comp, device, rank, world
        self.task = comp.task
        self.schedule = CosineSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
        self.sampler = GlobalBatchSampler(
            len(comp.train_data), cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.seed, rank, world
        )
        # Evaluation reads the held-out split in its natural order: micro-batches 0..eval_iters-1
        # (wrapping around), dealt round-robin to ranks, so val_loss is the same for every W.
        n_val = len(comp.val_data) if comp.val_data is not None else 0
        self.val_sampler = (
            GlobalBatchSampler(n_val, min(cfg.train_batch_size, n_val), 1, cfg.seed, shuffle=False)
            if n_val
            else None
        )
        amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.autocast = (
            torch.autocast(device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        # fp16 needs loss scaling to keep small gradients representable; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
        self.params = [p for p in comp.model.parameters() if p.requires_grad]

    # ---- one step -----------------------------------------------------------------------------------
    def train_step(self, dp: DataParallelModel, step: int) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        lr = self.schedule.lr_at(step)
        set_lr(self.comp.optimizer, lr)
        dp.set_lr(lr)
        ids = self.sampler.step_indices(step)  # this rank's G/W micro-batches of sample indices
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        n_tokens = 0
        for i, samples in enumerate(ids):
            batch = _to_device(task.collate([self.comp.train_data[k] for k in samples]), self.device)
            last = i == len(ids) - 1
            # Forward AND backward of every micro-step but the last run without gradient sync.
            with contextlib.nullcontext() if last else dp.no_sync():
                with self.autocast:
                    res = task.micro_loss(dp, batch, self.comp.ref_model)
                # l_j / (G/W): see the module docstring for why this makes W ranks == 1 rank.
                self.scaler.scale(res.loss / len(ids)).backward()
            loss_sum += res.loss.detach().double()
            for k, v in res.stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v.double()
            n_tokens += res.n_tokens
        # A loss scaler's overflow is routine: it skips the step, --check_for_nan_in_grad does not raise.
        try:
            dp.finish_grad_sync(allow_nonfinite=self.scaler.is_enabled())
        except NonFiniteGradError as e:
            # --check_for_nan_in_grad raises on every rank together; it is a non-finite stop like the
            # one below, with its exit code.
            raise NonFiniteStepError(f"step {step + 1}: {e}") from e
        # invariant: every param.grad holds the all-rank average of the step gradient (still scaled in fp16)
        if dp.steps_optimizer:
            # --overlap_optim_step: each bucket's optimizer already stepped inside its comm hook (no
            # clipping possible, validated in the config); the norm is of the averaged gradient.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, math.inf)
        else:
            self.scaler.unscale_(self.comp.optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)

        # One all-reduce (and one host read) carries the step's sums and the "gradient non-finite"
        # flag, BEFORE the optimizer step: whether to apply the step is then decided from the same
        # numbers on every rank, so all ranks skip, continue or raise together.
        keys = sorted(stat_sums)
        packed = torch.stack(
            [
                loss_sum,
                torch.tensor(float(n_tokens), dtype=torch.float64, device=self.device),
                (~torch.isfinite(grad_norm)).double(),
            ]
            + [stat_sums[k] for k in keys]
        )
        sums = _all_reduce_sum(packed).tolist()
        g = cfg.gradient_accumulation_steps
        loss_bad, grad_bad = not math.isfinite(sums[0]), sums[2] > 0
        overflow = False
        if not dp.steps_optimizer:
            # A non-finite step is never applied. In float16 the scaler's unscale_ has recorded the
            # overflow, so update() still backs the scale off; a scale that went down marks a routine
            # overflow, which is not counted. A non-finite *loss* is (the loss is computed before any
            # scaling, so the scaler cannot be its cause).
            scale = self.scaler.get_scale()  # 1.0 when the scaler is disabled
            if not (loss_bad or grad_bad):
                self.scaler.step(self.comp.optimizer)
            self.scaler.update()
            overflow = grad_bad and self.scaler.get_scale() < scale
        dp.zero_grad(self.comp.optimizer)

        rec: dict[str, Any] = {
            "step": step + 1,
            "loss": sums[0] / g,
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        rec["_tokens"] = int(sums[1])
        rec["_nonfinite"] = loss_bad or (grad_bad and not overflow)
        for i, k in enumerate(keys):
            rec[k] = sums[3 + i] / g
        return rec

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float | None:
        """Mean loss over ``eval_iters`` fixed global micro-batches of the held-out split, shared by ranks.

        Runs under fork_rng so the training RNG streams continue as if no evaluation happened.
        """
        if self.val_sampler is None:
            return None
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for j in range(self.rank, self.cfg.eval_iters, self.world):
                samples = self.val_sampler.global_micro_batch(j)
                batch = _to_device(self.task.collate([self.comp.val_data[k] for k in samples]), self.device)
                with self.autocast:
                    total += self.task.micro_loss(model, batch, self.comp.ref_model).loss.double()
        model.train(was_training)
        return float(_all_reduce_sum(total)) / self.cfg.eval_iters


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group)."""
    created = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.device == "cuda" else "gloo")
        dist.init_process_group(backend)
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device=cuda but CUDA is not available on this machine")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def _run_info(cfg: TrainConfig, comp: Components, world: int, device: torch.device, dp) -> dict[str, Any]:
    import platform

    import z2all

    info: dict[str, Any] = {
        "world_size": world,
        "ddp_impl": cfg.ddp_impl,  # as requested
        "effective_ddp": dp.impl,  # what wraps the model: "none" on one process, else ddp_impl
        "comm_hook": cfg.comm_hook,
        "bucket_size": cfg.bucket_size,
        "overlap_grad_reduce": cfg.overlap_grad_reduce,
        "use_distributed_optimizer": False,
        "task_type": cfg.task_type,
        "num_params": sum(p.numel() for p in comp.model.parameters()),
        "optimizer_state_bytes_per_rank": _optimizer_state_bytes(comp.optimizer)
        + dp.overlap_optimizer_state_bytes(),
        "overlap_optim_step": dp.steps_optimizer,
        "optimizer": type(comp.optimizer).__name__,
        "torch_version": torch.__version__,
        "z2all_version": z2all.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda"
        else [platform.processor() or platform.machine()],
    }
    try:
        from z2all.model import kernels

        info["active_backends"] = kernels.active_backends()
    except (ImportError, AttributeError):
        info["active_backends"] = {}
    if comp.model_config is not None and hasattr(comp.model_config, "to_dict"):
        info["model_config"] = comp.model_config.to_dict()
    info.update(comp.info)
    return info


def _peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated by this rank, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _mfu(comp: Components, tokens_per_s: float, device: torch.device, cfg: TrainConfig, world: int):
    """Model FLOPs utilisation on GPU (None on CPU or an unknown GPU): achieved / (world x peak)."""
    if device.type != "cuda" or comp.model_config is None:
        return None
    from z2all.model import estimate_mfu, peak_flops_for

    peak = peak_flops_for(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    return float(estimate_mfu(comp.model_config, cfg.max_seq_len, tokens_per_s, peak * world))


def _check_optimizer_home(extra: dict, dp: DataParallelModel, world: int) -> None:
    """AdamW moments live in the main optimizer (DCP state) or, with --overlap_optim_step, in per-bucket
    optimizers inside the per-rank comm state. Resuming across the two homes (or moving overlapped
    state to another world size) would silently restart the moments: refuse instead."""
    saved = bool(extra.get("overlap_optim_step", False))
    if saved != dp.steps_optimizer or (saved and int(extra.get("world_size", -1)) != world):
        raise ConfigError(
            f"cannot resume: the checkpoint's optimizer state was kept with overlap_optim_step={saved} on "
            f"world size {extra.get('world_size')}, this run has overlap_optim_step={dp.steps_optimizer} on "
            f"world size {world}; resume with the saved setting and world size"
        )


def _refuse_to_mix_runs(cfg: TrainConfig) -> None:
    """A fresh run in a folder that holds another run's history would interleave two runs' metrics
    and checkpoints; require --resume (continue it) or another --out_dir."""
    out = Path(cfg.out_dir)
    if cfg.resume or not out.is_dir():
        return
    has_metrics = (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0
    has_ckpt = any(p.name.startswith("step_") for p in out.iterdir())
    if has_metrics or has_ckpt:
        raise ConfigError(
            f"--out_dir={cfg.out_dir} already holds a run (metrics.jsonl / checkpoints): pass --resume to "
            f"continue it, or choose another --out_dir"
        )


def _nonfinite_stop(cfg: TrainConfig, rec: dict[str, Any], streak: int, applied: bool) -> NonFiniteStepError:
    """The error that stops a run at a non-finite step: which step, what was seen, what is on disk."""
    from z2all.training.checkpoint_format import list_checkpoints

    saved = list_checkpoints(cfg.out_dir)
    newest = (
        f"the newest checkpoint is {saved[0][1]}" if saved else f"there is no checkpoint in {cfg.out_dir}"
    )
    how = (
        "the bucket optimizers of --overlap_optim_step had already applied it"
        if applied
        else "it was not applied"
    )
    loss, norm = rec["loss"], rec["grad_norm"]
    bad = " and ".join(k for k, v in (("loss", loss), ("gradient norm", norm)) if not math.isfinite(v))
    return NonFiniteStepError(
        f"step {rec['step']}: non-finite {bad} (loss {loss:.4g}, gradient norm {norm:.4g}), {streak} step(s) "
        f"in a row (--max_nonfinite_steps={cfg.max_nonfinite_steps}); {how} and nothing was saved: "
        f"{newest}. Lower --learning_rate and --resume"
    )


def train(cfg: TrainConfig, components: Components | None = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    from z2all.training.checkpoint import CheckpointManager

    rank, world, device, created_pg = _setup_distributed(cfg)
    try:
        cfg.check_world_size(world)
        cfg.world_size = world
        # The same seed on every rank while building: identical initial weights before any broadcast.
        seed_all(cfg.seed)
        if components is None:
            from z2all.training.build import build_components

            components = build_components(cfg, device)
        comp = components
        # From here on each rank has its own streams (dropout differs across ranks, as in torch DDP).
        seed_all(rank_seed(cfg.seed, rank))
        _refuse_to_mix_runs(cfg)
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            cfg.save(cfg.out_dir)
        ckpt = CheckpointManager(cfg.out_dir, keep=cfg.keep_checkpoints)
        start_step, tokens, extra = 0, 0, None
        if cfg.resume:
            extra = ckpt.load_latest(comp.model, comp.optimizer)
            if extra is None:
                log.warning("--resume: no checkpoint in %s; starting from step 0", cfg.out_dir)
            else:
                start_step, tokens = int(extra["step"]), int(extra["tokens"])
                log.info("resumed from step %d (%d tokens) in %s", start_step, tokens, cfg.out_dir)
        trainer = _Trainer(cfg, comp, device, rank, world)
        if extra is not None and extra.get("scaler"):
            trainer.scaler.load_state_dict(extra["scaler"])
        metrics = MetricsWriter(cfg.out_dir) if rank == 0 else None
        if metrics is not None:
            metrics.truncate_after(start_step)
        run_model = torch.compile(comp.model) if cfg.compile else comp.model
        dp = DataParallelModel(
            run_model,
            cfg,
            device,
            start_step,
            comm_state=extra.get("comm_state") if extra is not None else None,
            make_bucket_optimizer=comp.make_bucket_optimizer,
            saved_world_size=int(extra["world_size"])
            if extra is not None and "world_size" in extra
            else None,
        )
        if extra is not None:
            _check_optimizer_home(extra, dp, world)
        tracker = (
            build_tracker(
                cfg.tracker,
                cfg.out_dir,
                cfg.run_name or os.path.basename(cfg.out_dir.rstrip("/")),
                cfg.to_dict(),
            )
            if rank == 0
            else None
        )
        try:
            return _loop(
                cfg, comp, trainer, dp, ckpt, metrics, tracker, start_step, tokens, run_model, world, device
            )
        finally:
            if tracker is not None:
                tracker.close()  # also after a non-finite stop: its last records are the diagnosis
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _loop(cfg, comp, trainer, dp, ckpt, metrics, tracker, start_step, tokens, run_model, world, device):
    rank = trainer.rank
    history: list[dict[str, Any]] = []
    comp.model.train()
    if comp.ref_model is not None:
        comp.ref_model.eval()
    if start_step >= cfg.max_iters:
        log.info("nothing to do: checkpoint step %d >= --max_iters=%d", start_step, cfg.max_iters)
    step_seconds = 0.0
    nonfinite_streak = 0  # consecutive non-finite steps (each skipped, not applied)
    for step in range(start_step, cfg.max_iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rec = trainer.train_step(dp, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_seconds = dt if step == start_step else 0.9 * step_seconds + 0.1 * dt
        step_tokens = rec.pop("_tokens")
        tokens += step_tokens
        rec["tokens"] = tokens
        rec["tokens_per_s"] = step_tokens / dt if dt > 0 else 0.0
        rec["mfu"] = _mfu(comp, rec["tokens_per_s"], device, cfg, world)
        rec["comm_bytes"] = dp.pop_comm_bytes()
        done = step + 1
        last = done == cfg.max_iters
        nonfinite_streak = nonfinite_streak + 1 if rec.pop("_nonfinite") else 0
        if nonfinite_streak > cfg.max_nonfinite_steps:
            history.append(rec)
            if rank == 0:
                metrics.write(rec)  # the bad step stays visible in metrics.jsonl (loss: null)
            raise _nonfinite_stop(cfg, rec, nonfinite_streak, dp.steps_optimizer)
        if nonfinite_streak and rank == 0:
            log.warning(
                "step %d: non-finite loss %s / grad_norm %s: skipped (%d in a row, --max_nonfinite_steps=%d)",
                done,
                rec["loss"],
                rec["grad_norm"],
                nonfinite_streak,
                cfg.max_nonfinite_steps,
            )
        if cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or last):
            val = trainer.evaluate(unwrap(run_model) if not cfg.compile else run_model)
            if val is not None:
                rec["val_loss"] = val
        history.append(rec)
        if rank == 0:
            metrics.write(rec)
            tracker.log({k: v for k, v in rec.items() if k != "step"}, done)
            if done == start_step + 1:
                write_run_info(cfg.out_dir, _run_info(cfg, comp, world, device, dp))
            if done % cfg.log_interval == 0 or last or done == start_step + 1:
                peak = _peak_memory_gb(device)
                log.info(console_line(rec, cfg.max_iters, step_seconds, peak))
        if last or (cfg.save_interval > 0 and done % cfg.save_interval == 0):
            extra = {
                "step": done,
                "tokens": tokens,
                "world_size": world,
                "overlap_optim_step": dp.steps_optimizer,
            }
            if trainer.scaler.is_enabled():
                extra["scaler"] = trainer.scaler.state_dict()
            comm_state = dp.comm_state_dict()
            if comm_state is not None:
                extra["comm_state"] = comm_state  # per rank: PowerSGD error feedback and P/Q memories
            ckpt.save(done, comp.model, comp.optimizer, extra)
    return TrainResult(step=max(start_step, cfg.max_iters), tokens=tokens, history=history)
