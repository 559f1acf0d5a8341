"""bf16 weights vs bf16 autocast over fp32 weights (and fp32), in a real pretraining run on 2 CPU ranks.

Each arm is the real ``train_my_ddp.py`` under torchrun (``--nproc`` CPU ranks, gloo, z2all DDP, one
thread per rank), same seed, data, model and schedule; only the dtype flags differ:

    bf16              --params_dtype=bfloat16 --dtype=bfloat16   bf16 weights in the DDP buffers, fp32
                      grads beside them, Float16OptimizerWithFloat16Params stepping fp32 main copies
    bf16_bf16grads    the same with --grad_reduce_in_fp32=false   (not run by default)
    autocast          --params_dtype=float32 --dtype=bfloat16    torch autocast over fp32 weights
    fp32              --params_dtype=float32 --dtype=float32

The data is built once in a temp folder with the project's own tools: the quick-start demo's corpus
(``z2all.demo.stdlib_corpus``: standard-library sources and docstrings), a byte-level BPE tokenizer
trained on it, ``pretokenize`` and ``build_all`` (the sample index). No shared corpus is read.

Runs are interleaved (``--repeat`` rounds of every arm in ``--arms`` order: A, B, C, A, B, C) so
machine-load drift hits every arm alike. Per run: the step time of each step is the step's tokens
over its ``tokens_per_s`` in metrics.jsonl (the loop's own timer: sampler, collate, forward/backward,
gradient sync, clip, optimizer step, stats all-reduce), median after ``--warmup`` steps; per arm the
best median over its runs. ``first_loss`` is step 1's loss, ``final_loss`` the mean of the last 5
steps' (identical over repeats when the run is deterministic: ``loss_spread_over_repeats``).
``bytes_per_param`` is run_info.json's (measured on rank 0 after its first step). ``wall_s`` is the
whole torchrun command (startup, data loading, final checkpoint included), best over runs. Prints one
JSON object; ratios are bf16 / autocast (and bf16 / fp32, autocast / fp32 when fp32 ran).

    python benchmarks/bench_params_dtype.py                         # tiny Llama, seq 256, 80 steps
    python benchmarks/bench_params_dtype.py --arms=bf16,autocast --repeat=3 --steps=60
    python benchmarks/bench_params_dtype.py --model_config=my_model.json --seq=256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_my_ddp.py"

ARMS = {
    "bf16": ["--params_dtype=bfloat16", "--dtype=bfloat16"],
    "bf16_bf16grads": ["--params_dtype=bfloat16", "--dtype=bfloat16", "--grad_reduce_in_fp32=false"],
    "autocast": ["--params_dtype=float32", "--dtype=bfloat16"],
    "fp32": ["--params_dtype=float32", "--dtype=float32"],
}
LAST = 5  # final loss: mean of the last LAST steps

logger = logging.getLogger("bench_params_dtype")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def build_data(root: Path, args) -> tuple[Path, Path, dict]:
    """(tokenizer dir, pretokenized + indexed folder, facts) under ``root``."""
    sys.path.insert(0, str(REPO_ROOT))
    from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all
    from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize
    from z2all.demo import stdlib_corpus
    from z2all.tokenizer import TokenizerTrainConfig, train_tokenizer

    docs, _ = stdlib_corpus(args.data_bytes)
    corpus = root / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tok = train_tokenizer(
        docs,
        TokenizerTrainConfig(save_dir=str(root / "tok"), vocab_size=args.vocab, tokenizer_type="hf_bbpe"),
    )
    pretok = root / "pretok"
    pretokenize(
        PretokenizeConfig(data_dir=str(corpus), tokenizer_dir=str(tok), save_dir=str(pretok), num_workers=1)
    )
    build_all(IndexConfig(data_dir=str(pretok), max_seq_len=args.seq))
    tokens = sum(p.stat().st_size for p in pretok.rglob("*.bin"))  # uint16 or uint32 per token
    return tok, pretok, {"documents": len(docs), "chars": sum(map(len, docs)), "bin_bytes": tokens}


def launch(flags: list[str], nproc: int, name: str, out_dir: Path) -> tuple[float, list[dict]]:
    """Run ``train_my_ddp.py flags`` under torchrun on ``nproc`` CPU ranks: (wall seconds, the
    metrics.jsonl records). Exits naming the arm when the run fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(SCRIPT), *flags]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-5000:])
        raise SystemExit(f"arm {name}: train_my_ddp.py exited {r.returncode}")
    return wall, [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_flags(out_dir: Path, tok: Path, pretok: Path, args) -> list[str]:
    """The flags every benchmark run of ``train_my_ddp.py`` shares: data, model, batch, length."""
    return [
        f"--data_dir={pretok}",
        f"--tokenizer_dir={tok}",
        f"--out_dir={out_dir}",
        f"--model_config={args.model_config}",
        f"--max_seq_len={args.seq}",
        f"--train_batch_size={args.batch}",
        f"--gradient_accumulation_steps={args.accum}",
        f"--max_iters={args.steps}",
    ]


def run_arm(name: str, out_dir: Path, tok: Path, pretok: Path, args) -> dict:
    flags = [
        *run_flags(out_dir, tok, pretok, args),
        f"--learning_rate={args.lr}",
        f"--min_lr={args.lr / 10}",
        f"--warmup_iters={args.lr_warmup}",
        f"--seed={args.seed}",
        "--valid_ratio=0.01",
        "--eval_interval=0",
        "--save_interval=0",
        f"--log_interval={args.steps}",
        "--device=cpu",
        "--backend=gloo",
        "--ddp_impl=z2all",
        *ARMS[name],
    ]
    wall, recs = launch(flags, args.nproc, name, out_dir)
    info = json.loads((out_dir / "run_info.json").read_text())
    assert [x["step"] for x in recs] == list(range(1, args.steps + 1)), [x["step"] for x in recs]
    prev, times = 0, []
    for x in recs:
        times.append((x["tokens"] - prev) / x["tokens_per_s"])
        prev = x["tokens"]
    losses = [x["loss"] for x in recs]
    return {
        "step_s": statistics.median(times[args.warmup :]),
        "wall_s": wall,
        "first_loss": losses[0],
        "final_loss": statistics.fmean(losses[-LAST:]),
        "losses": losses,
        "tokens_per_step": recs[-1]["tokens"] // len(recs),
        "info": info,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="bf16,autocast,fp32", help=f"comma-separated, of {list(ARMS)}")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; best median step time per arm")
    ap.add_argument("--nproc", type=int, default=2, help="CPU ranks (torchrun, gloo)")
    ap.add_argument("--model_config", default="tiny", help="preset or JSON file of Z2allConfig fields")
    ap.add_argument("--vocab", type=int, default=1000, help="tokenizer vocabulary (model: padded to 64)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    ap.add_argument("--accum", type=int, default=4, help="global micro-batches per step (shared by ranks)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time median")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr_warmup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--data_bytes", type=int, default=1_500_000, help="stdlib source read as documents")
    args = ap.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; known: {list(ARMS)}")
    if args.steps < max(args.warmup + 1, LAST):
        ap.error(f"--steps must exceed --warmup and be at least {LAST}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_params_dtype_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        tok, pretok, data = build_data(root, args)
        data["build_s"] = round(time.perf_counter() - t0, 1)
        logger.info("data: %s", data)
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for r in range(args.repeat):
            for a in arms:
                res = run_arm(a, root / f"{a}_{r}", tok, pretok, args)
                logger.info(
                    "round %d %-14s step %.4fs  wall %.1fs  loss %.4f -> %.4f",
                    r,
                    a,
                    res["step_s"],
                    res["wall_s"],
                    res["first_loss"],
                    res["final_loss"],
                )
                runs[a].append(res)

    per_arm = {}
    for a, rs in runs.items():
        best = min(rs, key=lambda x: x["step_s"])
        info = best["info"]
        spread = max(max(abs(x - y) for x, y in zip(rs[0]["losses"], o["losses"])) for o in rs)
        per_arm[a] = {
            "flags": " ".join(ARMS[a]),
            "step_s": round(best["step_s"], 5),
            "step_s_per_repeat": [round(x["step_s"], 5) for x in rs],
            "tokens_per_s": round(best["tokens_per_step"] / best["step_s"], 1),
            "wall_s": round(min(x["wall_s"] for x in rs), 2),
            "first_loss": round(rs[0]["first_loss"], 5),
            "final_loss": round(rs[0]["final_loss"], 5),
            "loss_spread_over_repeats": spread,
            "bytes_per_param": info.get("bytes_per_param"),
            "optimizer": info.get("optimizer"),
        }
    any_info = next(iter(runs.values()))[0]
    out = {
        "benchmark": "params_dtype",
        "world_size": any_info["info"].get("world_size"),
        "num_params": any_info["info"].get("num_params"),
        "model_config": args.model_config,
        "vocab_size": (any_info["info"].get("model_config") or {}).get("vocab_size"),
        "seq": args.seq,
        "tokens_per_step": any_info["tokens_per_step"],
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeat,
        "threads_per_rank": 1,
        "torch_version": any_info["info"].get("torch_version"),
        "data": data,
        "arms": per_arm,
    }
    ratios = {}
    for num, den in (("bf16", "autocast"), ("bf16", "fp32"), ("autocast", "fp32")):
        if num in per_arm and den in per_arm:
            a, b = per_arm[num], per_arm[den]
            ratios[f"{num}/{den}_step_time"] = round(a["step_s"] / b["step_s"], 4)
            ratios[f"{num}-{den}_final_loss"] = round(a["final_loss"] - b["final_loss"], 5)
    out["ratios"] = ratios
    out["bench_wall_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
