"""CheckpointManager: exact round trip, crash safety, rotation, fallback, refusal of unsafe files.

The model is a tiny stand-in (embedding, dropout, linear) whose loss draws from every RNG stream, so
"the losses after resume equal the uninterrupted ones" checks model, AdamW state and all RNG streams.
The manager saves a :class:`~z2all.training.state.TrainState`; the manifest it returns on load names
the step, so "which checkpoint was loaded" is read there (or from a component saved with it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimizer import DynamicGradScaler
from z2all.training import checkpoint as ckpt_mod
from z2all.training.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from z2all.training.checkpoint_format import list_checkpoints
from z2all.training.checkpoint_safety import SafeFileSystemReader, safe_torch_load
from z2all.training.config import ConfigError
from z2all.training.rng_state import seed_all
from z2all.training.state import LossScalerState, TrainProgress, TrainState


@dataclasses.dataclass
class TinyConfig:
    vocab: int = 32
    dim: int = 16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Tiny(nn.Module):
    def __init__(self, cfg: TinyConfig | None = None):
        super().__init__()
        self.config = cfg or TinyConfig()
        self.emb = nn.Embedding(self.config.vocab, self.config.dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(self.config.dim, self.config.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        return self.head(self.drop(self.emb(x)))


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """One AdamW step whose data and loss draw from torch, numpy and python RNG (plus dropout)."""
    x = torch.randint(0, 32, (4, 8))
    scale = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()) * scale
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.fixture
def caplog(caplog, monkeypatch):
    """caplog that also sees z2all's records after an entry point's setup_logging() (which turns
    propagation to the root logger off) ran earlier in the same process."""
    monkeypatch.setattr(logging.getLogger("z2all"), "propagate", True)
    return caplog


def make(seed: int = 0, cfg: TinyConfig | None = None) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def fresh(seed: int = 0, cfg: TinyConfig | None = None) -> TrainState:
    """The state of a freshly built model and optimizer (weights from ``seed``) to load into."""
    return TrainState.of(*make(seed, cfg))


class Note:
    """A per-rank test component holding any dict (``state.per_rank``): what a rank writes for itself."""

    def __init__(self, state: dict | None = None):
        self.state = dict(state or {})

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = dict(state_dict)


def with_note(state: TrainState, note: Note) -> TrainState:
    """``state`` plus ``note`` as the per-rank component "note" (next to the RNG streams)."""
    state.per_rank["note"] = note
    return state


def saved_steps(out_dir: Path) -> list[int]:
    return sorted(s for s, _ in list_checkpoints(out_dir))


def rewrite_manifest_entry(ckpt_dir: Path, rel: str) -> None:
    """Make the manifest agree with a file we tampered with (a corrupt-but-consistent checkpoint)."""
    mpath = ckpt_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    data = (ckpt_dir / rel).read_bytes()
    manifest["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mpath.write_text(json.dumps(manifest))


def save_two(out_dir: Path, **kw) -> CheckpointManager:
    """Checkpoints at steps 1 and 2 (the loaded manifest's ``step`` says which one was loaded)."""
    model, opt = make()
    mgr = CheckpointManager(out_dir, **kw)
    for step in (1, 2):
        train_step(model, opt)
        mgr.save(step, TrainState.of(model, opt))
    return mgr


def loss_scaler(initial_scale: float) -> DynamicGradScaler:
    """An fp16 loss scaler that grows after 2 good steps and backs off after 2 overflows."""
    return DynamicGradScaler(
        initial_scale, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2, hysteresis=2
    )


def test_round_trip_is_exact(tmp_path):
    model, opt = make()
    seed_all(11)
    for _ in range(3):
        train_step(model, opt)
    scaler = loss_scaler(1024.0)
    for found_inf in (True, True, False):  # backs off to 512, then one good step: away from as built
        scaler.update(found_inf)
    want_scaler = scaler.state_dict()
    assert float(want_scaler["scale"]) == 512.0
    assert (want_scaler["growth_tracker"], want_scaler["hysteresis_tracker"]) == (1, 0)
    # A compiled wrapper must not leak `_orig_mod.` into the checkpoint (construction does not compile).
    state = TrainState.of(
        torch.compile(model), opt, progress=TrainProgress(3, 96), scaler=LossScalerState(scaler)
    )
    path = CheckpointManager(tmp_path).save(3, with_note(state, Note({"tag": None, "n": 7})))
    expected = [train_step(model, opt) for _ in range(3)]
    expected_params = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = opt.state_dict()

    manifest = json.loads((path / "manifest.json").read_text())
    assert path.name == "step_000003" and manifest["step"] == 3 and manifest["world_size"] == 1
    assert manifest["model_config"] == {"vocab": 32, "dim": 16}
    meta = SafeFileSystemReader(path / "state").read_metadata()
    assert all("_orig_mod" not in k and "module." not in k for k in meta.state_dict_metadata)

    model2, opt2 = make(seed=123)  # different init, fresh optimizer, fresh scaler, scrambled RNG
    seed_all(999)
    progress2, scaler2, note2 = TrainProgress(), loss_scaler(65536.0), Note()
    state2 = TrainState.of(model2, opt2, progress=progress2, scaler=LossScalerState(scaler2))
    got = CheckpointManager(tmp_path).load_latest(with_note(state2, note2))
    assert got["step"] == 3 and progress2 == TrainProgress(3, 96)
    got_scaler = scaler2.state_dict()
    assert got_scaler["scale"].dtype == torch.float32 and got_scaler["scale"].shape == (1,)
    assert torch.equal(got_scaler["scale"], want_scaler["scale"])  # 512, not 65536
    assert (got_scaler["growth_tracker"], got_scaler["hysteresis_tracker"]) == (1, 0)
    assert type(got_scaler["growth_tracker"]) is int and type(got_scaler["hysteresis_tracker"]) is int
    assert note2.state == {"tag": None, "n": 7}
    got = [train_step(model2, opt2) for _ in range(3)]
    assert got == expected  # bit-identical losses: model, AdamW state and every RNG stream
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_params[k]), k
    for pid, st in opt2.state_dict()["state"].items():
        for name, t in st.items():
            assert torch.equal(t, expected_opt["state"][pid][name]), (pid, name)


