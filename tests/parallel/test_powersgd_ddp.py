"""PowerSGD through the DDP: equals torch's hook on the same buckets; trains as well as all-reduce.

One 2-rank job (module fixture) runs every case: process start-up dominates the runtime on CPU. The
training case runs on real Python code: the standard library's own source (always there) and the
shared corpus' CPython modules (when present).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.ddp_comm_hooks.powerSGD_hook import PowerSGDConfig, PowerSGDState, powerSGD_hook
from tests.conftest import SHARED_DATA, shared_corpus
from tests.dist_utils import run_distributed
from z2all.data.readers import iter_documents
from z2all.demo import stdlib_corpus

_KEEP_GROUPS_ALIVE: list = []  # see test_powersgd.py: torch's hook must not destroy its group off-thread


def _torch_hook_one_at_a_time(state, bucket) -> torch.futures.Future:
    """torch's hook, waited for at once: it issues collectives from callbacks on gloo threads, so with
    several buckets in flight ranks could issue them in different orders. One in flight is safe."""
    value = torch_psgd.powerSGD_hook(state, bucket).wait()
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 6))


def _hook_through_ddp(rank: int, world_size: int) -> dict:
    """6 SGD steps (2 plain, 4 compressed, rank 2, batching on) on several overlapped buckets."""
    ref_group = dist.new_group(list(range(world_size)))
    _KEEP_GROUPS_ALIVE.append(ref_group)
    opts = dict(matrix_approximation_rank=2, start_powerSGD_iter=2, batch_tensors_with_same_shape=True)
    cfg = DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=1000, first_bucket_size=300)
    runs = {}
    for name in ("ours", "torch"):
        model = _mlp()
        ddp = DistributedDataParallel(cfg, model)
        if name == "ours":
            ddp.register_comm_hook(PowerSGDState(None, PowerSGDConfig(**opts)), powerSGD_hook)
        else:
            ddp.register_comm_hook(torch_psgd.PowerSGDState(ref_group, **opts), _torch_hook_one_at_a_time)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sent = []
        for step in range(6):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(8, 24, generator=g), torch.randn(8, 6, generator=g)
            ddp.reset_comm_stats()
            nn.functional.mse_loss(ddp(x), y).backward()
            ddp.finish_grad_sync()
            opt.step()
            ddp.zero_grad_buffer()
            sent.append(ddp.comm_bytes)
        runs[name] = (list(model.parameters()), sent, len(ddp.buckets))
    (ours, sent, n_buckets), (theirs, _, _) = runs["ours"], runs["torch"]
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))
    return {"rel": rel, "sent": sent, "n_buckets": n_buckets}


def code_bytes(texts, n_chars: int = 400_000) -> torch.Tensor:
    """The first ``n_chars`` characters of ``texts`` (whole texts, as read) as UTF-8 byte ids
    (< 256 < vocab 512)."""
    kept, total = [], 0
    for text in texts:
        kept.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return torch.tensor(list("".join(kept).encode("utf-8")), dtype=torch.long)


def python_code() -> dict[str, torch.Tensor]:
    """Byte ids of real Python code per source: ``stdlib`` (module sources with their docstrings, as
    the demo builds them from this interpreter's standard library) and, when present, ``shared``."""
    data = {"stdlib": code_bytes(stdlib_corpus(limit_bytes=1_000_000)[0])}
    if SHARED_DATA is not None:
        data["shared"] = code_bytes(iter_documents(shared_corpus(SHARED_DATA).code))
    return data


def _train_tiny_llama(rank: int, world_size: int, data: torch.Tensor, steps: int = 100) -> dict:
    """Llama `tiny`, 100 AdamW steps on real code bytes: all-reduce vs PowerSGD rank 4 from step 10."""
    from z2all.model import Z2allForCausalLM, get_preset

    losses, bytes_per_step = {}, {}
    for name in ("allreduce", "powersgd"):
        torch.manual_seed(0)
        model = Z2allForCausalLM(get_preset("tiny"))
        ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=200_000), model)
        if name == "powersgd":
            cfg = PowerSGDConfig(matrix_approximation_rank=4, start_powerSGD_iter=10)
            ddp.register_comm_hook(PowerSGDState(None, cfg), powerSGD_hook)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(rank)  # each rank its own windows, the same for both runs
        trace = []
        for _ in range(steps):
            starts = torch.randint(0, len(data) - 33, (4,), generator=g).tolist()
            seq = torch.stack([data[s : s + 33] for s in starts])  # (4, 33)
            ddp.reset_comm_stats()
            loss = ddp(seq[:, :-1], labels=seq[:, :-1]).loss  # labels are shifted inside the model
            loss.backward()
            ddp.finish_grad_sync()
            opt.step()
            ddp.zero_grad_buffer()
            trace.append(loss.item())
        losses[name] = trace
        bytes_per_step[name] = ddp.comm_bytes  # the last step: compressed for PowerSGD
    return {"losses": losses, "bytes": bytes_per_step}


def _all_cases(rank: int, world_size: int, data: dict[str, torch.Tensor]) -> dict:
    out = {"hook": _hook_through_ddp(rank, world_size)}
    out["train"] = {source: _train_tiny_llama(rank, world_size, d) for source, d in data.items()}
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    """One 2-rank job for the module; the training case runs on every code source present."""
    return run_distributed(_all_cases, 2, python_code())


def test_powersgd_through_ddp_equals_torch_hook_on_same_buckets(results):
    """Measured: relative parameter difference 0.0 after 6 steps; asserted <= 1e-6."""
    for r in (res["hook"] for res in results):
        assert r["n_buckets"] >= 3, r
        assert r["rel"] <= 1e-6, r
        plain, compressed = r["sent"][0], r["sent"][-1]
        assert r["sent"][:2] == [plain, plain] and compressed < plain / 2, r["sent"]


@pytest.mark.parametrize("source", ["stdlib", pytest.param("shared", marks=pytest.mark.shared_data)])
def test_powersgd_loss_after_100_steps_within_5_percent_of_allreduce(results, source):
    """Mean loss of the last 10 of 100 steps, 2 ranks x 4 x 32 bytes of real Python code.

    Measured (shared): all-reduce 2.853, PowerSGD rank 4 2.874 (+0.8%); bytes per step 4.9% of all-reduce.
    Measured (stdlib, Python 3.11): all-reduce 2.884, PowerSGD rank 4 2.927 (+1.5%); bytes 4.9%.
    (With 4 x 64 bytes: 2.570 vs 2.654, +3.3%.)
    (On a synthetic arithmetic-progression task, which needs a full-rank embedding map, rank 4 is
    10-30% behind after 100 steps: low rank slows learning high-rank structure; see docs/powersgd.md.)
    """
    r = results[0]["train"][source]
    ar, ps = r["losses"]["allreduce"], r["losses"]["powersgd"]
    assert ar[0] == pytest.approx(ps[0], rel=1e-6)  # same start
    final_ar, final_ps = sum(ar[-10:]) / 10, sum(ps[-10:]) / 10
    assert final_ar < 0.5 * ar[0], (ar[0], final_ar)  # the task is learnt at all
    assert abs(final_ps - final_ar) <= 0.05 * final_ar, (final_ar, final_ps)
    assert r["bytes"]["powersgd"] <= 0.10 * r["bytes"]["allreduce"], r["bytes"]
