"""A run saved by the previous z2all (checkpoint format version 1) resumes bit-exactly; a newer format
is refused with a message that says to upgrade.

The fixture ``fixtures/v1_checkpoint/`` was written by the z2all of commit 0d8dac9 (the last one that
wrote version 1) with ``fixtures/make_v1_checkpoint.py``, which also recorded the run that went on
uninterrupted. This test imports the same model, data and step from that script.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from optimizer import DynamicGradScaler
from tests.training.fixtures.make_v1_checkpoint import BATCHES, build, draws, sha256, train_step
from tests.training.test_state import assert_same
from z2all.training.checkpoint import CheckpointManager, CheckpointVersionError
from z2all.training.checkpoint_format import FORMAT_VERSION, read_manifest
from z2all.training.model_loading import load_model_from_dir
from z2all.training.rng_state import seed_all, set_rng_state
from z2all.training.state import LossScalerState, TrainProgress, TrainState

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
RUN = FIXTURE / "run"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))


@pytest.fixture
def run_copy(tmp_path) -> Path:
    """A copy of the fixture's run folder (a load may rename or rotate; the fixture stays as made)."""
    return Path(shutil.copytree(RUN, tmp_path / "run"))


@pytest.fixture(autouse=True)
def _one_thread():
    """The fixture was made with one thread: the same reduction order for the bit-exact comparisons
    (the root conftest restores the thread count)."""
    torch.set_num_threads(1)


def _continue(model, opt) -> tuple[dict, list[float], dict]:
    """What a run does right after step 2: the draws of every stream, then steps 3 and 4."""
    after = draws()
    losses = [train_step(model, opt, step) for step in (3, 4)]
    return after, losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fixture_is_what_the_generator_says():
    assert read_manifest(RUN / "step_000002")["version"] == 1 == REFERENCE["format_version"]
    assert REFERENCE["step"] == 2 and REFERENCE["tokens"] == 2 * BATCHES[0].numel()
    size = sum(p.stat().st_size for p in RUN.rglob("*") if p.is_file())
    assert size < 200_000, size  # tiny on purpose: it lives in the repository


def test_v1_checkpoint_resumes_bit_exactly(run_copy):
    ref = torch.load(FIXTURE / "reference.pt", weights_only=True)
    model, opt = build(seed=1)  # other weights, fresh optimizer, scrambled streams
    seed_all(99)
    progress, scaler = TrainProgress(), DynamicGradScaler(1024.0, 1.0, 2.0, 0.5, 2, 2)
    facts = []
    state = TrainState.of(model, opt, progress=progress, scaler=LossScalerState(scaler))
    for found_inf in (True, True, False):  # moved after it was built: the load must put it back
        scaler.update(found_inf)
    manifest = CheckpointManager(run_copy).load_latest(state, check=lambda path, run: facts.append(run))

    # The state at step 2, exactly as the old z2all held it when it saved.
    assert manifest["version"] == 1 and manifest["step"] == 2
    assert progress == TrainProgress(REFERENCE["step"], REFERENCE["tokens"])
    assert facts == [{"world_size": 1, "overlap_optim_step": False}]  # v1's extra, as resume facts
    assert_same(dict(model.state_dict()), ref["at_save"]["model"], "model")
    assert_same(opt.state_dict(), ref["at_save"]["optim"], "optim")
    # v1 saved no scaler (its runs were bf16/fp32): a scaler on resume starts as built
    assert_same(scaler.state_dict(), DynamicGradScaler(1024.0, 1.0, 2.0, 0.5, 2, 2).state_dict(), "scaler")

    got_draws, got_losses, got_final = _continue(model, opt)
    assert got_draws == REFERENCE["draws_after_save"]  # every RNG stream continues where it stopped

    # (a) Bit-exact: the resumed run equals the uninterrupted run from the state at step 2 (the
    # generator's plain state_dicts), computed here, on this machine's arithmetic.
    model_u, opt_u = build(seed=2)
    model_u.load_state_dict(ref["at_save"]["model"])
    opt_u.load_state_dict(ref["at_save"]["optim"])
    set_rng_state(ref["at_save"]["rng"])
    want_draws, want_losses, want_final = _continue(model_u, opt_u)
    assert got_draws == want_draws and got_losses == want_losses
    assert_same(got_final, want_final, "weights after step 4")

    # (b) The values the old z2all recorded when it went on uninterrupted. Bit-identical where the
    # arithmetic is the generator's (same torch, same CPU kernels: measured max |diff| 0.0 there);
    # another torch or CPU may round its GEMMs and reductions differently, which (a) does not see.
    same_machine = (torch.__version__, torch.backends.cpu.get_cpu_capability()) == (
        REFERENCE["torch_version"],
        REFERENCE["cpu_capability"],
    )
    if same_machine:
        assert got_losses == REFERENCE["losses_steps_3_4"]
        assert {k: sha256(v) for k, v in sorted(got_final.items())} == REFERENCE["final_sha256"]
    else:
        torch.testing.assert_close(
            torch.tensor(got_losses), torch.tensor(REFERENCE["losses_steps_3_4"]), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(got_final, ref["final"], rtol=1e-5, atol=1e-6)


def test_v1_checkpoint_saved_before_the_first_step_loads_a_fresh_optimizer(run_copy):
    """v1 recorded a never-stepped optimizer as ``optimizer_fresh`` (nothing in DCP for it): read as
    the empty state, which clears an optimizer that has state."""
    ckpt = run_copy / "step_000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "optimizer_fresh": True}))
    model, opt = build(seed=1)
    train_step(model, opt, 1)
    assert opt.state
    CheckpointManager(run_copy).load_latest(TrainState.of(model, opt))
    assert not opt.state


def test_load_model_from_dir_reads_v1(run_copy):
    ref = torch.load(FIXTURE / "reference.pt", weights_only=True)
    for where in (run_copy, run_copy / "step_000002"):
        model, cfg = load_model_from_dir(where)
        assert cfg.hidden_size == 8 and cfg.tie_word_embeddings and not model.training
        assert_same(dict(model.state_dict()), ref["at_save"]["model"], str(where))
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_newer_format_is_refused_with_upgrade(run_copy):
    """Version 3 (a newer z2all): refused by the resume and by the tools, naming the version and
    what to do; never read as damage and fallen back from."""
    ckpt = run_copy / "step_000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    newer = FORMAT_VERSION + 1
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "version": newer}))
    pattern = rf"checkpoint format version {newer}; this z2all reads versions 1, 2\. .*upgrade z2all"
    with pytest.raises(CheckpointVersionError, match=pattern):
        CheckpointManager(run_copy).load_latest(TrainState.of(*build()))
    assert (ckpt / "manifest.json").is_file() and not list(run_copy.glob("ckpt_corrupt-*"))
    with pytest.raises(CheckpointVersionError, match=pattern):
        load_model_from_dir(run_copy)
