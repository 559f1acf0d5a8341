"""``torchrun --nproc_per_node=N -m z2all.cluster_check``: name the slow or broken rank before a long run.

    torchrun --nnodes=2 --nproc_per_node=8 ... -m z2all.cluster_check [--sizes_mb=1,16,64] [--iters=10]
        [--matmul_size=8192] [--threshold=0.8] [--out=cluster.json]

Every rank times an n x n matmul (FLOP/s), then an all-reduce and an all-gather of each size, after
checking each collective's result once (a rank whose link corrupts data is broken, not slow). Rank 0
gathers every rank's numbers, prints them as one JSON object on stdout (log lines go to stderr) and,
with ``--out=FILE``, writes it atomically for ``python -m z2all.plan --bandwidth_from=FILE``.

Flagged (:func:`classify`, named ``rank N: ...`` in the log and under ``flagged``):
- broken: the rank raised (its error, caught per phase), measured a non-finite number, or received a
  wrong collective result;
- slow: its matmul FLOP/s is below ``--threshold`` x the median of the ranks, or its time for a
  collective is above the median / ``--threshold``.

Bandwidth as nccl-tests defines it (GB = 1e9 bytes): algbw = S / t with S the all-reduce tensor or the
all-gather output; busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n for all-gather, the bytes one
rank sends in a ring over the time, comparable across world sizes. ``bus_bandwidth_gbps`` is the
busbw at the largest size, from the slowest rank's time (a collective is as fast as its slowest rank).

Device: ``cuda:LOCAL_RANK`` with NCCL when CUDA is available (``--device=auto``), else the CPU with
gloo. Without torchrun: one process, the matmul only. Exit status (every rank alike): 0 no rank
flagged; 1 some rank flagged; 2 a bad flag. Guide: docs/planning.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from z2all.atomic import atomic_write_json
from z2all.cli_args import run_cli
from z2all.model import peak_flops_for

logger = logging.getLogger(__name__)
PROG = "python -m z2all.cluster_check"
MIB = 2**20
# nccl-tests' bus-bandwidth factor for n ranks: what one rank of a ring sends, per byte of S
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n}


@dataclass(frozen=True)
class ClusterCheckConfig:
    """What to measure and when to flag a rank."""

    sizes_mb: str = "1,16,64"
    """Collective sizes in MiB (2**20 bytes), comma-separated: the all-reduce tensor, all-gather output."""
    iters: int = 10
    """Timed repetitions of each test (after --warmup untimed ones)."""
    warmup: int = 2
    """Untimed repetitions first (NCCL builds its rings, caches warm up)."""
    matmul_size: int = 0
    """n of the n x n matmul; 0: 8192 on CUDA, 512 on the CPU."""
    matmul_dtype: str = "auto"
    """float32, bfloat16 or float16; auto: bfloat16 on CUDA, float32 on the CPU."""
    threshold: float = 0.8
    """A rank is slow below this fraction of the median matmul FLOP/s (or above median time / this)."""
    device: str = "auto"
    """auto (CUDA when available), cuda or cpu."""
    out: str = ""
    """Also write the JSON here, atomically (for python -m z2all.plan --bandwidth_from)."""
    timeout_s: int = 300
    """Seconds a collective may wait before it fails (a dead rank must not hang the others forever)."""

    def __post_init__(self) -> None:
        try:
            sizes = [float(s) for s in self.sizes_mb.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"--sizes_mb={self.sizes_mb!r} is not a comma-separated list of numbers"
            ) from None
        if not sizes or not all(0 < s < math.inf for s in sizes):
            raise ValueError(f"--sizes_mb={self.sizes_mb!r}: give one or more sizes > 0")
        for name in ("iters", "timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.matmul_size < 0:
            raise ValueError("--warmup and --matmul_size must be >= 0")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.matmul_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"--matmul_dtype={self.matmul_dtype!r} is not one of auto|float32|bfloat16|float16"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device={self.device!r} is not one of auto|cuda|cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda but CUDA is not available on this machine")

    @property
    def sizes_bytes(self) -> list[int]:
        return [int(float(s) * MIB) for s in self.sizes_mb.split(",") if s.strip()]


# ---------------------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, iters: int, warmup: int) -> float:
    """TFLOP/s of ``a @ b`` for n x n operands (2 n^3 FLOPs a product)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: torch.matmul(a, b, out=out), iters, warmup, device)
    if not bool(torch.isfinite(out).all()):  # randn operands: a non-finite product is a broken device
        return math.nan
    return 2 * n**3 / seconds / 1e12


