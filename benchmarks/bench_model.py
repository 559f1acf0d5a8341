"""Training-step throughput of the z2all Llama vs transformers' LlamaForCausalLM (CPU, fp32).

Same config, same weights, same input batch, same process; forward + backward with the loss, timed
in interleaved repeats (z2all, HF, z2all, HF, ...) so machine noise hits both alike. Prints one JSON
object; ``ratio`` = z2all tokens/s / HF tokens/s (median over repeats, ``*_best_of`` over the
fastest repeat of each; > 1 means z2all is faster)
for the training path (``return_logits=False``: loss through the fused linear cross entropy, the
logits never kept); ``ratio_with_logits`` for the call that also returns the logits, as HF's does.

    python benchmarks/bench_model.py                  # ~1 minute on 2 CPU cores
    python benchmarks/bench_model.py --repeats 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _step(model, ids, mode: str) -> None:
    if mode == "hf":
        out = model(input_ids=ids, labels=ids)
    else:  # "logits": the full output like HF's; "loss": training path, no logits kept
        out = model(ids, labels=ids, return_logits=mode == "logits")
    out.loss.backward()
    for p in model.parameters():
        p.grad = None


def _time(model, ids, mode: str, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        _step(model, ids, mode)
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="steps per timed repeat")
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

    models = {"loss": ours, "logits": ours, "hf": hf}
    for _ in range(2):  # warm-up (allocator, thread pools)
        for mode, m in models.items():
            _step(m, ids, mode)
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(args.repeats):  # interleaved: noise hits every variant alike
        for mode, m in models.items():
            times[mode].append(_time(m, ids, mode, args.iters))
    tokens = args.batch * args.seq
    tps = {mode: tokens / statistics.median(t) for mode, t in times.items()}
    # best-of-repeats: the least disturbed by other processes on a shared machine
    tps_best = {mode: tokens / min(t) for mode, t in times.items()}
    print(
        json.dumps(
            {
                "bench": "model_fwd_bwd_cpu_fp32",
                "config": {k: v for k, v in vars(args).items()},
                "params_m": round(cfg.num_parameters / 1e6, 2),
                "kernels": ours.kernel_backends,
                "hf_attn_implementation": hf.config._attn_implementation,
                "max_abs_logit_diff": diff,
                "z2all_tokens_per_s": round(tps["loss"], 1),
                "z2all_with_logits_tokens_per_s": round(tps["logits"], 1),
                "hf_tokens_per_s": round(tps["hf"], 1),
                "ratio": round(tps["loss"] / tps["hf"], 3),
                "ratio_with_logits": round(tps["logits"] / tps["hf"], 3),
                "ratio_best_of": round(tps_best["loss"] / tps_best["hf"], 3),
                "ratio_with_logits_best_of": round(tps_best["logits"] / tps_best["hf"], 3),
                "step_s": {mode: [round(t, 4) for t in ts] for mode, ts in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
