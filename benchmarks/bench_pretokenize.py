"""Pretokenize throughput: z2all's pipeline vs the WikiLLM-tutorial recipe, same tokenizer, same run.

    python benchmarks/bench_pretokenize.py [--data_dir=../shared/data/pretrain] [--tokenizer_dir=DIR]
        [--repeats=2] [--workers=2]

* z2all: ``data_preprocess.pretok_pretrain.pretokenize`` (streaming readers, chunks of documents to a
  process pool, ``encode_batch``, ordered writes of a uint16 .bin + sidecar), with 1 and ``--workers``
  processes.
* recipe: ``datasets.load_dataset("json"|"parquet", data_files=f)`` then
  ``.map(lambda b: tok(b[field]), batched=True)`` with ``transformers.AutoTokenizer`` on the same
  tokenizer folder, then the ids + EOS concatenated into a uint16 .bin (nanoGPT style); run with the
  default ``num_proc`` and with ``num_proc=--workers``. Each run gets a fresh datasets cache.

Throughput counts text tokens (EOS excluded) over wall time of the whole file-to-.bin conversion; every
configuration is run ``--repeats`` times interleaved and the best time is kept (the machine is shared).
CPU seconds (this process + reaped worker processes) give a load-independent efficiency figure.
Prints one JSON object; ``speedup_vs_best_recipe`` is the goal metric (>= 2 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize
from z2all.data.readers import iter_documents, list_data_files
from z2all.tokenizer import TokenizerTrainConfig, Z2allTokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the worker pools)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_z2all(data_dir: Path, tok_dir: Path, workers: int, work: Path) -> tuple[float, int]:
    out = work / f"z2all_{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    results = pretokenize(
        PretokenizeConfig(
            data_dir=str(data_dir), tokenizer_dir=str(tok_dir), save_dir=str(out), num_workers=workers
        )
    )
    seconds = time.perf_counter() - t0
    return seconds, sum(r.num_tokens - r.num_documents for r in results)


def _text_field(path: Path) -> str:
    rec = next(iter(_first_record(path)))
    return "text" if "text" in rec else "content"


def _first_record(path: Path):
    from z2all.data.readers import iter_records

    for _, rec in iter_records(path):
        yield rec
        return


def run_recipe(data_dir: Path, tok_dir: Path, num_proc: int | None, work: Path) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    cache = work / f"hf_cache_{num_proc}"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / f"recipe_{num_proc}"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    total = 0
    for f in list_data_files(data_dir):
        field = _text_field(f)
        builder = "parquet" if f.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(builder, data_files=str(f), split="train", cache_dir=str(cache))
        ds = ds.map(
            lambda b, field=field: tok(b[field]),
            batched=True,
            num_proc=num_proc,
            remove_columns=ds.column_names,
        )
        ids = ds["input_ids"]
        total += sum(len(x) for x in ids)
        np.concatenate([np.array([*x, eos], dtype=np.uint16) for x in ids]).tofile(out / (f.stem + ".bin"))
    return time.perf_counter() - t0, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "pretrain"))
    p.add_argument("--tokenizer_dir", default="", help="default: train an 8000-token hf_bbpe on the data")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data_dir = Path(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="bench_pretok_"))
    try:
        tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
        if tok_dir is None:
            texts = (t for f in list_data_files(data_dir) for t in iter_documents(f))
            tok_dir = train_tokenizer(
                texts,
                TokenizerTrainConfig(save_dir=str(work / "tok"), vocab_size=8000, tokenizer_type="hf_bbpe"),
            )
        tok = Z2allTokenizer.from_pretrained(tok_dir)
        try:
            import datasets

            recipe_error = None
            datasets_version = datasets.__version__
        except ImportError as e:
            recipe_error, datasets_version = f"datasets not installed: {e}", None
        configs = {"z2all_workers_1": lambda: run_z2all(data_dir, tok_dir, 1, work)}
        if args.workers > 1:
            configs[f"z2all_workers_{args.workers}"] = lambda: run_z2all(
                data_dir, tok_dir, args.workers, work
            )
        if recipe_error is None:
            configs["recipe_num_proc_none"] = lambda: run_recipe(data_dir, tok_dir, None, work)
            if args.workers > 1:
                configs[f"recipe_num_proc_{args.workers}"] = lambda: run_recipe(
                    data_dir, tok_dir, args.workers, work
                )
        best: dict[str, tuple[float, int, float]] = {}
        for _ in range(args.repeats):
            for name, fn in configs.items():
                cpu0 = _cpu_seconds()
                seconds, tokens = fn()
                cpu = _cpu_seconds() - cpu0
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tokens, cpu)
        tokens_ref = best["z2all_workers_1"][1]
        result = {
            "benchmark": "pretokenize",
            "data_dir": str(data_dir),
            "files": [f.name for f in list_data_files(data_dir)],
            "tokenizer": {"type": tok.tokenizer_type, "vocab_size": tok.vocab_size},
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "python": platform.python_version(),
            "datasets": datasets_version,
            "recipe_error": recipe_error,
            "repeats": args.repeats,
            "runs": {
                n: {
                    "seconds": round(s, 3),
                    "cpu_seconds": round(c, 3),
                    "text_tokens": t,
                    "tokens_per_s": round(t / s),
                    "tokens_per_cpu_s": round(t / c),
                }
                for n, (s, t, c) in best.items()
            },
            "same_token_count": all(t == tokens_ref for _, t, _ in best.values()),
        }
        ours = max(t / s for n, (s, t, _) in best.items() if n.startswith("z2all"))
        recipes = [t / s for n, (s, t, _) in best.items() if n.startswith("recipe")]
        result["speedup_vs_best_recipe"] = round(ours / max(recipes), 2) if recipes else None
        ours_cpu = max(t / c for n, (_, t, c) in best.items() if n.startswith("z2all"))
        recipes_cpu = [t / c for n, (_, t, c) in best.items() if n.startswith("recipe")]
        result["cpu_efficiency_vs_best_recipe"] = (
            round(ours_cpu / max(recipes_cpu), 2) if recipes_cpu else None
        )
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
