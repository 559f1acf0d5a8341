"""Training-step throughput of the z2all Llama vs transformers' LlamaForCausalLM (CPU, fp32).

Same config, same weights, same input batch, same process; forward + backward with the loss, timed
in interleaved repeats (z2all, HF, z2all, HF, ...) so machine noise hits both alike. Prints one JSON
object; ``ratio`` = z2all tokens/s / HF tokens/s (median over repeats; > 1 means z2all is faster).

    python benchmarks/bench_model.py                  # ~1 minute on 2 CPU cores
    python benchmarks/bench_model.py --repeats 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _step(model, ids, hf: bool) -> None:
    out = model(input_ids=ids, labels=ids) if hf else model(ids, labels=ids)
    out.loss.backward()
    for p in model.parameters():
        p.grad = None


def _time(model, ids, hf: bool, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        _step(model, ids, hf)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from z2all.model import Z2allConfig, Z2allForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Z2allConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 512),
    )
    ours = Z2allForCausalLM(cfg).train()
    hf_dict = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**hf_dict)).train()
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():  # same maths before timing anything
        diff = (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item()

    for _ in range(2):  # warm-up both (allocator, thread pools)
        _step(ours, ids, False)
        _step(hf, ids, True)
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        t_ours.append(_time(ours, ids, False, args.iters))
        t_hf.append(_time(hf, ids, True, args.iters))
    tokens = args.batch * args.seq
    ours_tps = tokens / statistics.median(t_ours)
    hf_tps = tokens / statistics.median(t_hf)
    print(
        json.dumps(
            {
                "bench": "model_fwd_bwd_cpu_fp32",
                "config": {k: v for k, v in vars(args).items()},
                "params_m": round(cfg.num_parameters / 1e6, 2),
                "kernels": ours.kernel_backends,
                "hf_attn_implementation": hf.config._attn_implementation,
                "max_abs_logit_diff": diff,
                "z2all_tokens_per_s": round(ours_tps, 1),
                "hf_tokens_per_s": round(hf_tps, 1),
                "ratio": round(ours_tps / hf_tps, 3),
                "z2all_step_s": [round(t, 4) for t in t_ours],
                "hf_step_s": [round(t, 4) for t in t_hf],
            }
        )
    )


if __name__ == "__main__":
    main()