def test_empty_dir_returns_none(tmp_path):
    assert CheckpointManager(tmp_path / "nothing").load_latest(fresh()) is None


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    mgr = save_two(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the manifest")

    model, opt = make()
    monkeypatch.setattr(ckpt_mod, "atomic_write_json", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mgr.save(3, TrainState.of(model, opt))
    monkeypatch.undo()
    assert not (tmp_path / "ckpt_tmp-000003").exists()  # a save that raises removes its partial folder
    assert saved_steps(tmp_path) == [1, 2]

    # A tmp folder is never complete, even one holding a full copy with a manifest.
    import shutil

    shutil.copytree(tmp_path / "step_000002", tmp_path / "ckpt_tmp-000009")
    assert mgr.load_latest(fresh(seed=5))["step"] == 2

    mgr.save(4, TrainState.of(model, opt))  # the next save cleans up crashed tmp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000004"]


_KILL_SCRIPT = """
import os, signal, sys
from tests.training.test_checkpoint import make, train_step
from z2all.training import checkpoint as c
from z2all.training.state import TrainState
model, opt = make()
mgr = c.CheckpointManager(sys.argv[1])
train_step(model, opt)
mgr.save(1, TrainState.of(model, opt))
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(c, sys.argv[2], die)
train_step(model, opt)
mgr.save(2, TrainState.of(model, opt))
"""


def test_sigkill_mid_save(tmp_path):
    """A real SIGKILL (no Python cleanup runs) after the data files, before the manifest: the
    half-written checkpoint stays a tmp folder and the previous one loads. (The other kill points
    are covered in-process by test_crash_mid_save_keeps_previous; each subprocess costs seconds.)"""
    kill_at, expect_step = "atomic_write_json", 1
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), kill_at],
        cwd=repo,
        timeout=120,
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (tmp_path / "ckpt_tmp-000002").exists() == (expect_step == 1)
    assert CheckpointManager(tmp_path).load_latest(fresh(seed=2))["step"] == expect_step


