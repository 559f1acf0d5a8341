"""KV-cache decoding speed vs recomputing the whole prefix every step (use_cache=False).

Greedy decoding of ``--new-tokens`` tokens from the same prompt with the same model; also checks the
two token sequences are identical. Prints one JSON object; ``speedup`` = no-cache time / cache time.

    python benchmarks/bench_generate.py                 # tiny-ish model, 256 new tokens, CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from z2all.model import Z2allForCausalLM, get_preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(
        args.preset,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        intermediate_size=args.hidden * 11 // 4,
        max_position_embeddings=max(512, args.prompt + args.new_tokens),
    )
    model = Z2allForCausalLM(cfg).to(args.device).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), device=args.device)

    def timed(use_cache: bool):
        model.generate(prompt, 4, temperature=0.0, use_cache=use_cache)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, args.new_tokens, temperature=0.0, use_cache=use_cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    with_cache, t_cache = timed(True)
    without, t_full = timed(False)
    new = args.batch * args.new_tokens
    print(
        json.dumps(
            {
                "bench": "generate_kv_cache",
                "device": args.device,
                "config": vars(args),
                "params_m": round(cfg.num_parameters / 1e6, 2),
                "identical_greedy_output": bool(torch.equal(with_cache, without)),
                "cache_tokens_per_s": round(new / t_cache, 1),
                "no_cache_tokens_per_s": round(new / t_full, 1),
                "cache_s": round(t_cache, 3),
                "no_cache_s": round(t_full, 3),
                "speedup": round(t_full / t_cache, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
