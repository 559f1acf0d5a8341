"""Asynchronous checkpoints (CheckpointManager.save(blocking=False)): the snapshot is the state at the
save call whatever the loop does next, nothing is published before it is complete, failures are raised
on wait(), and a SIGKILL during a background write always leaves a complete checkpoint to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import z2all.training.checkpoint as ckpt_mod
from tests.dist_utils import run_distributed
from tests.training.test_checkpoint import fresh, make, saved_steps, train_step
from z2all.training.checkpoint import CheckpointManager, NonFiniteStateError
from z2all.training.checkpoint_format import read_manifest
from z2all.training.state import TrainProgress, TrainState

REPO = Path(__file__).resolve().parents[2]


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _opt_state(opt) -> list[torch.Tensor]:
    return [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def test_async_snapshot_is_the_state_at_the_save_call(tmp_path):
    """The loop changes weights and optimizer state in place right after save() returns; the
    checkpoint still holds the state of the call, bit for bit, as a blocking save of it does."""
    model, opt = make()
    train_step(model, opt)
    mgr = CheckpointManager(tmp_path / "async")
    expected, expected_opt = _params(model), _opt_state(opt)
    CheckpointManager(tmp_path / "blocking").save(1, TrainState.of(model, opt))
    mgr.save(1, TrainState.of(model, opt, progress=TrainProgress(1, 0)), blocking=False)
    for _ in range(3):  # in place, while the write may be in flight
        train_step(model, opt)
    mgr.wait()
    for folder in ("async", "blocking"):
        model2, opt2 = make(seed=9)
        CheckpointManager(tmp_path / folder).load_latest(TrainState.of(model2, opt2))
        assert all(torch.equal(v, expected[k]) for k, v in model2.state_dict().items())
        assert all(torch.equal(a, b) for a, b in zip(_opt_state(opt2), expected_opt, strict=True))
    mgr.close()


def test_nothing_is_published_before_the_write_completes(tmp_path, monkeypatch):
    """While the background write runs (held at the DCP write here), the folder is ckpt_tmp-*: a resume
    at that moment loads the previous checkpoint; the next save waits for the write in flight."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TrainState.of(model, opt))
    release, entered = threading.Event(), threading.Event()
    real = ckpt_mod.save_dcp

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_dcp", held)
    train_step(model, opt)
    path = mgr.save(2, TrainState.of(model, opt), blocking=False)
    assert entered.wait(30) and mgr.saving()
    assert path.name == "step_000002" and not path.exists()
    assert (tmp_path / "ckpt_tmp-000002").is_dir()
    assert saved_steps(tmp_path) == [1]
    assert CheckpointManager(tmp_path).load_latest(fresh(seed=3))["step"] == 1

    # save 3 must wait for save 2 (published in order, rotation keeps 2 and 3)
    threading.Timer(0.3, release.set).start()
    t0 = time.perf_counter()
    mgr.save(3, TrainState.of(model, opt), blocking=False)
    assert time.perf_counter() - t0 >= 0.25
    assert read_manifest(path)["step"] == 2
    mgr.close()
    assert saved_steps(tmp_path) == [2, 3]
    assert not mgr.saving()


def test_a_failed_async_write_is_raised_by_wait_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TrainState.of(model, opt))

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the manifest")

    monkeypatch.setattr(ckpt_mod, "atomic_write_json", crash)
    mgr.save(2, TrainState.of(model, opt), blocking=False)
    deadline = time.monotonic() + 30
    while not mgr.save_failed():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mgr.wait()
    assert not mgr.save_failed()  # raised once
    assert not (tmp_path / "ckpt_tmp-000002").exists() and saved_steps(tmp_path) == [1]
    monkeypatch.undo()
    mgr.save(3, TrainState.of(model, opt), blocking=False)  # the manager goes on after a failure
    mgr.close()
    assert saved_steps(tmp_path) == [1, 3]


def test_async_save_refuses_nan_before_anything_is_written(tmp_path):
    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TrainState.of(model, opt))
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(NonFiniteStateError, match="head.bias"):
        mgr.save(2, TrainState.of(model, opt), blocking=False)
    assert not mgr.saving()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