def test_rotation_keeps_newest_two(tmp_path):
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep=2)

    def at(step: int, tokens: int = 0) -> TrainState:
        return TrainState.of(model, opt, progress=TrainProgress(step, tokens))

    for step in range(1, 5):
        mgr.save(step, at(step))
        assert saved_steps(tmp_path) == list(range(max(1, step - 1), step + 1))
    mgr.save(4, at(4, tokens=44))  # re-saving a step replaces it
    assert saved_steps(tmp_path) == [3, 4]
    progress = TrainProgress()
    assert mgr.load_latest(TrainState.of(model, opt, progress=progress))["step"] == 4
    assert progress == TrainProgress(4, 44)  # the re-saved one
    # A save at an older step after resuming from 4: 4 stays as the previous checkpoint (newest +
    # previous guarantee), 3 goes (older in this lineage than 4).
    mgr.save(2, at(2))
    assert saved_steps(tmp_path) == [2, 4]
    mgr.save(3, at(3))  # now the lineage is 4 -> 2 -> 3: keep 2 and 3
    assert saved_steps(tmp_path) == [2, 3]
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_fresh_manager_drops_stale_future(tmp_path):
    """A manager that did not resume and saves below existing steps deletes those newer ones (a
    timeline the run abandoned) but keeps the older one as the previous checkpoint."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep=3)
    for step in (1, 3, 4):
        mgr.save(step, TrainState.of(model, opt))
    CheckpointManager(tmp_path, keep=3).save(2, TrainState.of(model, opt))
    assert saved_steps(tmp_path) == [1, 2]


def test_resume_from_older_keeps_it_through_later_saves(tmp_path):
    """Resume from 3 while a (valid) 5 exists that this run abandons: saving 4 deletes 5 and keeps
    3 as the previous; saving 5 again afterwards keeps [4, 5]."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (3, 5):
        mgr.save(step, TrainState.of(model, opt))
    resumed = CheckpointManager(tmp_path, keep=2)
    resumed._lineage = [3]  # what load_latest records after loading step 3
    resumed.save(4, TrainState.of(model, opt))
    assert saved_steps(tmp_path) == [3, 4]
    resumed.save(5, TrainState.of(model, opt))
    assert saved_steps(tmp_path) == [4, 5]


