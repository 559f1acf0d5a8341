"""CheckpointManager under failures a user meets: a full disk during a save (on one rank or all),
and a model whose config changed since the checkpoint (same shapes, other ``rope_theta``).

A full disk is simulated where the bytes go (DCP's writer, a rank file, the manifest), raising what
the real write raises: torch's zip writer's ``unexpected pos`` RuntimeError, or ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from tests.dist_utils import run_distributed
from tests.training.test_checkpoint import (
    fresh,
    make,
    rewrite_manifest_entry,
    save_two,
    saved_steps,
    train_step,
)
from z2all.training import checkpoint as ckpt_mod
from z2all.training import checkpoint_io
from z2all.training.checkpoint import CheckpointManager, CheckpointMismatchError, CheckpointWriteError
from z2all.training.checkpoint_format import verify_checkpoint
from z2all.training.checkpoint_guard import config_changes
from z2all.training.model_loading import load_model_from_dir
from z2all.training.state import TrainState


class _FullDiskWriter(FileSystemWriter):
    """Writes a piece of a data file, then fails as torch's zip writer does on a full disk."""

    def write_data(self, plan, planner):
        with open(os.path.join(self.path, "__0_0.distcp"), "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 4416 vs 4356")


def _enospc(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail_dcp(monkeypatch):
    monkeypatch.setattr(checkpoint_io, "FileSystemWriter", _FullDiskWriter)


def _fail_rank_file(monkeypatch):
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", _enospc)


def _fail_manifest(monkeypatch):
    monkeypatch.setattr(ckpt_mod, "atomic_write_json", _enospc)


@pytest.mark.parametrize("fail", [_fail_dcp, _fail_rank_file, _fail_manifest])
def test_full_disk_names_the_cause_and_keeps_the_checkpoints(tmp_path, monkeypatch, fail):
    """Used to surface as the raw ``RuntimeError: [enforce fail at inline_container.cc:672] unexpected
    pos`` (or OSError) and to leave the ckpt_tmp-* folder behind."""
    mgr = save_two(tmp_path)
    model, opt = make()
    train_step(model, opt)
    fail(monkeypatch)
    with pytest.raises(CheckpointWriteError) as e:
        mgr.save(3, TrainState.of(model, opt))
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith("no space left on device while writing checkpoint step 3 into ")
    assert str(tmp_path / "ckpt_tmp-000003") in msg and "intact (step_000002, step_000001)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002"]
    assert all(verify_checkpoint(tmp_path / f"step_00000{s}") is None for s in (1, 2))
    assert CheckpointManager(tmp_path).load_latest(fresh(seed=1))["step"] == 2
    mgr.save(3, TrainState.of(model, opt))  # space again: the next save works
    assert saved_steps(tmp_path) == [2, 3]


def _full_disk_on_rank_1(rank, world, out_dir, where):
    mgr = CheckpointManager(out_dir)
    model, opt = make()
    train_step(model, opt)
    mgr.save(1, TrainState.of(model, opt))
    if rank == 1 and where == "rank_file":
        ckpt_mod.atomic_write_bytes = _enospc
    if rank == 1 and where == "dcp":
        checkpoint_io.FileSystemWriter = _FullDiskWriter
    try:
        mgr.save(2, TrainState.of(model, opt))
        msg = ""
    except CheckpointWriteError as e:
        msg = str(e)
    return {"msg": msg, "left": sorted(p.name for p in os.scandir(out_dir))}


@pytest.mark.parametrize("where", ["rank_file", "dcp"])
def test_full_disk_on_one_rank_stops_every_rank(tmp_path, where):
    """Rank 1 alone fails: every rank raises (with the old barrier, rank 0 waited forever)."""
    res = run_distributed(_full_disk_on_rank_1, 2, str(tmp_path), where)
    assert res[1]["msg"].startswith("rank 1: no space left on device while writing checkpoint step 2")
    mark = "" if where == "dcp" else " (on another rank)"  # DCP hands every rank all failures
    assert res[0]["msg"].startswith(f"rank 0: no space left on device{mark} while writing checkpoint step 2")
    for r in range(2):
        assert res[r]["left"] == ["step_000001"]
    assert CheckpointManager(tmp_path).load_latest(fresh(seed=1))["step"] == 1