def test_begin_save_publishes_nothing_until_commit(tmp_path):
    """The loop writes step N's metrics between begin_save and commit_save: no checkpoint N before."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    for blocking in (True, False):
        step = 1 if blocking else 2
        job = mgr.begin_save(step, TrainState.of(model, opt), blocking=blocking)
        time.sleep(0.05)
        assert saved_steps(tmp_path) == ([] if blocking else [1])
        mgr.commit_save(job)
        mgr.wait()
    assert saved_steps(tmp_path) == [1, 2]
    mgr.close()


# -- two ranks: the writer's collectives on its own gloo group, beside the training all-reduces ----


def _two_rank_async(rank: int, world: int, out_dir: str) -> dict:
    model, opt = make(seed=0)
    ddp = DDP(model)
    mgr = CheckpointManager(out_dir, keep=2, seed=1)
    train_step(ddp, opt)
    mgr.warm_up_async(TrainState.of(ddp, opt))
    snapshots = {}
    for step in (1, 2, 3):
        snapshots[step] = _params(model)
        mgr.save(step, TrainState.of(ddp, opt, progress=TrainProgress(step, 0)), blocking=False)
        for _ in range(2):  # DDP all-reduces on the default group while the writer runs on its own
            train_step(ddp, opt)
    mgr.close()
    dist.barrier()
    model2, opt2 = make(seed=4)
    loaded = CheckpointManager(out_dir).load_latest(TrainState.of(DDP(model2), opt2))["step"]
    same = all(torch.equal(v, snapshots[3][k]) for k, v in model2.state_dict().items())
    return {"loaded": loaded, "same": same}


def test_two_ranks_async_saves_beside_training(tmp_path):
    results = run_distributed(_two_rank_async, 2, str(tmp_path))
    assert [r["loaded"] for r in results] == [3, 3]
    assert all(r["same"] for r in results)
    assert saved_steps(tmp_path) == [2, 3]
    assert read_manifest(tmp_path / "step_000003")["world_size"] == 2


# -- SIGKILL while a background write is in flight ----------------------------------------------------

# Saves steps 1, 2, ... asynchronously forever; before save k every weight is set to k, so a
# checkpoint is consistent iff every tensor it holds equals its step. ~24 MB a save: the write takes
# long enough for the parent to kill the process in the middle of one.
_SAVER = """
import sys, torch
from torch import nn
from z2all.training.checkpoint import CheckpointManager
from z2all.training.state import TrainProgress, TrainState
model = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 2048))
mgr = CheckpointManager(sys.argv[1], keep=2)
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    mgr.save(step, TrainState.of(model, progress=TrainProgress(step, 0)), blocking=False)
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_sigkill_during_an_async_write_leaves_a_complete_checkpoint(tmp_path, delay):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        # wait until at least one checkpoint is complete and a later write is in flight
        while not (saved_steps(out) and list(out.glob("ckpt_tmp-*"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    steps = saved_steps(out)
    assert steps
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 2048))
    progress = TrainProgress()
    manifest = CheckpointManager(out).load_latest(TrainState.of(model, progress=progress))
    assert manifest["step"] == steps[-1] == progress.step
    assert all(bool((p == steps[-1]).all()) for p in model.parameters())  # not a mixture of two saves


def test_a_failed_snapshot_is_raised_and_writes_nothing(tmp_path, monkeypatch):
    """Host memory running out during the snapshot: raised on every rank (here one) before anything
    is submitted; the manager saves again afterwards."""
    from z2all.training.checkpoint_async import AsyncWriter

    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TrainState.of(model, opt))

    def no_memory(self, tree):
        raise MemoryError("simulated: no host memory for the snapshot")

    with monkeypatch.context() as m:
        m.setattr(AsyncWriter, "snapshot", no_memory)
        with pytest.raises(MemoryError, match="simulated"):
            mgr.save(2, TrainState.of(model, opt), blocking=False)
    assert not mgr.saving() and sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    mgr.save(3, TrainState.of(model, opt), blocking=False)
    mgr.close()
    assert saved_steps(tmp_path) == [1, 3]


def test_a_cuda_placed_chunk_is_described_on_the_cpu_in_the_snapshot():
    """ZeRO-1 on GPU: a chunk's metadata says rank:r/cuda:i; its host copy must say rank:r/cpu, or
    torch refuses to wrap the copy in a ShardedTensor."""
    from torch.distributed._shard.sharded_tensor import ShardMetadata

    from z2all.training.checkpoint_async import _on_cpu

    md = _on_cpu(ShardMetadata([4, 0], [2, 8], "rank:1/cuda:1"))
    assert (md.shard_offsets, md.shard_sizes, str(md.placement)) == ([4, 0], [2, 8], "rank:1/cpu")
