"""Peak RSS of reading random samples from PretokDatasetWithIndex vs corpus size: it should stay flat.

    python benchmarks/bench_index_rss.py [--sizes_mb=10,100,500] [--max_seq_len=512] [--samples=2000]

For each size a synthetic uint16 ``.bin`` of that many bytes (random ids, with a sidecar) is indexed with
the real ``build_pretrain_sample_index_map`` code; then a *fresh subprocess* builds the dataset, reads
``--samples`` random samples and reports its peak RSS (``VmHWM``) and the growth over its RSS right
after imports. The reference in the same run is the naive loader (``np.fromfile`` of the whole corpus,
what a dataset without memmap does) and a long-lived ``np.memmap`` of the whole file sliced per sample,
measured the same way. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from data_preprocess.build_pretrain_sample_index_map import build_index
from z2all.atomic import atomic_write_json
from z2all.data.pretrain_dataset import BIN_FORMAT, sidecar_path, write_manifest

_CHILD = r"""
import json, sys
import numpy as np
import torch
from z2all.data.pretrain_dataset import PretokDatasetWithIndex

def status_mb(key):
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")

mode, data_dir, seq_len, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = status_mb("VmRSS")
rng = np.random.default_rng(0)
checksum = 0
if mode == "index":
    ds = PretokDatasetWithIndex(data_dir, seq_len)
    for i in rng.integers(0, len(ds), samples):
        x, y = ds[int(i)]
        checksum += int(x[0])
elif mode == "memmap":  # one long-lived np.memmap of the whole .bin, sliced per sample
    tokens = np.memmap(f"{data_dir}/corpus.bin", dtype=np.uint16, mode="r")
    n = (len(tokens) - 1) // seq_len
    for i in rng.integers(0, n, samples):
        w = torch.from_numpy(tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64))
        checksum += int(w[0])
else:  # naive: the whole token file in memory
    tokens = np.fromfile(f"{data_dir}/corpus.bin", dtype=np.uint16)
    n = (len(tokens) - 1) // seq_len
    for i in rng.integers(0, n, samples):
        w = torch.from_numpy(tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64))
        checksum += int(w[0])
peak = status_mb("VmHWM")
print(json.dumps({"baseline_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
                  "growth_mb": round(peak - base, 1), "checksum": checksum}))
"""


def make_corpus(folder: Path, size_mb: int, seq_len: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    num_tokens = size_mb * 1_000_000 // 2
    rng = np.random.default_rng(size_mb)
    path = folder / "corpus.bin"
    with open(path, "wb") as f:
        for lo in range(0, num_tokens, 1 << 24):  # 32 MB at a time
            f.write(rng.integers(0, 32000, min(1 << 24, num_tokens - lo), dtype=np.uint16).tobytes())
    bin_id = uuid.uuid4().hex
    atomic_write_json(
        sidecar_path(path),
        {
            "format": BIN_FORMAT,
            "dtype": "<u2",
            "vocab_size": 32000,
            "eos_id": 2,
            "tokenizer_fingerprint": "synthetic",
            "num_tokens": num_tokens,
            "num_documents": 0,
            "bin_bytes": num_tokens * 2,
            "bin_id": bin_id,
            "max_token_id": 31999,
        },
    )
    write_manifest(folder, {path: bin_id}, {})  # what a finished pretokenize run leaves
    build_index(path, seq_len)
    return num_tokens


def measure(mode: str, folder: Path, seq_len: int, samples: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(folder), str(seq_len), str(samples)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes_mb", default="10,100,500")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--skip_naive", action="store_true", help="skip the np.fromfile and memmap references")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_index_rss_"))
    rows = []
    try:
        for size in (int(s) for s in args.sizes_mb.split(",")):
            folder = work / f"{size}mb"
            num_tokens = make_corpus(folder, size, args.max_seq_len)
            row = {
                "bin_mb": size,
                "num_tokens": num_tokens,
                "index": measure("index", folder, args.max_seq_len, args.samples),
            }
            if not args.skip_naive:
                row["naive_fromfile"] = measure("naive", folder, args.max_seq_len, args.samples)
                row["memmap_whole_file"] = measure("memmap", folder, args.max_seq_len, args.samples)
            rows.append(row)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    growth = [r["index"]["growth_mb"] for r in rows]
    out = {
        "benchmark": "index_rss",
        "max_seq_len": args.max_seq_len,
        "random_samples": args.samples,
        "rows": rows,
        "index_growth_mb_range": [min(growth), max(growth)],
        "index_growth_largest_over_smallest_mb": round(growth[-1] - growth[0], 1),
    }
    if not args.skip_naive:
        out["naive_growth_mb"] = [r["naive_fromfile"]["growth_mb"] for r in rows]
        out["memmap_growth_mb"] = [r["memmap_whole_file"]["growth_mb"] for r in rows]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
