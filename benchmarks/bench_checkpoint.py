"""Cost of z2all's crash-safe checkpoints vs a plain ``torch.save`` / ``torch.load`` of the same state.

Model + AdamW state of a Llama model (one AdamW step taken so the moments exist). Measures, in the
same run and on the same disk: ``CheckpointManager.save`` (DCP + per-rank file + sha256 manifest +
fsync + rename) and ``load_latest`` (sha256 verification + DCP load) against ``torch.save`` of
``{"model": sd, "optim": osd}`` and ``torch.load(weights_only=True)``; also ``load_latest`` with
``verify=False`` (sizes only) to show what the checksums cost. Prints one JSON object; ratios are
z2all time / plain time (best of ``--repeat``).

``--world=W`` runs the z2all save and load on W gloo ranks holding the same (replicated) state: DCP
splits the writing and every rank hashes 1/W of the files, in parallel. ``sha256_all_one_rank_s`` is
what hashing the whole checkpoint costs one process (what rank 0 alone paid before format version 2).

    python benchmarks/bench_checkpoint.py                       # ~25M params, CPU, /tmp
    python benchmarks/bench_checkpoint.py --world=2             # the same state on 2 ranks
    python benchmarks/bench_checkpoint.py --dir=/fast/disk --hidden=1024 --layers=8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import free_port


def best_of(repeat: int, fn, collective: bool = False) -> float:
    times = []
    for _ in range(repeat):
        if collective and dist.is_initialized():
            dist.barrier()  # every rank starts the collective call together
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _model_and_optimizer(args):
    from z2all.model import Z2allForCausalLM, get_preset

    torch.manual_seed(0)
    cfg = get_preset(
        "tiny",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=args.hidden * 11 // 4,
        vocab_size=args.vocab,
    )
    model = Z2allForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (1, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    return model, opt


def _measure(rank: int, args, root: Path) -> dict | None:
    from z2all.training.checkpoint import CheckpointManager
    from z2all.training.checkpoint_format import files_under, sha256_file
    from z2all.training.state import TrainProgress, TrainState

    torch.set_num_threads(args.threads)
    model, opt = _model_and_optimizer(args)
    state = TrainState.of(model, opt, progress=TrainProgress())
    mgr = CheckpointManager(root / "z2all", keep=2)
    mgr_fast = CheckpointManager(root / "z2all", keep=2, verify=False)
    step = iter(range(1, 10_000))
    t_save = best_of(args.repeat, lambda: mgr.save(next(step), state), collective=True)
    t_load = best_of(args.repeat, lambda: mgr.load_latest(state), collective=True)
    t_load_fast = best_of(args.repeat, lambda: mgr_fast.load_latest(state), collective=True)
    if rank != 0:
        return None
    newest = sorted((root / "z2all").glob("step_*"))[-1]
    files = files_under(newest)
    t_hash_all = best_of(args.repeat, lambda: [sha256_file(f) for f in files])
    plain = root / "plain.pt"
    t_plain_save = best_of(
        args.repeat, lambda: torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, plain)
    )
    t_plain_load = best_of(args.repeat, lambda: torch.load(plain, map_location="cpu", weights_only=True))
    return {
        "world_size": args.world,
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "plain_bytes": plain.stat().st_size,
        "plain_save_s": round(t_plain_save, 4),
        "z2all_save_s": round(t_save, 4),
        "save_ratio": round(t_save / t_plain_save, 2),
        "sha256_all_one_rank_s": round(t_hash_all, 4),
        "plain_load_s": round(t_plain_load, 4),
        "z2all_load_verified_s": round(t_load, 4),
        "load_verified_ratio": round(t_load / t_plain_load, 2),
        "z2all_load_sizes_only_s": round(t_load_fast, 4),
        "load_sizes_only_ratio": round(t_load_fast / t_plain_load, 2),
        "repeat": args.repeat,
        "threads": args.threads,
    }


def _rank_main(rank: int, args, root: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        result = _measure(rank, args, Path(root))
        if result is not None:
            (Path(root) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--world", type=int, default=1, help="ranks saving the same state (gloo, this host)")
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_ckpt-", dir=args.dir))
    try:
        if args.world == 1:
            result = _measure(0, args, root)
        else:
            mp.spawn(_rank_main, args=(args, str(root), free_port()), nprocs=args.world, join=True)
            result = json.loads((root / "result.json").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
