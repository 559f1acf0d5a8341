"""ZeRO-1 (parallel.distributed_optimizer) against z2all DDP, torch's ZeroRedundancyOptimizer and FSDP2.

Default mode: ``--world-size`` ranks (CPU, gloo on loopback, 1 thread each) train the Llama ``tiny``
preset on the same random token windows (``_common.random_windows``) in five arms, every one with the
same inner optimizer (``torch.optim.AdamW(foreach=True)``, lr 1e-3, betas (0.9, 0.95), weight decay
0.1 on >= 2-D weights only) and a gradient clip at 1.0:

    z2all_ddp            parallel.DistributedDataParallel (all-reduce) + optimizer.FP32Optimizer
    z2all_zero1          the same DDP with use_distributed_optimizer=True (reduce-scatter) +
                         DistributedOptimizer (all-gather of the params after the step, waited there)
    z2all_zero1_overlap  the same, overlap_param_gather=True (each all-gather waited by the forward
                         pre-hook of the first module that needs it)
    torch_zero           torch DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)
    fsdp2                torch.distributed.fsdp.fully_shard on every decoder layer and the root

Step time: full steps (forward, backward, gradient sync, clip, AdamW, zero grads) in interleaved
rounds: round r runs ``--steps`` steps of every arm, in an order that rotates per round, after two
warm-up steps per arm. z2all_zero1_overlap's last step of a round includes ``finish_param_sync()``
(what its gathers still owe). Reported: median step time per arm and its ratio to z2all_ddp, the
per-round paired ratios (median, min, max), and the median host time of each phase: forward,
backward, grad_sync (z2all's finish_grad_sync; 0 for torch, whose waits end backward), optimizer
(clip + step, with ZeRO-1's all-gathers, torch ZeRO's broadcasts), zero_grad.

Wire bytes per step per rank, counted on a separate instance of each arm (one warm-up step, then one
counted step) by a wrapper around ``torch.distributed``'s collectives, charged as a ring
implementation sends them (d ranks, N elements of the FULL tensor, b bytes each): all_reduce
2(d-1)/d*N*b, reduce-scatter (d-1)/d*N*b (N = the input), all-gather (d-1)/d*N*b (N = the output),
broadcast (d-1)/d*N*b (a pipelined ring: d-1 of d ranks forward the message; the mean, charged to
every rank). torch DDP's C++ reducer calls no Python collective, so the counted torch_zero instance
registers torch's own ``allreduce_hook`` (same buckets, same bytes). Not counted: FSDP2's grad-norm
all-reduce (DTensor's functional collectives, one scalar). Split into grad (gradient reduction),
param (parameter all-gather/broadcast) and other (the small all-reduces: z2all ZeRO-1's used-param
flags, a uint8 per parameter, and its float64 squared norm).

Persistent bytes per parameter per rank (rank 0), measured from the tensors after a step: params,
grads, main params (beyond the weights), optimizer state (the step counters included); the z2all
arms exactly as held (the DDP buffers, padding included); torch_zero without the torch DDP reducer's
bucket copies of the gradients (another 4 B/param, not visible from Python); fsdp2 the local shards.

``--bytes_only``: ZeRO-1's persistent bytes per parameter per rank at d = 2 and 4 (one forward,
backward and step each) for ``tiny`` and the ``100m`` preset (hidden 768, 12 layers, vocab 32000,
untied: 134M parameters), three layouts, against the theory (12 B of AdamW state and fp32 main
params split over d; the weights and the full gradient buffer kept on every rank):

    fp32             fp32 weights (their own main params), fp32 grads   4 + 4 + 8/d
    bf16/fp32-grads  bf16 weights, fp32 grads, fp32 main shards          2 + 4 + 12/d
    bf16/bf16-grads  bf16 weights, bf16 grads, fp32 main shards          2 + 2 + 12/d

One JSON object on stdout (rank 0); progress on stderr.

    python benchmarks/bench_zero1.py                  # 2 ranks, tiny; ~30 s on 2 CPU cores
    python benchmarks/bench_zero1.py --rounds 10 --steps 10
    python benchmarks/bench_zero1.py --bytes_only     # d = 2 and 4, tiny and 100m; ~75 s, ~4 GB/rank
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import add_backend_args, free_port, init_rank, random_windows, resolve_backend
from torch import nn

from optimizer import FP32Optimizer, OptimizerConfig, weight_decay_param_groups
from parallel import DistributedDataParallel, DistributedDataParallelConfig
from parallel.distributed_optimizer import DistributedOptimizer
from parallel.wire_bytes import WireCounter, wire_bytes

ARMS = ("z2all_ddp", "z2all_zero1", "z2all_zero1_overlap", "torch_zero", "fsdp2")
CFG = OptimizerConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, backend="foreach")
LAYOUTS = {  # name -> (weights dtype, grad_reduce_in_fp32, theory(d) as (params, grads, main, state))
    "fp32": (torch.float32, True, lambda d: (4, 4, 0, Fraction(8, d))),
    "bf16/fp32-grads": (torch.bfloat16, True, lambda d: (2, 4, Fraction(4, d), Fraction(8, d))),
    "bf16/bf16-grads": (torch.bfloat16, False, lambda d: (2, 2, Fraction(4, d), Fraction(8, d))),
}


def log(msg: str) -> None:
    print(f"[bench_zero1 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the counting wrapper ---------------------------------------------------------------------------
def bytes_by_kind(calls) -> dict[str, float]:
    out = {k: wire_bytes(calls, {k}) for k in ("grad", "param", "other")}
    out["total"] = sum(out.values())
    return {k: float(v) for k, v in out.items()}


# ---- the arms ---------------------------------------------------------------------------------------
def _nbytes(tensors) -> int:
    total = 0
    for t in tensors:
        if torch.is_tensor(t):
            t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
            total += t.numel() * t.element_size()
    return total


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _nbytes(v for st in optimizer.state.values() for v in st.values())


PHASES = ("forward", "backward", "grad_sync", "optimizer", "zero_grad")


def _no_mark() -> None:
    pass


class Arm:
    """One way to train: ``step(ids, targets, inspect=None, mark=...)`` runs a full step (``inspect()``
    after the optimizer step, before gradients are dropped; ``mark()`` at the end of each of
    ``PHASES`` but the last); ``end_round()`` waits for what a step left in flight; ``kind`` labels a
    collective's tensor for WireCounter; ``held()`` the persistent bytes."""

    def __init__(self, name: str, base: nn.Module, args, device: torch.device, world: int, count: bool):
        self.name = name
        model = copy.deepcopy(base)
        groups = lambda params: weight_decay_param_groups(params, CFG.weight_decay)
        adamw = dict(lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps, foreach=True)
        self.end_round = lambda: None
        if name.startswith("z2all"):
            sharded = name != "z2all_ddp"
            ddp = DistributedDataParallel(
                DistributedDataParallelConfig(
                    use_distributed_optimizer=sharded, bucket_size=args.bucket_elems, first_bucket_size=None
                ),
                model,
            )
            if sharded:
                opt = DistributedOptimizer(ddp, CFG, overlap_param_gather=name.endswith("overlap"))
                self.end_round = opt.finish_param_sync
            else:
                opt = FP32Optimizer(groups(model.parameters()), CFG)
            storages = {}
            for buf in ddp.param_and_grad_buffers:
                storages[buf.grad_data.untyped_storage().data_ptr()] = "grad"
                storages[buf.param_data.untyped_storage().data_ptr()] = "param"
            self.kind = lambda op, t: storages.get(t.untyped_storage().data_ptr(), "other")

            def step(ids, tgt, inspect=None, mark=_no_mark):
                loss = ddp(ids, targets=tgt, return_logits=False).loss
                mark()
                loss.backward()
                mark()
                ddp.finish_grad_sync()
                mark()
                opt.step()
                mark()
                if inspect is not None:
                    inspect()
                opt.zero_grad()
                ddp.zero_grad_buffer()

            def held():
                bufs = ddp.param_and_grad_buffers
                if sharded:
                    shard = opt.shard_bytes()
                    main, state = shard["main_params"], shard["optimizer_state"]
                else:
                    main, state = 0, _state_bytes(opt.optimizer)  # fp32: the weights are the main params
                return {
                    "params": sum(b.param_data.numel() * b.param_data.element_size() for b in bufs),
                    "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in bufs),
                    "main_params": main,
                    "optimizer_state": state,
                }

            self.n_pad = sum(b.end - b.start for b in ddp.buckets)
            self.buckets = len(ddp.buckets)
        elif name == "torch_zero":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as torch_hooks
            from torch.distributed.optim import ZeroRedundancyOptimizer

            ids = [device.index] if device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=args.bucket_mb)
            if count:  # the C++ reducer calls no Python collective; torch's hook does, same buckets
                ddp.register_comm_hook(None, torch_hooks.allreduce_hook)
            opt = ZeroRedundancyOptimizer(
                groups(ddp.parameters()), optimizer_class=torch.optim.AdamW, **adamw
            )
            params = {p.untyped_storage().data_ptr() for p in ddp.parameters()}

            def kind(op, t):
                if t.untyped_storage().data_ptr() in params:
                    return "param"
                return "grad" if op == "all_reduce" else "other"

            self.kind = kind

            def step(ids, tgt, inspect=None, mark=_no_mark):
                loss = ddp(ids, targets=tgt, return_logits=False).loss
                mark()
                loss.backward()  # the reducer waits for its all-reduces at the end of backward
                mark()
                mark()
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), CFG.grad_clip)  # same grads on every rank
                opt.step()
                mark()
                if inspect is not None:
                    inspect()
                opt.zero_grad(set_to_none=True)

            def held():
                ps = list(ddp.parameters())
                return {
                    "params": _nbytes(ps),
                    "grads": _nbytes(p.grad for p in ps),  # + the reducer's buckets (not visible)
                    "main_params": 0,
                    "optimizer_state": _state_bytes(opt.optim),
                }
        elif name == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.AdamW(groups(model.parameters()), **adamw)
            self.kind = lambda op, t: {"all_gather_single": "param", "reduce_scatter_single": "grad"}.get(
                op, "other"
            )

            def step(ids, tgt, inspect=None, mark=_no_mark):
                loss = model(ids, targets=tgt, return_logits=False).loss
                mark()
                loss.backward()  # FSDP2 waits for its last reduce-scatter at the end of backward
                mark()
                mark()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.grad_clip)  # DTensor: all-reduce
                opt.step()
                mark()
                if inspect is not None:
                    inspect()
                opt.zero_grad(set_to_none=True)

            def held():
                ps = list(model.parameters())
                return {
                    "params": _nbytes(ps),
                    "grads": _nbytes(p.grad for p in ps),
                    "main_params": 0,
                    "optimizer_state": _state_bytes(opt),
                }
        else:
            raise ValueError(name)
        self.step, self.held = step, held


