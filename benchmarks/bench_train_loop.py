"""Overhead of z2all's training loop vs a bare hand-written step, same model, data and optimizer.

One process. The bare step is what any PyTorch tutorial writes: for each of G micro-batches,
forward, cross-entropy, ``(loss / G).backward()``; then ``clip_grad_norm_``, ``AdamW.step()``,
``zero_grad``. ``z2all.training.loop.train`` adds the sampler, collate, per-step metrics (a
``metrics.jsonl`` line, the stats all-reduce, the console line), the LR schedule and the
DataParallelModel indirection. Step times are medians after ``--warmup`` steps, best of
``--repeat`` alternating runs; the loop's come from its own timer (``tokens_per_s`` in
metrics.jsonl: sampler, collate, forward/backward, clip, step, stats reduction; not the
metrics-file write). ``loop_wall_s_incl_final_checkpoint`` is the whole ``train()`` call.
Prints one JSON object; ``overhead_ratio`` = loop step time / bare step time.

    python benchmarks/bench_train_loop.py                      # tiny-ish Llama, CPU, 1 thread
    python benchmarks/bench_train_loop.py --hidden=512 --layers=4 --seq=256 --threads=4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import bench_adamw, in_memory_train_config, make_bench_adamw, random_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="alternating bare/loop runs; best median of each")
    args = ap.parse_args()

    from z2all.model import Z2allForCausalLM, get_preset
    from z2all.training import train
    from z2all.training.build import Components
    from z2all.training.metrics import read_metrics
    from z2all.training.tasks import PretrainTask

    torch.set_num_threads(args.threads)
    mcfg = get_preset(
        "tiny",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
        max_position_embeddings=max(512, args.seq),
    )
    data = random_windows(args.vocab, args.batch * args.accum * (args.steps + 1), args.seq)

    def fresh():
        torch.manual_seed(0)
        model = Z2allForCausalLM(mcfg)
        return model, bench_adamw(model)

    def run_bare() -> list[float]:
        model, opt = fresh()
        times = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            for k in range(args.accum):
                i0 = (step * args.accum + k) * args.batch
                x = torch.stack([d[0] for d in data[i0 : i0 + args.batch]])
                y = torch.stack([d[1] for d in data[i0 : i0 + args.batch]])
                logits = model(x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), y.reshape(-1))
                (loss / args.accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times

    def run_loop() -> tuple[list[float], float]:
        model, _ = fresh()
        with tempfile.TemporaryDirectory() as out:
            cfg = in_memory_train_config(out, args, grad_clip=1.0)
            t0 = time.perf_counter()
            comp = Components(
                model=model, make_optimizer=make_bench_adamw, task=PretrainTask(), train_data=data
            )
            train(cfg, comp)
            wall = time.perf_counter() - t0
            recs = read_metrics(out)
        return [tokens_per_step / r["tokens_per_s"] for r in recs], wall

    tokens_per_step = args.batch * args.accum * args.seq
    # Alternate the two so that load from other processes hits both alike; keep each one's best median.
    bare_meds, loop_meds, walls = [], [], []
    for _ in range(args.repeat):
        bare_meds.append(statistics.median(run_bare()[args.warmup :]))
        loop_times, wall = run_loop()
        loop_meds.append(statistics.median(loop_times[args.warmup :]))
        walls.append(wall)
    model, _ = fresh()
    bare_med, loop_med = min(bare_meds), min(loop_meds)
    print(json.dumps({
        "benchmark": "train_loop_overhead",
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens_per_step,
        "threads": args.threads,
        "bare_step_s": round(bare_med, 5),
        "loop_step_s": round(loop_med, 5),
        "overhead_ratio": round(loop_med / bare_med, 4),
        "repeats": args.repeat,
        "loop_wall_s_incl_final_checkpoint": round(min(walls), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
