"""The training loop on small stand-ins (a tiny LM and a synthetic sequence dataset).

These pin the loop's own contract independently of the real model and data packages:
1 rank == 2 ranks, gradient accumulation == one big batch, bit-exact resume (also after the newest
checkpoint is corrupt), metrics.jsonl / run_info.json / config.json, comm byte counting.
End-to-end runs on the real model and corpora are in test_loop_real.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed
from z2all.training import train
from z2all.training.build import Components
from z2all.training.config import ConfigError, TrainConfig
from z2all.training.loop import NonFiniteStepError
from z2all.training.metrics import read_metrics
from z2all.training.resume import ResumeRules
from z2all.training.tasks import PretrainTask

VOCAB = 32
SEQ = 8


@dataclass
class _Out:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyLM(nn.Module):
    """Embedding -> tanh MLP mixing the previous token -> LM head; enough to learn a pattern.
    Same call convention as Z2allForCausalLM: ``targets`` aligned with positions.

    ``dropout > 0`` makes every training forward draw from torch's RNG, so a resume that did not
    restore the RNG streams would give other masks (other losses). The loop seeds each rank with
    ``rank_seed(seed, rank)``, so masks depend on the rank: the 1-vs-2-rank tests use no dropout."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.mix = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, targets=None, return_logits: bool = True) -> _Out:
        h = self.drop(self.embed(input_ids))  # (B, T, D)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        logits = self.head(torch.tanh(self.mix(torch.cat([h, prev], dim=-1))))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return _Out(loss, logits)