def _llama(**kw):
    """The tiny Llama (``kw`` overrides its preset) and its AdamW."""
    from z2all.model import Z2allForCausalLM, get_preset

    torch.manual_seed(0)
    model = Z2allForCausalLM(get_preset("tiny", **kw))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _llama_state(**kw) -> TrainState:
    return TrainState.of(*_llama(**kw))


def _llama_step(model, opt) -> None:
    x = torch.randint(0, 512, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def test_resume_refuses_an_edited_model_config(tmp_path):
    """Same shapes, other rope_theta / rms_norm_eps: the weights would load and silently compute
    something else. The backend choice (``kernels``) may change."""
    build = _llama_state
    model, opt = _llama()
    _llama_step(model, opt)
    CheckpointManager(tmp_path).save(1, TrainState.of(model, opt))
    with pytest.raises(CheckpointMismatchError, match=r"rope_theta: checkpoint 10000\.0, model 500000\.0"):
        CheckpointManager(tmp_path).load_latest(build(rope_theta=500000.0))
    with pytest.raises(CheckpointMismatchError, match=r"rms_norm_eps: checkpoint 1e-05, model 1e-06"):
        CheckpointManager(tmp_path).load_latest(build(rms_norm_eps=1e-6))
    # a shape change still names the tensors (the more precise report)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches \['model\.embed_tokens\.weight"):
        CheckpointManager(tmp_path).load_latest(build(vocab_size=576))
    assert CheckpointManager(tmp_path).load_latest(build(kernels={"attention": "eager"}))["step"] == 1


def test_a_read_error_inside_dcp_falls_back_to_the_previous_checkpoint(tmp_path):
    """DCP reports a rank's read failure as ``CheckpointException``, a BaseException that the
    fallback's ``except Exception`` used to let through: the resume crashed instead of loading step 1.
    (A garbage data file whose manifest entry agrees, as a bit flip with ``verify=False`` would be.)"""

    def garble_newest(run):
        ckpt = run / "step_000002"
        (data,) = (ckpt / "state").glob("*.distcp")
        data.write_bytes(b"\x01" * data.stat().st_size)
        rewrite_manifest_entry(ckpt, str(data.relative_to(ckpt)))

    save_two(tmp_path / "run")
    garble_newest(tmp_path / "run")
    assert CheckpointManager(tmp_path / "run").load_latest(fresh(seed=3))["step"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt_corrupt-000002", "step_000001"]
    # the same for the tools' model-only loading (z2all.sample, export_hf)
    model, opt = _llama()
    mgr = CheckpointManager(tmp_path / "llama")
    saved = {}
    for step in (1, 2):
        _llama_step(model, opt)
        mgr.save(step, TrainState.of(model, opt))
        saved[step] = model.lm_head.weight.detach().clone()
    garble_newest(tmp_path / "llama")
    loaded, _ = load_model_from_dir(tmp_path / "llama")
    assert torch.equal(loaded.lm_head.weight, saved[1]) and not torch.equal(saved[1], saved[2])


def test_resume_config_check_ignores_init_only_and_unrecorded_fields():
    """Only what changes the model's math is refused: not how fresh weights would have been drawn (a
    resume loads them), nor a field an older checkpoint did not record."""
    saved = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "initializer_range": 0.02, "kernels": {}}
    live = dict(saved, initializer_range=0.01, scale_output_init=True, new_field=3, kernels={"x": 1})
    assert config_changes(saved, live) == []
    assert config_changes(saved, dict(live, rope_theta=5e5)) == [
        "rope_theta: checkpoint 10000.0, model 500000.0"
    ]
