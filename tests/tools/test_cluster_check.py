"""z2all.cluster_check: per-rank matmul and collective numbers, and the ranks it flags.

- :func:`classify` on injected per-rank numbers: a slow matmul, a slow collective, an error, a wrong
  collective result, the threshold's edge, nothing to compare on one rank;
- 2 gloo ranks through the library (tests/dist_utils): correct collectives, nccl-tests' bus bandwidth
  factors, and a rank whose matmul gives NaN or raises named ``rank 1: ...`` as broken;
- the real launcher (``torch.distributed.run``, 2 ranks): JSON on stdout, the same in ``--out``, which
  ``python -m z2all.plan --bandwidth_from`` reads; one process without torchrun; flag errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed
from z2all.cluster_check import ClusterCheckConfig, classify, main, measure_rank, summarize
from z2all.plan import main as plan_main

REPO = Path(__file__).resolve().parents[2]


def _rank(rank: int, tflops: float = 1.0, times=(0.01, 0.02), errors=(), correct=True) -> dict:
    """A measure_rank result with the given matmul TFLOP/s and all-reduce times (1 and 16 MiB)."""
    rows = [{"size_mb": mb, "time_s": t, "correct": correct} for mb, t in zip((1, 16), times)]
    return {
        "rank": rank,
        "matmul": {"tflops": tflops},
        "collectives": {"all_reduce": rows},
        "errors": list(errors),
    }


def _flags(ranks, threshold=0.8):
    return sorted((f["rank"], f["kind"], f["what"]) for f in classify(ranks, threshold))


def test_healthy_ranks_are_not_flagged():
    ranks = [_rank(r, tflops=1.0 + 0.05 * r, times=(0.01 * (1 + 0.05 * r), 0.02)) for r in range(8)]
    assert classify(ranks, 0.8) == []
    assert classify([_rank(0, tflops=0.001)], 0.8) == []  # one rank: no median to be slow against


def test_slow_ranks_are_named_against_the_median():
    ranks = [_rank(r) for r in range(4)]
    ranks[2] = _rank(2, tflops=0.5)  # half the median
    ranks[3] = _rank(3, times=(0.01, 0.05))  # 16 MiB all-reduce 2.5x the median time
    assert _flags(ranks) == [(2, "slow", "matmul"), (3, "slow", "all_reduce 16 MiB")]
    (slow,) = [f for f in classify(ranks, 0.8) if f["rank"] == 2]
    assert slow["message"].startswith("rank 2: matmul 0.5 TFLOP/s < 0.8 x median 1")
    edge = [_rank(0), _rank(1), _rank(2, tflops=0.8)]  # exactly threshold x median: not slow
    assert _flags(edge) == []
    assert _flags(edge, threshold=0.9) == [(2, "slow", "matmul")]


def test_broken_ranks_are_named_and_left_out_of_the_median():
    ranks = [_rank(r) for r in range(4)]
    ranks[1] = _rank(1, tflops=None, errors=["matmul: RuntimeError: CUDA error: an illegal memory access"])
    ranks[3] = _rank(3, correct=False)
    flags = classify(ranks, 0.8)
    assert _flags(ranks) == [
        (1, "broken", "matmul"), (3, "broken", "all_reduce 1 MiB"), (3, "broken", "all_reduce 16 MiB")
    ]  # fmt: skip
    assert flags[0]["message"] == "rank 1: matmul: RuntimeError: CUDA error: an illegal memory access"
    # with the broken ones out, the healthy two are compared with each other only
    ranks[0] = _rank(0, tflops=0.1)
    assert (0, "slow", "matmul") in _flags(ranks)


# ------------------------------------------------------------------------------------- 2 gloo ranks
def nan_on_rank1(n, dtype, device, iters, warmup):
    return math.nan if dist.get_rank() == 1 else 1.0


def raise_on_rank1(n, dtype, device, iters, warmup):
    if dist.get_rank() == 1:
        raise RuntimeError("injected device fault")
    return 1.0


def _check_worker(rank, world, matmul):
    cfg = ClusterCheckConfig(sizes_mb="0.25,1", iters=2, warmup=1, matmul_size=64)
    kw = {"matmul": matmul} if matmul is not None else {}
    mine = measure_rank(cfg, torch.device("cpu"), **kw)
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    return summarize(ranks, cfg, "gloo")


def test_two_ranks_measure_correct_collectives_and_bus_bandwidth():
    report = run_distributed(_check_worker, 2, None)[0]
    # nothing broken; "slow" is not asserted: sub-millisecond timings on a shared CPU are noise
    assert [f for f in report["flagged"] if f["kind"] == "broken"] == [] and report["world_size"] == 2
    for r in report["ranks"]:
        assert r["errors"] == [] and r["matmul"]["tflops"] > 0
        for op, factor in (("all_reduce", 2 * (2 - 1) / 2), ("all_gather", (2 - 1) / 2)):
            rows = r["collectives"][op]
            assert [row["size_mb"] for row in rows] == [0.25, 1.0] and all(row["correct"] for row in rows)
            for row in rows:
                assert row["algbw_gbps"] == pytest.approx(row["bytes"] / row["time_s"] / 1e9)
                assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * factor)
    for op, rows in report["collectives"].items():  # per size, the slowest rank's time
        for i, row in enumerate(rows):
            assert row["time_s"] == max(r["collectives"][op][i]["time_s"] for r in report["ranks"])
        assert report["bus_bandwidth_gbps"][op] == rows[-1]["busbw_gbps"] > 0


@pytest.mark.parametrize(
    "matmul, message",
    [
        (nan_on_rank1, "rank 1: matmul: ArithmeticError: measured nan"),
        (raise_on_rank1, "rank 1: matmul: RuntimeError: injected"),
    ],  # fmt: skip
)
def test_a_broken_rank_is_named(matmul, message):
    report = run_distributed(_check_worker, 2, matmul)[0]
    assert not report["ok"]
    (flag,) = report["flagged"]
    assert flag["rank"] == 1 and flag["kind"] == "broken" and flag["message"].startswith(message)
    assert report["bus_bandwidth_gbps"]["all_reduce"] > 0  # its collectives still ran: no rank hung


# --------------------------------------------------------------------------------------- the tools
@pytest.mark.slow
def test_real_launcher_two_ranks_and_plan_reads_its_output(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "z2all.cluster_check", "--sizes_mb=1", "--iters=2", "--warmup=1", "--matmul_size=128",
         "--threshold=0.2", f"--out={out}"],  # 0.2: tiny timings on a shared CPU are noisy
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)  # rank 0 alone prints: one JSON object
    assert json.loads(out.read_text()) == report
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["ok"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert "all_reduce" in res.stderr and "GB/s" in res.stderr  # the human lines go to stderr
    assert plan_main(["--model_config=tiny", "--nproc_per_node=2", "--gradient_accumulation_steps=2",
                      f"--bandwidth_from={out}", "--json"]) == 0  # fmt: skip
    comm = json.loads(capsys.readouterr().out)["comm"]
    assert comm["bus_bandwidth_gbps"]["all_reduce"] == report["bus_bandwidth_gbps"]["all_reduce"]
    assert comm["seconds_per_step"] > 0


def test_one_process_without_torchrun(capsys):
    assert main(["--sizes_mb=1", "--iters=1", "--warmup=0", "--matmul_size=64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world_size"] == 1 and report["collectives"] == {} and report["ok"]
    assert report["bus_bandwidth_gbps"] == {"all_reduce": 0.0, "all_gather": 0.0}  # plan refuses these


def test_bad_flags(capsys):
    for flag, text in (("--sizes_mb=a,b", "--sizes_mb='a,b'"), ("--threshold=1.5", "--threshold"),
                       ("--iters=0", "--iters"), ("--device=tpu", "--device='tpu'")):  # fmt: skip
        assert main([flag]) == 2, flag
        assert f"python -m z2all.cluster_check: error: {text}" in capsys.readouterr().err


def test_flags_snapshot():
    assert [f.name for f in dataclasses.fields(ClusterCheckConfig)] == [
        "sizes_mb", "iters", "warmup", "matmul_size", "matmul_dtype", "threshold", "device", "out",
        "timeout_s",
    ]  # fmt: skip