@pytest.mark.parametrize("how", ["verify", "load"])
def test_corrupt_newest_never_displaces_the_good_previous(tmp_path, caplog, how):
    """step_4 corrupt -> resume falls back to step_3 -> save step_5: step_3 (good) must survive and
    the corrupt step_4 is set aside as ckpt_corrupt-000004, never loaded."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep=2, verify=how == "verify")
    for step in range(1, 5):
        mgr.save(step, TrainState.of(model, opt))
    if how == "verify":
        _truncate(tmp_path / "step_000004")
    else:  # passes size/sha256 checks, fails inside DCP
        meta = tmp_path / "step_000004" / "state" / ".metadata"
        meta.write_bytes(b"\x00" * meta.stat().st_size)
        rewrite_manifest_entry(tmp_path / "step_000004", "state/.metadata")
    resumed = CheckpointManager(tmp_path, keep=2, verify=how == "verify")
    with caplog.at_level(logging.WARNING, logger="z2all"):
        assert resumed.load_latest(fresh(seed=1))["step"] == 3
    assert saved_steps(tmp_path) == [3]
    assert (tmp_path / "ckpt_corrupt-000004").is_dir()
    assert any("ckpt_corrupt-000004" in r.getMessage() for r in caplog.records)
    resumed.save(5, TrainState.of(model, opt))
    assert saved_steps(tmp_path) == [3, 5]
    (tmp_path / "step_000005" / "manifest.json").unlink()  # the good previous one is loadable
    assert CheckpointManager(tmp_path).load_latest(fresh(seed=2))["step"] == 3


def _truncate(d: Path) -> None:
    f = next((d / "state").glob("*.distcp"))
    f.write_bytes(f.read_bytes()[:-7])


def _bitflip(d: Path) -> None:
    f = d / "rank_00000.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _no_manifest(d: Path) -> None:
    (d / "manifest.json").unlink()


def _garbage_manifest(d: Path) -> None:
    (d / "manifest.json").write_text("{not json")


@pytest.mark.parametrize("corrupt", [_truncate, _bitflip, _no_manifest, _garbage_manifest])
def test_fallback_to_previous_on_corrupt_newest(tmp_path, caplog, corrupt):
    mgr = save_two(tmp_path)
    corrupt(tmp_path / "step_000002")
    with caplog.at_level(logging.WARNING, logger="z2all"):
        manifest = mgr.load_latest(fresh(seed=3))
    assert manifest["step"] == 1
    assert any("step_000002" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_fallback_on_dcp_load_error(tmp_path, caplog):
    """Sizes and checksums agree but DCP cannot read the data: still a fallback, with a warning."""
    mgr = save_two(tmp_path, verify=False)
    meta = tmp_path / "step_000002" / "state" / ".metadata"
    meta.write_bytes(b"\x00" * meta.stat().st_size)
    rewrite_manifest_entry(tmp_path / "step_000002", "state/.metadata")
    with caplog.at_level(logging.WARNING, logger="z2all"):
        assert mgr.load_latest(fresh(seed=3))["step"] == 1
    assert any("step_000002 could not be loaded" in r.getMessage() for r in caplog.records)


def test_garbage_rank_file_is_corrupt_not_unsafe(tmp_path, caplog):
    """Bytes that are no pickle at all (manifest made to agree) fall back; only refused globals are
    'unsafe'."""
    mgr = save_two(tmp_path)
    (tmp_path / "step_000002" / "rank_00000.pt").write_bytes(b"not a torch file" * 8)
    rewrite_manifest_entry(tmp_path / "step_000002", "rank_00000.pt")
    with caplog.at_level(logging.WARNING, logger="z2all"):
        assert mgr.load_latest(fresh(seed=3))["step"] == 1
    assert any("not a readable torch file" in r.getMessage() for r in caplog.records)


def test_all_corrupt_is_an_error(tmp_path):
    mgr = save_two(tmp_path)
    _truncate(tmp_path / "step_000001")
    _bitflip(tmp_path / "step_000002")
    with pytest.raises(CorruptCheckpointError, match="no loadable checkpoint"):
        mgr.load_latest(fresh())


def test_model_mismatch_names_the_keys(tmp_path):
    mgr = save_two(tmp_path)
    with pytest.raises(
        CheckpointMismatchError, match=r"emb\.weight: checkpoint \(32, 16\) vs model \(40, 16\)"
    ):
        mgr.load_latest(fresh(cfg=TinyConfig(vocab=40)))


# --- weights_only refusal ---------------------------------------------------------------------

EXECUTED: list[str] = []


def _mark_executed() -> None:
    EXECUTED.append("ran")


class Payload:
    """Unpickling this calls ``_mark_executed``: proof that arbitrary code would run."""

    def __reduce__(self):
        return (_mark_executed, ())


def test_unsafe_rank_file_is_refused(tmp_path):
    mgr = save_two(tmp_path)
    d = tmp_path / "step_000002"
    torch.save({"rng": {}, "note": {"evil": Payload()}}, d / "rank_00000.pt")
    rewrite_manifest_entry(d, "rank_00000.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"rank_00000\.pt.*arbitrary unpickling"):
        mgr.load_latest(fresh())
    with pytest.raises(UnsafeCheckpointError, match="rank_00000.pt"):
        safe_torch_load(d / "rank_00000.pt")
    assert EXECUTED == []


def test_unsafe_dcp_metadata_is_refused(tmp_path):
    mgr = save_two(tmp_path)
    d = tmp_path / "step_000002"
    (d / "state" / ".metadata").write_bytes(pickle.dumps(Payload()))
    rewrite_manifest_entry(d, "state/.metadata")
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*_mark_executed"):
        mgr.load_latest(fresh())
    assert EXECUTED == []


def test_unloadable_per_rank_state_is_refused_at_save(tmp_path):
    """A per-rank component whose state would not load with ``weights_only``: refused before a byte
    is written (not even the tmp folder)."""
    model, opt = make()
    state = with_note(TrainState.of(model, opt), Note({"evil": Payload()}))
    with pytest.raises(ValueError, match=r"per-rank checkpoint state \(rng, note\)"):
        CheckpointManager(tmp_path).save(1, state)
    assert saved_steps(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert EXECUTED == []


def test_real_model_tied_embeddings_round_trip(tmp_path):
    """The loop's model (z2all.model, tied embeddings) with AdamW resumes bit-exactly."""
    from z2all.model import Z2allForCausalLM, get_preset

    def build(seed: int):
        torch.manual_seed(seed)
        m = Z2allForCausalLM(
            get_preset("tiny", vocab_size=128, num_hidden_layers=1, tie_word_embeddings=True)
        )
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    def step(m, opt) -> float:
        x = torch.randint(0, 128, (2, 16))
        loss = m(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    model, opt = build(0)
    step(model, opt)
    CheckpointManager(tmp_path).save(1, TrainState.of(model, opt))
    expected = [step(model, opt) for _ in range(2)]
    model2, opt2 = build(1)
    assert CheckpointManager(tmp_path).load_latest(TrainState.of(model2, opt2))["step"] == 1
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied after the load
    assert [step(model2, opt2) for _ in range(2)] == expected


def test_save_before_first_step_leaves_optimizer_fresh(tmp_path):
    """Saving at step 0 must not create AdamW state (a zero-lr step would shift its bias correction)."""
    model, opt = make()
    seed_all(4)
    path = CheckpointManager(tmp_path).save(0, TrainState.of(model, opt))
    assert not opt.state
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["components"] == {"shared": ["model"], "empty": ["optim"], "per_rank": ["rng"]}
    expected = [train_step(model, opt) for _ in range(2)]
    model2, opt2 = make(seed=9)
    train_step(model2, opt2)  # an optimizer with state: loading the fresh checkpoint clears it
    assert CheckpointManager(tmp_path).load_latest(TrainState.of(model2, opt2))["step"] == 0
    assert not opt2.state
    assert [train_step(model2, opt2) for _ in range(2)] == expected


class Refusing(Note):
    """A per-rank component that refuses the state it was saved with, as DataParallelModel refuses
    per-bucket optimizer state saved for other buckets (a ConfigError)."""

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            raise ConfigError("cannot resume the note: saved for other buckets")


def test_a_component_refusal_is_not_taken_for_damage(tmp_path):
    """A refusal stops the resume with the component's own message; no older checkpoint is tried and
    none is set aside as corrupt (damage would fall back)."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    for step in (1, 2):
        train_step(model, opt)
        mgr.save(step, with_note(TrainState.of(model, opt), Note({"buckets": step})))
    with pytest.raises(ConfigError, match="saved for other buckets"):
        CheckpointManager(tmp_path).load_latest(with_note(fresh(seed=1), Refusing()))
    assert saved_steps(tmp_path) == [1, 2] and not list(tmp_path.glob("ckpt_corrupt-*"))


def test_a_failed_attempt_leaves_nothing_behind_in_the_scaler(tmp_path):
    """The fallback loads the older checkpoint into the same objects: what the newer, failed attempt
    restored is replaced, here a loss scaler the older checkpoint saved as disabled ({})."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path)
    train_step(model, opt)
    mgr.save(1, TrainState.of(model, opt, scaler=LossScalerState(None)))
    used = loss_scaler(4.0)
    used.update(True)  # a tracker away from as built too
    mgr.save(2, TrainState.of(model, opt, scaler=LossScalerState(used)))
    # a readable rank file whose RNG state is malformed: the attempt fails in the LAST step of the
    # restore, after the shared components (the scaler among them) were loaded
    torch.save({"rng": {"version": 99}}, tmp_path / "step_000002" / "rank_00000.pt")
    rewrite_manifest_entry(tmp_path / "step_000002", "rank_00000.pt")
    live = loss_scaler(1024.0)
    state = TrainState.of(*make(seed=1), scaler=LossScalerState(live))
    assert CheckpointManager(tmp_path).load_latest(state)["step"] == 1
    # as built, not the 4.0 (and the spent hysteresis) the failed attempt loaded
    got = live.state_dict()
    assert float(got["scale"]) == 1024.0 and (got["growth_tracker"], got["hysteresis_tracker"]) == (0, 2)
