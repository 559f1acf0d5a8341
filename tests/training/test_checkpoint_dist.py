"""CheckpointManager across ranks (gloo, 2 processes): collective save/load through DDP, exact
resume per rank, and resume on a different world size in both directions."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.dist_utils import run_distributed
from tests.training.test_checkpoint import Note, make, rewrite_manifest_entry, train_step, with_note
from z2all.training.checkpoint import CheckpointManager
from z2all.training.checkpoint_safety import safe_torch_load
from z2all.training.rng_state import rank_seed, seed_all
from z2all.training.state import TrainState

SEED = 5


def _two_rank_run(rank: int, world: int, single_dir: str, out_dir: str) -> dict:
    # (1) Resume on 2 ranks from a checkpoint written by 1 process: rank 0 continues the saved RNG,
    #     rank 1 (new) is seeded from (seed, rank).
    model, opt = make(seed=50 + rank)
    # No seed given: the run's config.json supplies it (as when the loop does not pass one).
    manifest = CheckpointManager(single_dir).load_latest(TrainState.of(model, opt))
    from_single = {
        "step": manifest["step"],
        "rng_after": torch.get_rng_state(),
        "params": {k: v.clone() for k, v in model.state_dict().items()},
    }

    # (2) Save through a DDP wrapper, continue, then resume into fresh objects: same losses.
    model, opt = make(seed=0)
    ddp = DDP(model)
    seed_all(rank_seed(SEED, rank))
    mgr = CheckpointManager(out_dir, keep=2, seed=SEED)
    for _ in range(2):
        train_step(ddp, opt)
    mgr.save(2, with_note(TrainState.of(ddp, opt), Note({"rank_note": rank})))
    expected = [train_step(ddp, opt) for _ in range(2)]

    model2, opt2 = make(seed=100 + rank)
    ddp2 = DDP(model2)
    seed_all(12345)
    note = Note()
    step2 = mgr.load_latest(with_note(TrainState.of(ddp2, opt2), note))["step"]
    params_at_2 = {k: v.clone() for k, v in model2.state_dict().items()}
    got = [train_step(ddp2, opt2) for _ in range(2)]

    # (4) Collective fallback: checkpoint 4 is fine except rank 1's own file, which only rank 1
    #     reads (the manifest is made to agree, so rank 0 sees nothing wrong): both ranks fall
    #     back to checkpoint 2 together instead of diverging or hanging.
    mgr.save(4, TrainState.of(ddp2, opt2))
    params_at_4 = {k: v.clone() for k, v in model2.state_dict().items()}
    dist.barrier()
    if rank == 0:
        (Path(out_dir) / "step_000004" / "rank_00001.pt").write_bytes(b"not a torch file" * 8)
        rewrite_manifest_entry(Path(out_dir) / "step_000004", "rank_00001.pt")
    dist.barrier()
    model3, opt3 = make(seed=7)
    fallback_step = mgr.load_latest(TrainState.of(model3, opt3))["step"]
    fallback_ok = all(torch.equal(v, params_at_2[k]) for k, v in model3.state_dict().items())
    return {
        "fallback_step": fallback_step,
        "fallback_ok": fallback_ok,
        "from_single": from_single,
        "expected": expected,
        "got": got,
        "step2": step2,
        "note": note.state,
        "params_at_4": params_at_4,
    }


def test_two_ranks_save_resume_and_world_size_change(tmp_path):
    single_dir, out_dir = tmp_path / "single", tmp_path / "two"
    model, opt = make()
    seed_all(rank_seed(SEED, 0))
    train_step(model, opt)
    single_dir.mkdir()
    (single_dir / "config.json").write_text(json.dumps({"seed": SEED}))
    single_path = CheckpointManager(single_dir).save(1, TrainState.of(model, opt))
    assert json.loads((single_path / "manifest.json").read_text())["seed"] == SEED
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}

    res = run_distributed(_two_rank_run, 2, str(single_dir), str(out_dir))

    # (1) 1 -> 2 ranks: replicated model state on both; rank 0's RNG continues the saved stream,
    # rank 1's is the deterministic per-rank seed.
    saved_rng = safe_torch_load(single_path / "rank_00000.pt")["rng"]["torch_cpu"]
    seed_all(rank_seed(SEED, 1))
    rank1_rng = torch.get_rng_state()
    for r in range(2):
        assert res[r]["from_single"]["step"] == 1
        for k, v in saved_params.items():
            assert torch.equal(res[r]["from_single"]["params"][k], v), (r, k)
    assert torch.equal(res[0]["from_single"]["rng_after"], saved_rng)
    assert torch.equal(res[1]["from_single"]["rng_after"], rank1_rng)

    # (2) exact per-rank resume; each rank kept its own RNG (different data, different losses).
    for r in range(2):
        assert res[r]["got"] == res[r]["expected"], r
        assert res[r]["step2"] == 2 and res[r]["note"] == {"rank_note": r}
    assert res[0]["expected"] != res[1]["expected"]
    manifest_files = sorted(p.name for p in (out_dir / "step_000002").iterdir())
    assert manifest_files == ["manifest.json", "rank_00000.pt", "rank_00001.pt", "state"]

    assert [r["fallback_step"] for r in res] == [2, 2] and all(r["fallback_ok"] for r in res)

    # Replicated state is written once in total (DCP dedup), not once per rank.
    def distcp_bytes(d):
        return sum(f.stat().st_size for f in (d / "state").glob("*.distcp"))

    assert distcp_bytes(out_dir / "step_000002") < 1.1 * distcp_bytes(single_path)

    # The fallback set the skipped step 4 aside so rotation can never prefer it over step 2.
    assert not (out_dir / "step_000004").exists() and (out_dir / "ckpt_corrupt-000004").is_dir()

    # (3) 2 -> 1 process: the model state written by two ranks loads whole into one process (a
    # single process reads only rank_00000.pt, so step 4 is fine here: put it back).
    (out_dir / "ckpt_corrupt-000004").rename(out_dir / "step_000004")
    model1, opt1 = make(seed=77)
    manifest = CheckpointManager(out_dir, seed=SEED).load_latest(TrainState.of(model1, opt1))
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    for k, v in model1.state_dict().items():
        assert torch.equal(v, res[0]["params_at_4"][k]) and torch.equal(v, res[1]["params_at_4"][k]), k
    assert len(opt1.state_dict()["state"]) == len(list(model1.parameters()))


def _hashed_by_rank(rank: int, world: int, out_dir: str) -> dict:
    """Which files each rank hashes during a save (recorded around describe_files)."""
    from z2all.training import checkpoint as ckpt_mod

    seen: list[str] = []
    real = ckpt_mod.describe_files

    def recording(root, names):
        seen.extend(names)
        return real(root, names)

    ckpt_mod.describe_files = recording
    try:
        model, opt = make(seed=0)
        train_step(model, opt)
        CheckpointManager(out_dir, seed=SEED).save(1, TrainState.of(model, opt))
    finally:
        ckpt_mod.describe_files = real
    return {"hashed": sorted(seen)}


def test_each_rank_hashes_what_it_wrote(tmp_path):
    """Save cost scales: rank r hashes its own rank file and the DCP data file DCP named for it;
    rank 0 also the metadata. Together they are exactly the files the manifest lists."""
    res = run_distributed(_hashed_by_rank, 2, str(tmp_path))
    manifest = json.loads((tmp_path / "step_000001" / "manifest.json").read_text())
    assert res[1]["hashed"] == ["rank_00001.pt", "state/__1_0.distcp"], res[1]
    assert res[0]["hashed"] == ["rank_00000.pt", "state/.metadata", "state/__0_0.distcp"], res[0]
    assert sorted(res[0]["hashed"] + res[1]["hashed"]) == sorted(manifest["files"])
