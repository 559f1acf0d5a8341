"""Cost of z2all's crash-safe checkpoints vs a plain ``torch.save`` / ``torch.load`` of the same state.

Model + AdamW state of a Llama model (one AdamW step taken so the moments exist). Measures, in the
same run and on the same disk: ``CheckpointManager.save`` (DCP + per-rank file + sha256 manifest +
fsync + rename) and ``load_latest`` (sha256 verification + DCP load) against ``torch.save`` of
``{"model": sd, "optim": osd}`` and ``torch.load(weights_only=True)``; also ``load_latest`` with
``verify=False`` (sizes only) to show what the checksums cost. Prints one JSON object; ratios are
z2all time / plain time (best of ``--repeat``).

    python benchmarks/bench_checkpoint.py                       # ~25M params, CPU, /tmp
    python benchmarks/bench_checkpoint.py --dir=/fast/disk --hidden=1024 --layers=8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    args = ap.parse_args()

    from z2all.model import Z2allForCausalLM, get_preset
    from z2all.training.checkpoint import CheckpointManager

    torch.set_num_threads(args.threads)
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
    n_params = sum(p.numel() for p in model.parameters())

    root = Path(tempfile.mkdtemp(prefix="bench_ckpt-", dir=args.dir))
    try:
        plain = root / "plain.pt"
        mgr = CheckpointManager(root / "z2all", keep=2)
        mgr_fast = CheckpointManager(root / "z2all", keep=2, verify=False)
        step = iter(range(1, 10_000))

        t_plain_save = best_of(
            args.repeat, lambda: torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, plain)
        )
        t_plain_load = best_of(args.repeat, lambda: torch.load(plain, map_location="cpu", weights_only=True))
        t_save = best_of(args.repeat, lambda: mgr.save(next(step), model, opt, {"step": 0}))
        t_load = best_of(args.repeat, lambda: mgr.load_latest(model, opt))
        t_load_fast = best_of(args.repeat, lambda: mgr_fast.load_latest(model, opt))
        ckpt_bytes = sum(f.stat().st_size for f in sorted((root / "z2all").glob("step_*"))[-1].rglob("*"))
        result = {
            "params": n_params,
            "checkpoint_bytes": ckpt_bytes,
            "plain_bytes": plain.stat().st_size,
            "plain_save_s": round(t_plain_save, 4),
            "z2all_save_s": round(t_save, 4),
            "save_ratio": round(t_save / t_plain_save, 2),
            "plain_load_s": round(t_plain_load, 4),
            "z2all_load_verified_s": round(t_load, 4),
            "load_verified_ratio": round(t_load / t_plain_load, 2),
            "z2all_load_sizes_only_s": round(t_load_fast, 4),
            "load_sizes_only_ratio": round(t_load_fast / t_plain_load, 2),
            "repeat": args.repeat,
            "threads": args.threads,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
