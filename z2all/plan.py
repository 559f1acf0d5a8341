"""``python -m z2all.plan``: will a run fit on the GPUs, and what will each rank send? Ask before renting.

    python -m z2all.plan --model_config=1.7b --nnodes=2 --nproc_per_node=8 --train_batch_size=4 \\
        --max_seq_len=2048 --params_dtype=bfloat16 --dtype=bfloat16 --use_distributed_optimizer \\
        [--bandwidth_gbps=100 | --bandwidth_from=cluster.json] [--gpu_memory_gb=80] [--json]

The trainer's own flags (``train_my_ddp.py --help``, a JSON config file first too: the trainer's parser
reads them) plus :class:`PlanConfig`'s. Printed (``--json``: one object), per GPU of rank 0, the fullest:

- state: weights, gradients, fp32 main params, AdamW moments, from the real model built on the meta
  device (no memory), laid out by the real ``ParamAndGradBuffer`` (padding included) and sharded by the
  real ZeRO-1 ``owned_slices``: what ``run_info.json``'s ``bytes_per_param`` measures;
- activations: what one micro-batch's forward saves for backward, tensor by tensor
  (:func:`activation_bytes`), and the largest transient on top (:func:`workspace_bytes`);
- communication: the collectives of one optimizer step (:func:`comm_calls`) charged by
  ``parallel.wire_bytes``' ring model, timed at ``--bandwidth_gbps`` or at what ``python -m
  z2all.cluster_check --out=FILE`` measured (``--bandwidth_from=FILE``).

A run that does not fit is re-planned with ZeRO-1, 16-bit weights, smaller micro-batches, more nodes
(:func:`suggestions`). Tests: tests/tools/test_plan.py; formulas: docs/planning.md. Exit status: 0 it
fits; 1 it does not fit or the trainer would refuse the world size; 2 a bad flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallel import DistributedDataParallelConfig
from parallel.distributed_optimizer.shard_map import owned_slices
from parallel.param_and_grad_buffer import ParamAndGradBuffer
from parallel.wire_bytes import Call, wire_bytes
from z2all.cli_args import USER_ERROR, parse_dataclass_args
from z2all.log import setup_logging
from z2all.model import Z2allConfig, Z2allForCausalLM, get_preset, kernels, list_presets
from z2all.model.kernels.cross_entropy import chunk_rows
from z2all.training.build import PARAMS_DTYPES, padded_vocab, resolve_model_config
from z2all.training.config import ConfigError, TrainConfig, parse_args

PROG = "python -m z2all.plan"
GIB = 2**30
STATE_KEYS = ("params", "grads", "main_params", "optimizer_state")  # run_info.json's bytes_per_param
# torch has a fused CUDA RMSNorm (saves x and rstd) where this op exists; the CPU runs a decomposition
_CUDA_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")


@dataclass(frozen=True)
class PlanConfig:
    """The planner's own flags; everything about the run itself is the trainer's TrainConfig."""

    nnodes: int = 1
    """Machines of the cluster."""
    nproc_per_node: int = 1
    """Ranks (GPUs) per machine; the world size is nnodes x nproc_per_node."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB (2**30 bytes), e.g. the total torch.cuda.mem_get_info() reports."""
    reserved_gb: float = 1.0
    """GiB per GPU kept free for what no tensor of the run accounts for (CUDA context outside torch's
    allocator, NCCL buffers, allocator rounding): a round allowance, not a measurement."""
    bandwidth_gbps: float = 0.0
    """Bus bandwidth (GB/s = 1e9 bytes/s, nccl-tests' busbw) of every collective; 0: none given."""
    bandwidth_from: str = ""
    """JSON written by ``python -m z2all.cluster_check --out=FILE``: its measured bus bandwidths."""
    vocab_size: int = 0
    """The tokenizer's vocabulary (padded to 64 like the trainer); 0: the preset's (or the JSON's)."""
    json: bool = False
    """Print one JSON object instead of the table."""

    def __post_init__(self) -> None:
        lows = {"nnodes": 1, "nproc_per_node": 1, "reserved_gb": 0, "bandwidth_gbps": 0, "vocab_size": 0}
        for name, low in lows.items():
            if not low <= getattr(self, name) < float("inf"):  # NaN fails too
                raise ValueError(f"--{name} must be a finite number >= {low}, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_gb < float("inf"):
            raise ValueError(f"--gpu_memory_gb must be a finite number > 0, got {self.gpu_memory_gb}")
        if self.bandwidth_gbps and self.bandwidth_from:
            raise ValueError("give --bandwidth_gbps or --bandwidth_from, not both")

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node


# --------------------------------------------------------------------------------------- the state
@dataclass(frozen=True)
class Layout:
    """How the trainer holds the parameters on ``world`` ranks (the choice DataParallelModel makes)."""

    impl: str  # "none": the bare module; "torch": torch DDP; "z2all": our buffers (parallel/)
    world: int
    numels: tuple[int, ...]  # trainable parameters in registration order, a tied weight once
    buffer: ParamAndGradBuffer | None  # z2all: the real buffer layout, on the meta device
    param_bytes: int  # per weight element
    grad_bytes: int  # per gradient element

    @classmethod
    def of(cls, shapes: Sequence[torch.Size], cfg: TrainConfig, world: int) -> Layout:
        half = cfg.params_dtype != "float32"
        if world == 1:  # 16-bit weights and ZeRO-1 live in the z2all buffers on one process too
            impl = "z2all" if half or cfg.use_distributed_optimizer else "none"
        else:
            impl = cfg.ddp_impl
        dtype = PARAMS_DTYPES[cfg.params_dtype]
        grad_dtype = torch.float32 if cfg.grad_reduce_in_fp32 else dtype
        buffer = None
        if impl == "z2all":
            params = [nn.Parameter(torch.empty(s, dtype=dtype, device="meta")) for s in shapes]
            # as parallel.DistributedDataParallel builds it for parameters of one dtype, with the caps
            # z2all.training.parallelize gives it: one buffer, the small first bucket, the used-flags tail
            first = min(DistributedDataParallelConfig.first_bucket_size, cfg.bucket_size)
            align = DistributedDataParallelConfig.bucket_alignment
            buffer = ParamAndGradBuffer(
                params, dtype, grad_dtype, world, cfg.bucket_size, first, align, 0, tail_reserve=len(params)
            )
        numels = tuple(int(torch.Size(s).numel()) for s in shapes)
        return cls(impl, world, numels, buffer, dtype.itemsize, grad_dtype.itemsize)


def model_shapes(mc: Z2allConfig) -> list[torch.Size]:
    """Shapes of the model's trainable parameters in registration order, a tied weight once (the
    real model, built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Z2allForCausalLM(mc)
    return [p.shape for p in model.parameters() if p.requires_grad]


def state_bytes(layout: Layout, cfg: TrainConfig, rank: int) -> dict[str, int]:
    """Bytes rank ``rank`` holds once a step has run, keyed like run_info.json's ``bytes_per_param``,
    plus ``ddp_buckets`` (torch DDP's own gradient copies, which run_info.json does not count)."""
    n_params, n_tensors = sum(layout.numels), len(layout.numels)
    half = layout.param_bytes != 4
    out = {
        "params": n_params * layout.param_bytes,
        "grads": n_params * 4,  # each .grad (fp32 weights: no 16-bit weights without our buffers)
        "main_params": n_params * 4 if half else 0,  # optimizer.MainParams: fp32 copies of 16-bit weights
        # AdamW: exp_avg + exp_avg_sq in fp32, and a 4-byte `step` tensor per parameter tensor
        "optimizer_state": 8 * n_params + 4 * n_tensors,
        "ddp_buckets": n_params * 4 if layout.impl == "torch" else 0,
    }
    if layout.buffer is not None:
        padded = layout.buffer.numel  # every bucket padded to lcm(world, 128), the flags tail included
        out["params"] = padded * layout.param_bytes
        out["grads"] = padded * layout.grad_bytes  # main_grad; .grad is a view of it when dtypes agree
        if half and layout.grad_bytes != layout.param_bytes and cfg.overlap_optim_step and layout.world > 1:
            out["grads"] += n_params * layout.param_bytes  # 16-bit .grad copies for the bucket optimizers
        if cfg.use_distributed_optimizer:  # ZeRO-1: fp32 main shards and moments of the owned slices only
            mine = owned_slices([layout.buffer], rank, layout.world)
            owned = sum(s.numel for s in mine)
            out["main_params"] = 4 * owned if half else 0  # fp32 weights are their own main shards
            out["optimizer_state"] = 8 * owned + 4 * max(len(mine), 1)  # no slice: a stand-in tensor
    return out


# ------------------------------------------------------------------------------------- activations
def activation_bytes(mc: Z2allConfig, cfg: TrainConfig, backends: dict[str, str]) -> dict[str, int]:
    """Bytes one micro-batch's forward (``--task_type=pretrain``/``sft``: the fused loss, no logits)
    saves for backward, by part: every saved tensor's storage once, parameters not counted.

    ``backends``: ``{op: kernel backend}`` (z2all.model.kernels). Shapes: N = B*T tokens, h hidden, kv
    the key/value width, i the MLP width, H heads of D, V vocab. The residual stream is in the weights'
    dtype (fp32 under autocast); matmuls, attention and the MLP in --dtype.
    """
    B, T = cfg.train_batch_size, cfg.max_seq_len
    N, h, i, V, L = B * T, mc.hidden_size, mc.intermediate_size, mc.vocab_size, mc.num_hidden_layers
    H, D = mc.num_attention_heads, mc.head_dim
    kv = mc.num_key_value_heads * D
    p = PARAMS_DTYPES[cfg.params_dtype].itemsize  # weights and residual stream
    c = PARAMS_DTYPES[cfg.dtype].itemsize  # compute
    autocast = p == 4 and c == 2
    cuda = cfg.device == "cuda"
    # RMSNorm, whose input x is the residual stream (saved by nothing else)
    if backends["rms_norm"] == "eager":
        norm = N * h * 4 + N * 4 + N * h * p  # x.float() (x itself in fp32), rstd, normalised x cast back
    elif backends["rms_norm"] == "torch" and not (cuda and _CUDA_FUSED_RMS_NORM):
        norm = 2 * N * h * 4 + N * 4  # torch's decomposition: x and normalised x in fp32, rstd
    else:
        norm = N * h * p + N * 4  # a fused kernel: x and the fp32 rstd
    if backends["attention"] == "eager":
        # q, and k, v repeated to H heads; the output; fp32 probabilities (and their cast); the mask
        attn = 4 * N * h * c + B * H * T * T * (4 + (c if c != 4 else 0)) + T * T
    else:
        # flash-style kernels (SDPA, flash-attn): q, k, v after RoPE, the output, an fp32 log-sum-exp
        # per query (CUDA's memory-efficient kernel, the one for fp32, pads it to 32 queries)
        lse_t = -(-T // 32) * 32 if cuda and c == 4 else T
        attn = 2 * N * h * c + 2 * N * kv * c + B * H * lse_t * 4
    layer = {
        "norms": 2 * norm,
        # the two norm outputs, each read by its linears; autocast casts them once per linear (q k v gate up)
        "matmul inputs": 5 * N * h * c if autocast else 2 * N * h * p,
        "attention": attn,
        "rope tables": 2 * T * D * c if c != 4 else 0,  # cos and sin cast to the compute dtype, per layer
        # gate, silu(gate), up, their product (liger recomputes silu in backward)
        "mlp": (3 if backends["swiglu"] == "liger" else 4) * N * i * c,
        # dropout masks of the two residual branches: bool on CUDA, the branch's dtype on CPU
        "dropout masks": 2 * N * h * (1 if cuda else c) if mc.hidden_dropout > 0 else 0,
        # autocast keeps a 16-bit copy of every linear weight until backward
        "autocast weight copies": 2 * (2 * h * h + 2 * h * kv + 3 * h * i) if autocast else 0,
    }
    out = {f"layers: {k}": L * v for k, v in layer.items() if v}
    out["final norm"] = norm
    # fused linear + cross entropy (torch_chunked, liger): d loss / d hidden and d loss / d lm_head are
    # computed in forward and saved, in the dtypes of hidden and of the weight
    out["loss gradients"] = N * h * p + V * h * p
    out["token ids"] = N * 8
    if c == 4:
        out["rope tables"] = 2 * T * D * 4  # fp32 compute: the fp32 tables, shared by every layer
    return out


def workspace_bytes(mc: Z2allConfig, cfg: TrainConfig) -> int:
    """The largest transient on top of the saved activations: the fused loss's forward (one fp32 chunk
    of logits, the fp32 d loss / d lm_head accumulator, 16-bit operand copies) or one MLP backward
    (gradients of the product, gate and up, and of the residual stream), whichever is larger."""
    N, h, i, V = cfg.train_batch_size * cfg.max_seq_len, mc.hidden_size, mc.intermediate_size, mc.vocab_size
    p, c = PARAMS_DTYPES[cfg.params_dtype].itemsize, PARAMS_DTYPES[cfg.dtype].itemsize
    rows = chunk_rows(V, torch.device(cfg.device))
    loss = rows * V * (4 + (c if c != 4 else 0)) + (V * h * 4 if p != 4 else 0) + (V * h * c if p != c else 0)
    loss += N * h * c if p != c else 0
    return max(loss, 3 * N * i * c + 2 * N * h * p)


# ----------------------------------------------------------------------------------- communication
def comm_calls(layout: Layout, cfg: TrainConfig) -> list[Call]:
    """The collectives one rank issues per optimizer step, as parallel.wire_bytes' ``Call`` tuples
    ``(op, numel, element size, world, kind)``; gradient-accumulation micro-steps send nothing."""
    W = layout.world
    if W == 1:
        return []
    n_tensors, calls = len(layout.numels), []
    hook = cfg.comm_hook if cfg.comm_hook in ("fp16", "bf16") else None  # PowerSGD: charged uncompressed
    hooked = cfg.comm_hook != "allreduce" or cfg.overlap_optim_step  # any comm hook of the DDP
    if layout.buffer is None:  # torch DDP: its C++ all-reduce of every gradient, unpadded buckets
        calls.append(("all_reduce", sum(layout.numels), 2 if hook else 4, W, "grads"))
    else:
        for b in layout.buffer.buckets:
            n = b.end - b.start  # padded (the used-flags tail in the last bucket's padding)
            if cfg.use_distributed_optimizer:
                calls.append(("reduce_scatter_single", n, layout.grad_bytes, W, "grads"))
            else:
                calls.append(("all_reduce", n, 2 if hook else layout.grad_bytes, W, "grads"))
        if hooked or cfg.use_distributed_optimizer:  # the used flags ride along only in our own all-reduce
            calls.append(("all_reduce", n_tensors, 1, W, "flags"))  # one byte a parameter
    if cfg.dtype == "float16":
        calls.append(("all_reduce", 1, 4, W, "scalars"))  # the loss scaler's found-inf flag
    if cfg.use_distributed_optimizer:
        calls.append(("all_reduce", 1, 8, W, "scalars"))  # squared norm of the sharded gradients
        calls += [
            ("all_gather_single", b.end - b.start, layout.param_bytes, W, "params")
            for b in layout.buffer.buckets
        ]
    return calls  # plus the loop's one all-reduce of a few float64 (loss, tokens, flags): not charged


def read_bandwidth(path: str) -> dict[str, Any]:
    """The bus bandwidths a ``cluster_check --out`` file holds (GB/s per collective) and its world."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        out = {k: float(data["bus_bandwidth_gbps"][k]) for k in ("all_reduce", "all_gather")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:  # FileNotFoundError: an OSError
        raise ValueError(f"--bandwidth_from={path}: not a cluster_check --out file ({e!r})") from None
    if not all(v > 0 for v in out.values()):
        raise ValueError(f"--bandwidth_from={path}: no bandwidth measured (a one-rank check?): {out}")
    return {**out, "world_size": data.get("world_size")}


# --------------------------------------------------------------------------------------- the plan
def plan(cfg: TrainConfig, pc: PlanConfig, mc: Z2allConfig, shapes=None, suggest: bool = True) -> dict:
    """Everything the tool prints, as JSON-able data (see the module docstring)."""
    shapes = shapes if shapes is not None else model_shapes(mc)
    layout = Layout.of(shapes, cfg, pc.world)
    # ZeRO-1: padding sits at the end of each bucket, in the last shards, so rank 0 owns the most
    # elements (another rank may own slices of a few more tensors: 4 bytes of AdamW step each)
    state = state_bytes(layout, cfg, 0)
    backends = kernels.active_backends(mc.kernels)
    acts = activation_bytes(mc, cfg, backends)
    memory = {**state, "activations": sum(acts.values()), "workspace": workspace_bytes(mc, cfg)}
    memory["reserved"] = int(pc.reserved_gb * GIB)
    memory["total"] = sum(memory.values())
    n_params = sum(layout.numels)
    calls = comm_calls(layout, cfg)
    out: dict[str, Any] = {
        "model": {"model_config": cfg.model_config, "num_params": n_params, **mc.to_dict()},
        "world_size": pc.world,
        "nnodes": pc.nnodes,
        "nproc_per_node": pc.nproc_per_node,
        "device": cfg.device,
        "kernel_backends": backends,
        "train_config": cfg.to_dict(),
        "ddp": layout.impl,
        "buckets": len(layout.buffer.buckets) if layout.buffer is not None else None,
        "memory_bytes": memory,
        "activation_bytes": acts,
        "bytes_per_param": {k: round(state[k] / n_params, 3) for k in STATE_KEYS},  # as run_info.json
        "gpu_memory_bytes": int(pc.gpu_memory_gb * GIB),
        "fits": memory["total"] <= pc.gpu_memory_gb * GIB,
        "comm": _comm_report(calls, pc),
        "problems": [],  # what the trainer would refuse (exit status 1)
    }
    try:
        cfg.check_world_size(pc.world)
    except ConfigError as e:
        out["problems"].append(f"the trainer would refuse this world size: {e}")
    if suggest and not out["fits"]:
        out["suggestions"] = suggestions(cfg, pc, mc, shapes)
    return out


def _comm_report(calls: list[Call], pc: PlanConfig) -> dict[str, Any]:
    bw, source = None, None
    if pc.bandwidth_gbps:
        bw, source = dict.fromkeys(("all_reduce", "all_gather"), pc.bandwidth_gbps), "--bandwidth_gbps"
    elif pc.bandwidth_from:
        bw, source = read_bandwidth(pc.bandwidth_from), pc.bandwidth_from
        if bw.pop("world_size") != pc.world:
            source += f" (measured on another world size than the {pc.world} ranks planned)"
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for call in calls:
        op, numel, size, _, kind = call
        g = groups.setdefault(
            (op, kind), {"op": op, "kind": kind, "calls": 0, "elements": 0, "wire_bytes": 0}
        )
        g.update(calls=g["calls"] + 1, elements=g["elements"] + numel, bytes_per_element=size)
        g["wire_bytes"] += int(wire_bytes([call]))
    seconds = None
    if bw is not None:  # time = wire bytes / bus bandwidth; a reduce-scatter costs what an all-gather does
        rate = lambda op: bw["all_reduce" if op == "all_reduce" else "all_gather"] * 1e9  # noqa: E731
        seconds = sum(g["wire_bytes"] / rate(g["op"]) for g in groups.values())
    return {
        "wire_bytes_per_step": int(wire_bytes(calls)),
        "collectives": list(groups.values()),
        "bus_bandwidth_gbps": bw,
        "bandwidth_source": source,
        "seconds_per_step": seconds,
    }


# ZeRO-1 and what it cannot run with; 16-bit weights (which need our buffers)
_ZERO = dict(
    use_distributed_optimizer=True, ddp_impl="z2all", comm_hook="allreduce", overlap_optim_step=False
)
_HALF = dict(params_dtype="bfloat16", dtype="bfloat16", ddp_impl="z2all")


def _multiple(n: int, of: int) -> int:
    """The smallest multiple of ``of`` that is >= ``n`` (the trainer deals accumulation steps to ranks)."""
    return -(-n // of) * of


def _first(lo: int, hi: int, ok) -> int:
    """The smallest n in (lo, hi] with ok(n), for ok false up to some point and true from there on."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def suggestions(cfg: TrainConfig, pc: PlanConfig, mc: Z2allConfig, shapes) -> list[dict[str, Any]]:
    """Changes that make the run fit, each re-planned (not guessed): ZeRO-1; 16-bit weights; the largest
    micro-batch that fits, as it is and with ZeRO-1 (the accumulation raised to keep the tokens per
    step); the fewest nodes with ZeRO-1 (its shards are all that more ranks shrink), up to 64x. Those
    that fit, or when none does, every one with what it would need."""
    limit = pc.gpu_memory_gb * GIB

    def total(c: TrainConfig, p: PlanConfig = pc) -> int:
        return plan(c, p, mc, shapes, suggest=False)["memory_bytes"]["total"]

    def entry(c: TrainConfig, p: PlanConfig = pc) -> dict[str, Any]:
        t, fields = total(c, p), dataclasses.fields(TrainConfig)
        flags = {f.name: getattr(c, f.name) for f in fields if getattr(c, f.name) != getattr(cfg, f.name)}
        flags.update({"nnodes": p.nnodes} if p.nnodes != pc.nnodes else {})
        text = " ".join(f"--{k}" if v is True else f"--{k}={str(v).lower()}" for k, v in flags.items())
        return {"flags": text, "total_bytes": t, "fits": t <= limit}

    def smaller(base: TrainConfig, b: int) -> TrainConfig:
        accum = _multiple(-(-base.gradient_accumulation_steps * base.train_batch_size // b), pc.world)
        return dataclasses.replace(base, train_batch_size=b, gradient_accumulation_steps=accum)

    zero = dataclasses.replace(cfg, **_ZERO)
    bases = [cfg] + ([zero] if pc.world > 1 and not cfg.use_distributed_optimizer else [])
    out = [entry(c) for c in bases[1:]]
    if cfg.params_dtype == "float32":
        out.append(entry(dataclasses.replace(cfg, **_HALF)))
    for base in bases:  # the smallest micro-batch that does not fit, less one
        b = _first(0, base.train_batch_size, lambda b, base=base: total(smaller(base, b)) > limit) - 1
        if b:
            out.append(entry(smaller(base, b)))
    nodes = [pc.nnodes * k for k in (1, 2, 4, 8, 16, 32, 64)]
    at = lambda n: dataclasses.replace(pc, nnodes=n)  # noqa: E731
    for lo, hi in zip(nodes, nodes[1:]):
        if total(zero, at(hi)) <= limit:
            n = _first(lo, hi, lambda n: total(zero, at(n)) <= limit)
            accum = _multiple(cfg.gradient_accumulation_steps, at(n).world)
            out.append(entry(dataclasses.replace(zero, gradient_accumulation_steps=accum), at(n)))
            break
    return [s for s in out if s["fits"]] or out


# ------------------------------------------------------------------------------------------ output
def render(report: dict[str, Any]) -> str:
    """The human table of :func:`plan`'s report."""
    m, f, n, c = report["memory_bytes"], report["train_config"], report["model"]["num_params"], report["comm"]
    lines = [
        f"{f['model_config']}: {n / 1e9:.3f}B params on {report['nnodes']} node(s) x "
        f"{report['nproc_per_node']} = {report['world_size']} ranks ({report['ddp']} DDP"
        f"{', ZeRO-1' * f['use_distributed_optimizer']}); micro-batch {f['train_batch_size']} x "
        f"{f['max_seq_len']}; weights {f['params_dtype']}, compute {f['dtype']}",
        f"memory per GPU (rank 0, the fullest){'GiB':>17}  bytes/param",
    ]
    for k in (*STATE_KEYS, "ddp_buckets", "activations", "workspace", "reserved", "total"):
        if m[k] or k in STATE_KEYS:
            lines.append(f"  {k:<40}{m[k] / GIB:10.3f}  {m[k] / n:10.3f}")
    lines[-1] += (
        f"  of {report['gpu_memory_bytes'] / GIB:.1f} GiB: {'fits' if report['fits'] else 'DOES NOT FIT'}"
    )
    lines.append(f"sent per step by each rank (ring model): {c['wire_bytes_per_step'] / 1e9:.4f} GB")
    for g in c["collectives"]:
        lines.append(f"  {g['op']:<22}{g['kind']:<9}x{g['calls']:<5}{g['wire_bytes'] / 1e9:12.4f} GB")
    if c["seconds_per_step"] is not None:
        bw = c["bus_bandwidth_gbps"]
        lines.append(
            f"  at {bw['all_reduce']:.1f} / {bw['all_gather']:.1f} GB/s bus bandwidth (all-reduce / "
            f"all-gather, {c['bandwidth_source']}): {c['seconds_per_step']:.4f} s per step"
        )
    lines += [f"refused: {p}" for p in report["problems"]]
    for s in report.get("suggestions", []):
        verdict = "fits" if s["fits"] else "still does not fit"
        lines.append(f"{verdict} with {s['flags']}: {s['total_bytes'] / GIB:.2f} GiB per GPU")
    return "\n".join(lines)


def model_config_of(cfg: TrainConfig, pc: PlanConfig) -> Z2allConfig:
    """The model the trainer would build from ``cfg`` (preset or JSON file, vocab padded to 64)."""
    if cfg.init_from:
        raise ConfigError("--init_from: give the model's shape with --model_config (a preset or a JSON file)")
    if cfg.task_type == "dpo":
        raise ConfigError("--task_type=dpo is not modelled (reference model, full logits): plan pretrain/sft")
    vocab = pc.vocab_size
    if not vocab:
        spec = cfg.model_config
        vocab = get_preset(spec).vocab_size if spec in list_presets() else Z2allConfig.vocab_size
    mc = resolve_model_config(cfg, padded_vocab(vocab))
    if cfg.max_seq_len > mc.max_position_embeddings:
        raise ConfigError(
            f"--max_seq_len={cfg.max_seq_len} exceeds the model's max_position_embeddings "
            f"{mc.max_position_embeddings}"
        )
    return mc


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the planner's flags, the trainer's); a bare boolean planner flag means true. The trainer's
    --device defaults to cuda here (the GPUs being planned) and --data_dir to a placeholder."""
    ours = {f.name: f for f in dataclasses.fields(PlanConfig)}
    mine, theirs = [], []
    for arg in argv:
        name, eq, _ = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in ours:
            mine.append(arg if eq or ours[name].type != "bool" else f"--{name}=true")
        else:
            theirs.append(arg)
    given = {a[2:].partition("=")[0].replace("-", "_") for a in theirs if a.startswith("--")}
    theirs += [f"--{k}={v}" for k, v in (("device", "cuda"), ("data_dir", "(plan)")) if k not in given]
    return mine, theirs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mine, theirs = split_argv(argv)
    if "-h" in argv or "--help" in argv:
        mine.append("--help")
    about = __doc__.split("\n\n")[0] + " Also takes every flag of train_my_ddp.py (see its --help)."
    pc = parse_dataclass_args(PlanConfig, mine, prog=PROG, description=about)
    setup_logging()
    logging.getLogger("z2all.model").setLevel(logging.WARNING)  # the meta models' "z2all model:" lines
    try:
        cfg = parse_args(theirs)
        report = plan(cfg, pc, model_config_of(cfg, pc))
    except (ValueError, OSError) as e:  # ConfigError is a ValueError: the message names the flag
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return USER_ERROR
    print(json.dumps(report, indent=2) if pc.json else render(report))
    return 0 if report["fits"] and not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
