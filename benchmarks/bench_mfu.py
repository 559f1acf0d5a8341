"""Model FLOPs utilisation of a full training step of the ~1B preset at seq 2048 in bf16 on one GPU.

A step = forward + backward (loss only, no logits kept, so a fused linear-cross-entropy backend
can run) + AdamW step + zero_grad. MFU = flops_per_token(cfg, seq) * tokens/s / peak FLOP/s, with
the peak looked up from the GPU name (``z2all.model.PEAK_FLOPS``) or given by ``--peak-tflops``.
Prints one JSON object; without CUDA it prints ``{"skipped": "no CUDA"}`` and exits 0.

    python benchmarks/bench_mfu.py                           # 1b preset, seq 2048, micro-batch 4
    python benchmarks/bench_mfu.py --batch 8 --compile       # try torch.compile
    python benchmarks/bench_mfu.py --device cpu --preset tiny --seq 64 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size (sequences per step)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--precision",
        choices=["autocast", "pure"],
        default="autocast",
        help="autocast: fp32 params + bf16 autocast (what training does); pure: bf16 params",
    )
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak bf16 TFLOP/s")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"bench": "mfu", "skipped": "no CUDA"}))
        return

    from optimizer import build_adamw
    from z2all.model import Z2allForCausalLM, estimate_mfu, flops_per_token, get_preset, peak_flops_for

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = get_preset(args.preset, vocab_size=args.vocab, max_position_embeddings=max(args.seq, 512))
    with device:
        model = Z2allForCausalLM(cfg)
    amp_dtype = torch.bfloat16 if on_cuda else torch.float32
    if args.precision == "pure" and on_cuda:
        model = model.to(torch.bfloat16)
    model.train()
    opt = build_adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    step_model = torch.compile(model) if args.compile else model

    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]

    def step(i: int) -> float:
        ids = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=on_cuda and args.precision == "autocast"):
            loss = step_model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(args.warmup):
        step(i)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    last_loss = float(loss)  # forces the last step to finish
    if on_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps

    tokens_per_s = args.batch * args.seq / dt
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for(name)
    result = {
        "bench": "mfu",
        "device": name,
        "preset": args.preset,
        "params_b": round(cfg.num_parameters / 1e9, 3),
        "seq": args.seq,
        "micro_batch": args.batch,
        "precision": args.precision,
        "compile": args.compile,
        "kernels": model.kernel_backends,
        "adamw_backend": opt.z2all_backend,
        "step_s": round(dt, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token(cfg, args.seq),
        "achieved_tflops": round(flops_per_token(cfg, args.seq) * tokens_per_s / 1e12, 2),
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": round(estimate_mfu(cfg, args.seq, tokens_per_s, peak), 4) if peak else None,
        "loss": round(last_loss, 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_cuda else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