class NanGateLM(TinyLM):
    """TinyLM whose loss is NaN through one parameter only: ``gate`` gets a NaN gradient (the others
    get the finite cross-entropy gradient), so a NaN check must name ``gate``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.tensor([-1.0]))

    def forward(self, input_ids: torch.Tensor, targets=None, return_logits: bool = True) -> _Out:
        out = super().forward(input_ids, targets, return_logits)
        if out.loss is not None:
            out.loss = out.loss + 0.0 * torch.sqrt(self.gate).sum()  # sqrt(-1) = NaN
        return out


def make_data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of a learnable sequence: next = (5 * cur + 3) % VOCAB from a random start (2 random tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = torch.randint(0, VOCAB, (2,), generator=g).tolist()
        seq = [a, b]
        while len(seq) < SEQ + 1:
            seq.append((5 * seq[-1] + 3) % VOCAB)
        w = torch.tensor(seq)
        out.append((w[:-1], w[1:]))
    return out


def make_components(cfg: TrainConfig, dropout: float = 0.0, nan_gate: bool = False) -> Components:
    torch.set_num_threads(1)  # tiny tensors: threads only add contention (conftest restores the count)
    torch.manual_seed(cfg.seed)  # identical init on every rank and in every run
    model = NanGateLM() if nan_gate else TinyLM(dropout=dropout)

    def make_optimizer(named_params):
        return torch.optim.AdamW(
            [p for _, p in named_params],
            lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
        )

    return Components(
        model=model,
        make_optimizer=make_optimizer,
        task=PretrainTask(),
        train_data=make_data(64, 1),
        val_data=make_data(16, 2),
    )


def make_cfg(out_dir, **kw) -> TrainConfig:
    base = dict(
        data_dir="unused",
        out_dir=str(out_dir),
        max_iters=6,
        lr_decay_iters=6,
        warmup_iters=1,
        learning_rate=1e-2,
        min_lr=1e-3,
        train_batch_size=4,
        gradient_accumulation_steps=2,
        max_seq_len=SEQ,
        eval_interval=3,
        eval_iters=2,
        log_interval=1,
        save_interval=3,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(records) -> list[float]:
    return [r["loss"] for r in records]


def test_loss_falls_and_outputs_written(tmp_path):
    cfg = make_cfg(
        tmp_path / "run",
        max_iters=20,
        lr_decay_iters=20,
        save_interval=0,
        eval_interval=10,
        learning_rate=3e-2,
    )
    result = train(cfg, make_components(cfg))
    recs = read_metrics(cfg.out_dir)
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert result.step == 20 and _losses(result.history) == _losses(recs)
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "comm_bytes"):
        assert key in recs[0], key
    assert recs[0]["tokens"] == 2 * 4 * SEQ and recs[-1]["tokens"] == 20 * 2 * 4 * SEQ
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20]
    assert recs[0]["comm_bytes"] == 0  # one process: no gradient sync
    info = json.loads((Path(cfg.out_dir) / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["num_params"] == sum(p.numel() for p in TinyLM().parameters())
    # the requested settings, and what actually wrapped the model on one process
    assert (info["ddp_impl"], info["effective_ddp"]) == (cfg.ddp_impl, "none")
    assert info["comm_hook"] == cfg.comm_hook and info["bucket_size"] == cfg.bucket_size
    assert info["overlap_grad_reduce"] == cfg.overlap_grad_reduce
    # AdamW holds exp_avg + exp_avg_sq (fp32) per parameter and a step counter per tensor
    assert info["optimizer_state_bytes_per_rank"] >= 2 * 4 * info["num_params"]
    saved = json.loads((Path(cfg.out_dir) / "config.json").read_text())
    assert saved == cfg.to_dict()
    assert any(p.name.startswith("step_") for p in Path(cfg.out_dir).iterdir())


def test_fresh_run_refuses_a_used_out_dir(tmp_path):
    cfg = make_cfg(tmp_path / "used", max_iters=1, lr_decay_iters=1, warmup_iters=0, eval_interval=0)
    train(cfg, make_components(cfg))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, make_components(cfg))


def test_accumulation_equals_one_big_batch(tmp_path):
    # G=2 micro-batches of 4 see exactly the samples of G=1 micro-batch of 8 (sampler contract) and
    # every window has the same token count, so the step losses must agree to fp32 rounding.
    a = make_cfg(tmp_path / "a", gradient_accumulation_steps=2, train_batch_size=4, save_interval=0)
    b = make_cfg(tmp_path / "b", gradient_accumulation_steps=1, train_batch_size=8, save_interval=0)
    la = _losses(train(a, make_components(a)).history)
    lb = _losses(train(b, make_components(b)).history)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=0)


def _run_rank(rank, world, out_dir, variants):
    """Each (ddp_impl, comm_hook) variant trains from scratch in the same 2-rank process group; then
    z2all PowerSGD runs 6 steps straight and 3 + resumed 3 (its hook state lives in the checkpoint)."""
    out = {}
    if ("z2all", "allreduce") in variants:
        psgd = dict(ddp_impl="z2all", comm_hook="powersgd", powersgd_start_iter=2, powersgd_rank=2)
        full = make_cfg(f"{out_dir}/psgd-full", save_interval=0, **psgd)
        hist = train(full, make_components(full)).history
        out["psgd-full"] = torch.tensor(_losses(hist), dtype=torch.float64)
        out["psgd-full-comm"] = torch.tensor([r["comm_bytes"] for r in hist])
        part = make_cfg(f"{out_dir}/psgd-part", max_iters=3, **psgd)
        train(part, make_components(part))
        resumed = make_cfg(f"{out_dir}/psgd-part", resume=True, **psgd)
        train(resumed, make_components(resumed))
        out["psgd-resumed"] = torch.tensor(
            _losses(read_metrics(resumed.out_dir)) if rank == 0 else [], dtype=torch.float64
        )
    for ddp_impl in dict.fromkeys(impl for impl, _ in variants):
        # --check_for_nan_in_grad: a NaN loss stops the run on every rank, naming the parameter
        nan_cfg = make_cfg(
            f"{out_dir}/nan-{ddp_impl}", ddp_impl=ddp_impl, check_for_nan_in_grad=True, save_interval=0
        )
        try:
            train(nan_cfg, make_components(nan_cfg, nan_gate=True))
            out[f"nan-{ddp_impl}"] = ""
        except RuntimeError as e:
            out[f"nan-{ddp_impl}"] = str(e)
    for ddp_impl, comm_hook in variants:
        cfg = make_cfg(
            f"{out_dir}/{ddp_impl}-{comm_hook}", ddp_impl=ddp_impl, comm_hook=comm_hook, save_interval=0
        )
        res = train(cfg, make_components(cfg))
        out[f"{ddp_impl}-{comm_hook}"] = {
            "loss": torch.tensor(_losses(res.history), dtype=torch.float64),
            "val": torch.tensor([r["val_loss"] for r in res.history if "val_loss" in r], dtype=torch.float64),
            "comm": torch.tensor([r["comm_bytes"] for r in res.history]),
            "grad_norm": torch.tensor([r["grad_norm"] for r in res.history], dtype=torch.float64),
        }
    return out


def test_two_ranks_equal_one_rank(tmp_path):
    variants = [("torch", "allreduce"), ("torch", "fp16")]
    try:
        import parallel.distributed_data_parallel  # noqa: F401

        variants += [("z2all", "allreduce"), ("z2all", "fp16")]
    except ImportError:
        pass
    cfg = make_cfg(tmp_path / "one", save_interval=0)
    one = train(cfg, make_components(cfg)).history
    two = run_distributed(_run_rank, 2, str(tmp_path / "two"), variants)
    ref = {
        "loss": torch.tensor(_losses(one), dtype=torch.float64),
        "grad_norm": torch.tensor([x["grad_norm"] for x in one], dtype=torch.float64),
        "val": torch.tensor([x["val_loss"] for x in one if "val_loss" in x], dtype=torch.float64),
    }
    n_params = sum(p.numel() for p in TinyLM().parameters())
    if ("z2all", "allreduce") in variants:
        # PowerSGD compresses (the trajectory differs from plain all-reduce) but stays finite, and a
        # resumed PowerSGD run is bit-identical to an uninterrupted one
        assert torch.isfinite(two[0]["psgd-full"]).all()
        assert not torch.equal(two[0]["psgd-full"], ref["loss"])
        assert torch.equal(two[0]["psgd-resumed"], two[0]["psgd-full"])
        # comm_bytes: the plain all-reduce's bytes for the first powersgd_start_iter=2 steps, then
        # strictly fewer (P and Q factors), the same every step
        allreduce_bytes = two[0]["z2all-allreduce"]["comm"][0].item()
        psgd_comm = two[0]["psgd-full-comm"].tolist()
        assert psgd_comm[:2] == [allreduce_bytes] * 2, psgd_comm
        assert len(set(psgd_comm[2:])) == 1 and 0 < psgd_comm[2] < allreduce_bytes, psgd_comm
    for impl, hook in variants:
        name = f"{impl}-{hook}"
        for r in range(2):
            msg = two[r][f"nan-{impl}"]
            assert "non-finite (NaN/Inf) gradient" in msg and "gate" in msg, (impl, msg)
            assert "head.weight" not in msg and "_orig_mod" not in msg, (impl, msg)
            # every rank logs the same all-reduced numbers
            if hook == "allreduce":
                for key, want in ref.items():
                    torch.testing.assert_close(
                        two[r][name][key], want, rtol=1e-4, atol=0, msg=f"{name} {key}"
                    )
            else:  # fp16 gradient compression: same trajectory to fp16 rounding
                torch.testing.assert_close(two[r][name]["loss"], ref["loss"], rtol=1e-2, atol=0, msg=name)
        # One collective over every gradient per optimizer step (nothing on no_sync micro-steps):
        # 4 bytes per fp32 element, 2 with fp16 compression; the z2all buffer pads each bucket to
        # a multiple of 128 elements.
        comm = two[0][name]["comm"].tolist()
        assert len(comm) == 6 and len(set(comm)) == 1, (name, comm)
        elem = 2 if hook == "fp16" else 4
        if impl == "torch":
            assert comm[0] == elem * n_params, name
        else:
            assert elem * n_params <= comm[0] < elem * (n_params + 128 * 4), name


def test_resume_is_bit_exact_and_survives_corrupt_newest(tmp_path):
    # Dropout in train mode: the losses after the resume match only if every RNG stream was restored.
    full_cfg = make_cfg(tmp_path / "full")
    full = _losses(train(full_cfg, make_components(full_cfg, dropout=0.1)).history)

    # Interrupted at step 3 (checkpoint at 3), then resumed up to 6 with the same settings.
    part_cfg = make_cfg(tmp_path / "part", max_iters=3)
    train(part_cfg, make_components(part_cfg, dropout=0.1))
    res_cfg = make_cfg(tmp_path / "part", resume=True)
    resumed = train(res_cfg, make_components(res_cfg, dropout=0.1)).history
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert _losses(read_metrics(res_cfg.out_dir)) == full  # bit-identical in fp32 on CPU

    # A crash after step 5's metrics line but before a checkpoint, and a corrupt newest checkpoint:
    # the resume falls back to step 3, drops metrics lines after it, and reproduces steps 4..6.
    with open(Path(res_cfg.out_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n")
    newest = sorted(p for p in Path(res_cfg.out_dir).iterdir() if p.name.startswith("step_"))[-1]
    victim = max(
        (p for p in newest.rglob("*") if p.is_file() and p.suffix != ".json"), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    again = train(res_cfg, make_components(res_cfg, dropout=0.1)).history
    assert [r["step"] for r in again] == [4, 5, 6]
    recs = read_metrics(res_cfg.out_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert _losses(recs) == full


def test_nan_check_on_one_process(tmp_path):
    cfg = make_cfg(tmp_path / "nan", check_for_nan_in_grad=True, save_interval=0)
    with pytest.raises(RuntimeError, match=r"non-finite \(NaN/Inf\) gradient .* in parameter\(s\): gate$"):
        train(cfg, make_components(cfg, nan_gate=True))
    # without the check, the non-finite loss stops the run (or, tolerated, is skipped and logged)
    off = make_cfg(tmp_path / "nan-off", max_iters=1, lr_decay_iters=1, warmup_iters=0, save_interval=0)
    with pytest.raises(NonFiniteStepError, match=r"^step 1: non-finite loss and gradient norm \(loss nan"):
        train(off, make_components(off, nan_gate=True))
    tolerated = make_cfg(
        tmp_path / "nan-ok",
        max_iters=1,
        lr_decay_iters=1,
        warmup_iters=0,
        save_interval=0,
        max_nonfinite_steps=1,
    )
    assert math.isnan(train(tolerated, make_components(tolerated, nan_gate=True)).history[0]["loss"])


def test_lr_follows_schedule_in_metrics(tmp_path):
    cfg = make_cfg(tmp_path / "lr", save_interval=0, eval_interval=0, warmup_iters=2)
    recs = train(cfg, make_components(cfg)).history
    assert math.isclose(recs[0]["lr"], cfg.learning_rate / 3)
    assert math.isclose(
        recs[-1]["lr"], cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1 + math.cos(math.pi * 3 / 4))
    )


def test_bfloat16_autocast_on_cpu_tracks_fp32(tmp_path):
    a = make_cfg(tmp_path / "fp32", save_interval=0, eval_interval=0)
    b = make_cfg(tmp_path / "bf16", save_interval=0, eval_interval=0, dtype="bfloat16")
    la = torch.tensor(_losses(train(a, make_components(a)).history))
    lb = torch.tensor(_losses(train(b, make_components(b)).history))
    assert not torch.equal(la, lb)  # autocast really ran in bf16
    torch.testing.assert_close(lb, la, rtol=3e-2, atol=0)  # bf16 has an 8-bit mantissa


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = make_cfg(
        tmp_path / "tb",
        save_interval=0,
        eval_interval=0,
        max_iters=2,
        lr_decay_iters=2,
        tracker="tensorboard",
    )
    train(cfg, make_components(cfg))
    assert list((tmp_path / "tb" / "tracker").glob("events.out.tfevents.*"))


def test_resume_refuses_to_move_optimizer_state_between_homes(tmp_path):
    def rules(world, **kw):
        return ResumeRules(make_cfg(tmp_path, **kw), world, None, "")

    plain, overlapped = dict(), dict(overlap_optim_step=True, grad_clip=0.0)
    rules(4, **plain)(tmp_path, {"world_size": 2, "overlap_optim_step": False})  # plain: any world size
    rules(2, **overlapped)(tmp_path, {"world_size": 2, "overlap_optim_step": True})
    rules(1, **plain)(tmp_path, {"world_size": 1})  # checkpoints without the key: plain
    rules(1, **overlapped)(tmp_path, {"world_size": 1})  # one process: no per-bucket optimizers
    for run, kw, world in [
        ({"world_size": 2, "overlap_optim_step": True}, plain, 2),
        ({"world_size": 2, "overlap_optim_step": False}, overlapped, 2),
        ({"world_size": 2, "overlap_optim_step": True}, overlapped, 4),
    ]:
        with pytest.raises(ConfigError, match="cannot resume: the checkpoint's optimizer state"):
            rules(world, **kw)(tmp_path, run)
    with pytest.raises(ConfigError, match="--bucket_size=1000 when saved"):
        rules(2, bucket_size=2000, **overlapped)(
            tmp_path, {"world_size": 2, "overlap_optim_step": True, "bucket_size": 1000}
        )