def _batch(data, step: int, rank: int, world: int, batch: int, device):
    """Rank ``rank``'s micro-batch of global step ``step``: the same windows for every arm."""
    per_step = world * batch
    start = (step * per_step) % len(data)
    rows = [data[(start + rank * batch + i) % len(data)] for i in range(batch)]
    ids = torch.stack([x for x, _ in rows]).to(device)  # (batch, seq)
    tgt = torch.stack([y for _, y in rows]).to(device)
    return ids, tgt


def worker(rank: int, world: int, port: int, args) -> None:
    device = init_rank(rank, world, port, args)
    try:
        from z2all.model import Z2allForCausalLM, get_preset

        torch.manual_seed(0)
        base = Z2allForCausalLM(get_preset("tiny")).to(device)
        n = sum(p.numel() for p in base.parameters())
        n_layers = sum(p.numel() for p in base.model.layers.parameters())
        data = random_windows(base.config.vocab_size, 16 * world * args.batch, args.seq)
        batch = lambda s: _batch(data, s, rank, world, args.batch, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        skipped: dict[str, str] = {}

        # 1) wire bytes and persistent bytes, each arm on its own instance
        wire, held, layout = {}, {}, {}
        for name in ARMS:
            try:
                arm = Arm(name, base, args, device, world, count=True)
            except Exception as e:  # every rank fails alike (same model, same torch)
                skipped[name] = f"{type(e).__name__}: {e}"
                log(f"rank {rank}: {name} unavailable: {skipped[name]}")
                continue
            arm.step(*batch(0))
            counter = WireCounter(arm.kind)
            measured: dict[str, int] = {}
            with counter:
                arm.step(*batch(1), inspect=lambda arm=arm, out=measured: out.update(arm.held()))
            arm.end_round()  # overlap: the gathers launched by this step complete before the next arm
            wire[name] = {**bytes_by_kind(counter.calls), "calls": len(counter.calls)}
            held[name] = measured
            if hasattr(arm, "n_pad"):
                layout[name] = {"padded_elements": arm.n_pad, "buckets": arm.buckets}
            del arm
            gc.collect()
        arms = [a for a in ARMS if a not in skipped]
        log(f"rank {rank}: counted; timing {arms}")

        # 2) step time, interleaved
        built = {name: Arm(name, base, args, device, world, count=False) for name in arms}
        step_no = dict.fromkeys(arms, 0)

        phases: dict[str, list[list[float]]] = {k: [] for k in arms}

        def run(name: str, last: bool = False) -> float:
            arm = built[name]
            sync()
            marks = [time.perf_counter()]
            arm.step(*batch(step_no[name]), mark=lambda: marks.append(time.perf_counter()))
            if last:
                arm.end_round()
            sync()
            marks.append(time.perf_counter())
            step_no[name] += 1
            phases[name].append([b - a for a, b in zip(marks, marks[1:])])
            return marks[-1] - marks[0]

        for name in arms:
            for _ in range(2):
                run(name, last=True)
            phases[name].clear()
        times: dict[str, list[float]] = {k: [] for k in arms}
        per_round: dict[str, list[float]] = {k: [] for k in arms}
        for r in range(args.rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            for name in order:
                dist.barrier()
                t = [run(name, last=i == args.steps - 1) for i in range(args.steps)]
                times[name] += t
                per_round[name].append(statistics.median(t))
            log(f"rank {rank}: round {r + 1}/{args.rounds}")

        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"wire": wire, "held": held})
        if rank == 0:
            for r, g in enumerate(gathered):
                if g["wire"] != wire:
                    log(f"WARNING: rank {r} counted other wire bytes than rank 0: {g['wire']}")
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ref = "z2all_ddp"
            ring = (world - 1) / world
            n_pad = layout[ref]["padded_elements"]
            result = {
                "benchmark": "zero1",
                "world_size": world,
                "backend": args.backend,
                "device": str(device),
                "threads_per_rank": torch.get_num_threads(),
                "model": "tiny",
                "params": n,
                "micro_batch": args.batch,
                "seq": args.seq,
                "bucket_mb": args.bucket_mb,
                "z2all_buckets": layout,
                "timed_steps_per_arm": args.rounds * args.steps,
                "median_step_ms": {k: round(v, 2) for k, v in med.items()},
                "ratio_vs_z2all_ddp": {k: round(v / med[ref], 3) for k, v in med.items()},
                "paired_round_ratio_vs_z2all_ddp": {
                    k: [
                        round(f(a / b for a, b in zip(v, per_round[ref])), 3)
                        for f in (statistics.median, min, max)
                    ]
                    for k, v in per_round.items()
                },
                # host-side, per phase (CPU: exact; CUDA: where the host waited)
                "median_phase_ms": {
                    k: {ph: round(statistics.median(x[i] for x in v) * 1e3, 2) for i, ph in enumerate(PHASES)}
                    for k, v in phases.items()
                },
                "wire_convention": "ring, per rank: all_reduce 2(d-1)/d*N*b, reduce-scatter and all-gather "
                "(d-1)/d*N*b, broadcast (d-1)/d*N*b (mean over ranks); N = elements of the full tensor",
                "wire_bytes_per_step_per_rank": wire,
                "wire_ratio_vs_z2all_ddp": {
                    k: round(v["total"] / wire[ref]["total"], 4) for k, v in wire.items()
                },
                "wire_theory_per_rank": {
                    "z2all_ddp": 2 * ring * n_pad * 4,
                    "z2all_zero1": 2 * ring * n_pad * 4,
                    "torch_zero": 3 * ring * n * 4,
                    # reshard_after_forward: the layers' params are all-gathered in forward and again
                    # in backward, the root's (embedding, final norm, lm_head) once; grads reduce-scattered
                    "fsdp2": ring * 4 * (2 * n_layers + (n - n_layers)) + ring * 4 * n,
                },
                "persistent_bytes_per_param_rank0": {
                    k: {**{c: round(b / n, 3) for c, b in v.items()}, "total": round(sum(v.values()) / n, 3)}
                    for k, v in held.items()
                },
                "persistent_total_bytes_per_param_by_rank": {
                    k: [round(sum(g["held"][k].values()) / n, 3) for g in gathered] for k in held
                },
                "persistent_theory_total": {
                    "z2all_ddp": 16,
                    "z2all_zero1": 8 + 8 / world,
                    "z2all_zero1_overlap": 8 + 8 / world,
                    "torch_zero": f"{4 + 4 + 8 / world} (+4 in torch DDP's reducer buckets, not counted)",
                    "fsdp2": 16 / world,
                },
                "skipped_arms": skipped,
                "not_counted": "FSDP2's grad-norm all-reduce (DTensor functional collective, one scalar)",
            }
            print(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


# ---- --bytes_only -----------------------------------------------------------------------------------
def bytes_worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    device = init_rank(rank, world, port, args)
    try:
        from z2all.model import Z2allForCausalLM, get_preset

        out = {}
        for preset in args.presets:
            for layout, (dtype, grads_fp32, _) in LAYOUTS.items():
                torch.manual_seed(0)
                model = Z2allForCausalLM(get_preset(preset)).to(device=device, dtype=dtype)
                n = sum(p.numel() for p in model.parameters())
                ddp = DistributedDataParallel(
                    DistributedDataParallelConfig(
                        use_distributed_optimizer=True, grad_reduce_in_fp32=grads_fp32
                    ),
                    model,
                )
                opt = DistributedOptimizer(ddp, CFG)
                data = random_windows(model.config.vocab_size, world, args.bytes_seq)
                ids, tgt = _batch(data, 0, rank, world, 1, device)
                ddp(ids, targets=tgt, return_logits=False).loss.backward()
                ddp.finish_grad_sync()
                stepped, _, _ = opt.step()
                assert stepped
                bufs = ddp.param_and_grad_buffers
                shard = opt.shard_bytes()
                out[(preset, layout)] = {
                    "num_params": n,
                    "padded_elements": sum(b.end - b.start for b in ddp.buckets),
                    "params": sum(b.param_data.numel() * b.param_data.element_size() for b in bufs),
                    "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in bufs),
                    "main_params": shard["main_params"],
                    "optimizer_state": shard["optimizer_state"],
                }
                opt.remove_hooks()
                del model, ddp, opt, ids, tgt, shard, bufs
                gc.collect()
                dist.barrier()
                log(f"d={world} rank {rank}: {preset} {layout} done")
            out[(preset, "peak_rss_mb")] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        torch.save(out, Path(out_dir) / f"d{world}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def bytes_only(args) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for world in args.bytes_worlds:
            log(f"--bytes_only: d={world}")
            mp.spawn(bytes_worker, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
            ranks = [torch.load(Path(out_dir) / f"d{world}_rank{r}.pt") for r in range(world)]
            for preset in args.presets:
                entry = results.setdefault(preset, {"num_params": ranks[0][(preset, "fp32")]["num_params"]})
                peak = max(r[(preset, "peak_rss_mb")] for r in ranks)
                entry.setdefault("peak_rss_mb_per_rank", {})[f"d={world}"] = round(peak)
                for layout, (_, _, theory) in LAYOUTS.items():
                    n = ranks[0][(preset, layout)]["num_params"]
                    comps = ("params", "grads", "main_params", "optimizer_state")
                    th = dict(zip(comps, theory(world)))
                    th_total = float(sum(th.values()))
                    per_rank = [sum(r[(preset, layout)][c] for c in comps) / n for r in ranks]
                    worst = max(per_rank, key=lambda v: abs(v - th_total))
                    entry.setdefault(layout, {})[f"d={world}"] = {
                        "measured_rank0": {c: round(ranks[0][(preset, layout)][c] / n, 6) for c in comps},
                        "theory": {c: round(float(v), 4) for c, v in th.items()},
                        "measured_total_by_rank": [round(v, 6) for v in per_rank],
                        "theory_total": round(th_total, 4),
                        "max_rel_error": float(f"{abs(worst - th_total) / th_total:.3g}"),
                        "padding_elements_per_param": float(
                            f"{ranks[0][(preset, layout)]['padded_elements'] / n - 1:.3g}"
                        ),
                    }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--bucket-mb", type=float, default=0.5, help="bucket size for every DDP (MiB of fp32)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=8, help="timed steps per arm per round")
    g = p.add_argument_group("--bytes_only")
    g.add_argument("--bytes_only", action="store_true", help="persistent bytes/param of ZeRO-1 only")
    g.add_argument("--bytes-worlds", dest="bytes_worlds", type=int, nargs="+", default=[2, 4])
    g.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    g.add_argument("--bytes-seq", dest="bytes_seq", type=int, default=32)
    add_backend_args(p)
    args = p.parse_args()
    args.bucket_elems = int(args.bucket_mb * 2**20) // 4
    if args.bytes_only:
        for w in args.bytes_worlds:
            args.world_size = max(args.world_size, w)
        resolve_backend(p, args)
        t0 = time.perf_counter()
        result = bytes_only(args)
        print(
            json.dumps(
                {
                    "benchmark": "zero1_bytes_per_param",
                    "theory": "params + grads + main_params + optimizer_state per rank: fp32 4+4+0+8/d, "
                    "bf16/fp32-grads 2+4+4/d+8/d, bf16/bf16-grads 2+2+4/d+8/d",
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "presets": result,
                },
                indent=2,
            )
        )
        return
    resolve_backend(p, args)
    mp.spawn(worker, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