def collective(op: str, nbytes: int, cfg: ClusterCheckConfig, device: torch.device) -> dict[str, Any]:
    """One size of ``op`` ("all_reduce" | "all_gather") on the default group: its result checked once
    (every rank contributes rank + 1), then timed on zeros; times are this rank's."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if op == "all_reduce":
        t = torch.full((max(nbytes // 4, 1),), float(rank + 1), device=device)  # (S / 4,) fp32
        dist.all_reduce(t)
        correct = bool((t == n * (n + 1) / 2).all())  # exact: small integers in fp32
        t.zero_()
        size = t.numel() * 4
        run = lambda: dist.all_reduce(t)  # noqa: E731
    else:
        chunk = max(nbytes // 4 // n, 1)  # each rank's part of the (n * chunk,) output
        inp = torch.full((chunk,), float(rank + 1), device=device)
        out = torch.empty(n * chunk, device=device)
        dist.all_gather_single(out, inp)
        want = torch.arange(1, n + 1, device=device, dtype=out.dtype).repeat_interleave(chunk)
        correct = bool(torch.equal(out, want))
        inp.zero_()
        size = out.numel() * 4
        run = lambda: dist.all_gather_single(out, inp)  # noqa: E731
    dist.barrier()  # every rank starts the timed loop together: a slow matmul rank does not show here
    seconds = _timed(run, cfg.iters, cfg.warmup, device)  # > 0: perf_counter is monotonic
    algbw = size / seconds / 1e9
    return {
        "size_mb": size / MIB,
        "bytes": size,
        "time_s": seconds,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * BUS_FACTOR[op](n),
        "correct": correct,
    }


def measure_rank(cfg: ClusterCheckConfig, device: torch.device, matmul=matmul_tflops) -> dict[str, Any]:
    """This rank's numbers; an error in a phase is recorded (``errors``) and the next phase still runs,
    so every rank issues the same collectives. ``matmul``: :func:`matmul_tflops` (tests pass a
    failing one)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    n = cfg.matmul_size or (8192 if device.type == "cuda" else 512)
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if cfg.matmul_dtype == "auto" else getattr(torch, cfg.matmul_dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    res: dict[str, Any] = {
        "rank": rank,
        "host": socket.gethostname(),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "device": str(device),
        "device_name": name,
        "matmul": {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": None},
        "collectives": {},
        "errors": [],
    }
    try:
        tflops = matmul(n, dtype, device, cfg.iters, cfg.warmup)
        if not (math.isfinite(tflops) and tflops > 0):
            raise ArithmeticError(f"measured {tflops} TFLOP/s (a non-finite product?)")
        peak = peak_flops_for(name) if device.type == "cuda" else None
        res["matmul"].update(tflops=tflops, peak_fraction=tflops * 1e12 / peak if peak else None)
    except Exception as e:  # noqa: BLE001 - a broken rank is a result, reported by name
        res["errors"].append(f"matmul: {type(e).__name__}: {e}")
    if distributed and dist.get_world_size() > 1:
        for op in BUS_FACTOR:
            res["collectives"][op] = []
            for nbytes in cfg.sizes_bytes:
                try:
                    res["collectives"][op].append(collective(op, nbytes, cfg, device))
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"{op} {nbytes / MIB:g} MiB: {type(e).__name__}: {e}")
    return res


# ---------------------------------------------------------------------------------- verdict (pure)
def classify(ranks: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """The flagged ranks of :func:`measure_rank` results, ``{"rank", "kind": "broken" | "slow", "what",
    "message"}``: broken (an error, a wrong collective result) first, then slow against the median of
    the others (with fewer than 2 healthy ranks there is nothing to compare)."""
    flags: list[dict[str, Any]] = []

    def flag(r: dict, kind: str, what: str, message: str) -> None:
        flags.append(
            {"rank": r["rank"], "kind": kind, "what": what, "message": f"rank {r['rank']}: {message}"}
        )

    broken = set()
    for r in ranks:
        for err in r["errors"]:
            flag(r, "broken", err.partition(":")[0], err)
        for op, rows in r["collectives"].items():
            for row in rows:
                if not row["correct"]:
                    what = f"{op} {row['size_mb']:g} MiB"
                    flag(r, "broken", what, f"{what}: a wrong result (every rank sent rank + 1)")
        if any(f["rank"] == r["rank"] for f in flags):
            broken.add(r["rank"])
    healthy = [r for r in ranks if r["rank"] not in broken]
    if len(healthy) < 2:
        return flags
    median = statistics.median(r["matmul"]["tflops"] for r in healthy)
    for r in healthy:
        if r["matmul"]["tflops"] < threshold * median:
            flag(
                r,
                "slow",
                "matmul",
                f"matmul {r['matmul']['tflops']:.3g} TFLOP/s < {threshold} x median {median:.3g}",
            )
    for op in healthy[0]["collectives"]:
        for i, row in enumerate(healthy[0]["collectives"][op]):
            times = [r["collectives"][op][i]["time_s"] for r in healthy]
            median = statistics.median(times)
            for r, t in zip(healthy, times):
                if t > median / threshold:
                    what = f"{op} {row['size_mb']:g} MiB"
                    flag(
                        r,
                        "slow",
                        what,
                        f"{what}: {t * 1e3:.3g} ms > median {median * 1e3:.3g} ms / {threshold}",
                    )
    return flags


def summarize(ranks: list[dict[str, Any]], cfg: ClusterCheckConfig, backend: str) -> dict[str, Any]:
    """The report rank 0 prints: every rank's numbers, each collective at the slowest rank's time,
    the bus bandwidth at the largest size (z2all.plan's input) and the flagged ranks."""
    world = len(ranks)
    table: dict[str, list[dict[str, Any]]] = {}
    for op in BUS_FACTOR:
        rows = [r["collectives"].get(op, []) for r in ranks]
        if world < 2 or not all(len(x) == len(cfg.sizes_bytes) for x in rows):
            continue  # one process, or a rank whose collectives failed (flagged)
        for i in range(len(cfg.sizes_bytes)):
            slowest = max((x[i] for x in rows), key=lambda row: row["time_s"])
            table.setdefault(op, []).append(
                {k: slowest[k] for k in ("size_mb", "time_s", "algbw_gbps", "busbw_gbps")}
            )
    flagged = classify(ranks, cfg.threshold)
    return {
        "world_size": world,
        "backend": backend,
        "bandwidth": "nccl-tests busbw: algbw = bytes / time (GB = 1e9); all_reduce x 2(n-1)/n, "
        "all_gather x (n-1)/n; per size the slowest rank's time",
        "collectives": table,
        "bus_bandwidth_gbps": {op: table[op][-1]["busbw_gbps"] if op in table else 0.0 for op in BUS_FACTOR},
        "ranks": ranks,
        "flagged": flagged,
        "ok": not flagged,
    }


# ---------------------------------------------------------------------------------- entry point
def run(cfg: ClusterCheckConfig) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    backend = "nccl" if cuda else "gloo"
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    try:
        mine = measure_rank(cfg, device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)  # every rank gets every result: the same verdict everywhere
            backend = dist.get_backend()
        else:
            ranks = [mine]
        report = summarize(ranks, cfg, backend if len(ranks) > 1 else "none")
    finally:
        if created:
            dist.destroy_process_group()
    if mine["rank"] == 0:
        _log(report)
        print(json.dumps(report, indent=2))
        sys.stdout.flush()
        if cfg.out:
            atomic_write_json(cfg.out, report)
            logger.info("wrote %s", cfg.out)
    return 0 if report["ok"] else 1


def _log(report: dict[str, Any]) -> None:
    for r in report["ranks"]:
        m = r["matmul"]
        logger.info(
            "rank %d (%s, %s): matmul %d^3 %s: %.3g TFLOP/s",
            r["rank"],
            r["host"],
            r["device"],
            m["n"],
            m["dtype"],
            m["tflops"],
        )
    for op, rows in report["collectives"].items():
        for row in rows:
            logger.info(
                "%s %7.3g MiB: %9.3g ms, bus %.3g GB/s (slowest rank)",
                op,
                row["size_mb"],
                row["time_s"] * 1e3,
                row["busbw_gbps"],
            )
    for f in report["flagged"]:
        logger.warning("%s %s", f["kind"].upper(), f["message"])
    logger.info(
        "%d rank(s): %s", report["world_size"], "ok" if report["ok"] else f"{len(report['flagged'])} flag(s)"
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(ClusterCheckConfig, run, argv, description=__doc__.split("\n\n")[0], prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
