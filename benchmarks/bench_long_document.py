"""Peak memory and time of one long document: whole vs in pieces (``z2all.tokenizer.chunked``), issue 9.

    python benchmarks/bench_long_document.py [--data_dir=../shared/data/pretrain] [--tokenizer_dir=DIR]
        [--tokenizer_type=hf_bbpe] [--mb 5 20 60] [--whole_max_mb=20] [--no_train]

One document of N MB (UTF-8) is built by repeating the corpus documents of ``--data_dir`` (joined by
blank lines), in a fresh process per measurement, and then:

* ``encode_whole``: ``Z2allTokenizer.encode(text)`` (what pretokenize does today, via encode_batch);
* ``encode_chunked``: ``encode_long(tok, text, dtype=uint32)``;
* ``train_whole`` / ``train_chunked``: ``train_tokenizer([text])`` vs training on
  ``hf_training_texts`` (hf_bbpe) or ``sp_training_sentences`` (sp_bbpe) of it, vocab 8000;
* ``pretokenize``: the document as one JSON line through ``data_preprocess.pretok_pretrain``
  with one worker (in-process, so its peak is this process's): the pipeline as it stands, which
  encodes long documents with ``chunked.encode_long``.

Whole-document runs are skipped above ``--whole_max_mb`` (they need ~250 bytes per character for
hf_bbpe). Peak RSS is the child's VmHWM (Linux), ``rss_before_mb`` the peak before
the operation (holding the text), ``added_mb`` what the operation adds; ``same_ids`` compares the
sha256 of chunked and whole ids. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from z2all.data.readers import iter_documents, list_data_files
from z2all.tokenizer import TokenizerTrainConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import hashlib, json, sys, tempfile, time
import numpy as np
from z2all.tokenizer import TokenizerTrainConfig, Z2allTokenizer, train_tokenizer
from z2all.tokenizer.chunked import CutStats, encode_long, hf_training_texts, sp_training_sentences

def peak_rss_kb():  # VmHWM: fresh after exec (ru_maxrss would start at the parent's RSS)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

def run_pretokenize(path, out):  # path: a folder holding the document as one JSON line
    from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize

    cfg = PretokenizeConfig(data_dir=path, tokenizer_dir=tok_dir, save_dir=tempfile.mkdtemp(), num_workers=1)
    out["tokens"] = pretokenize(cfg)[0].num_tokens - 1  # without the EOS

def encode(text, out):
    tok = Z2allTokenizer.from_pretrained(tok_dir)
    if mode == "encode_whole":
        ids = np.asarray(tok.encode(text), dtype=np.uint32)
    else:
        ids = encode_long(tok, text, dtype=np.uint32, stats=stats)
    out.update(tokens=len(ids), ids_sha256=hashlib.sha256(ids.tobytes()).hexdigest())

def train(text, out):
    kind = Z2allTokenizer.from_pretrained(tok_dir).tokenizer_type
    cfg = TokenizerTrainConfig(save_dir=tempfile.mkdtemp(), vocab_size=8000, tokenizer_type=kind)
    texts = [text]
    if mode == "train_chunked":
        if kind == "hf_bbpe":
            texts = hf_training_texts(texts, stats=stats)
        else:
            texts = sp_training_sentences(texts, cfg.max_sentence_bytes, stats=stats)
    train_tokenizer(texts, cfg)

mode, tok_dir, path, mb = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
stats = CutStats()
out = {}
if mode == "pretokenize":
    before = peak_rss_kb()
    t0 = time.perf_counter()
    run_pretokenize(path, out)
else:
    block = open(path, encoding="utf-8").read()
    text = block * max(1, round(mb * 1e6 / len(block.encode("utf-8"))))  # one allocation of the text
    del block
    out.update(chars=len(text), utf8_mb=round(len(text.encode("utf-8")) / 1e6, 1))
    before = peak_rss_kb()
    t0 = time.perf_counter()
    (encode if mode.startswith("encode") else train)(text, out)
out.update(
    seconds=round(time.perf_counter() - t0, 2),
    rss_before_mb=round(before / 1024),
    peak_rss_mb=round(peak_rss_kb() / 1024),
    pieces=stats.pieces,
    fallback_cuts=stats.fallback_cuts,
    hard_cuts=stats.hard_cuts,
)
out["added_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
print(json.dumps(out))
"""


def measure(mode: str, tok_dir: Path, corpus_file: Path, mb: float) -> dict:
    if mode == "pretokenize":  # the same document as one JSON line, in a folder of its own
        block = corpus_file.read_text("utf-8")
        text = block * max(1, round(mb * 1e6 / len(block.encode("utf-8"))))
        data_dir = corpus_file.parent / f"jsonl_{mb}"
        data_dir.mkdir(exist_ok=True)
        (data_dir / "doc.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", "utf-8")
        corpus_file = data_dir
    cmd = [sys.executable, "-c", _CHILD, mode, str(tok_dir), str(corpus_file), str(mb)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        return {"mode": mode, "mb": mb, "error": res.stderr.strip().splitlines()[-1:]}
    return {"mode": mode, "mb": mb, **json.loads(res.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "pretrain"))
    p.add_argument("--tokenizer_dir", default="", help="default: train an 8000-token tokenizer on the data")
    p.add_argument("--tokenizer_type", default="hf_bbpe", choices=("hf_bbpe", "sp_bbpe"))
    p.add_argument("--mb", type=float, nargs="+", default=[5, 20, 60], help="document sizes (UTF-8 MB)")
    p.add_argument("--whole_max_mb", type=float, default=20, help="skip whole-document runs above this")
    p.add_argument("--no_train", action="store_true", help="only encoding")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_long_doc_"))
    try:
        docs = [t for f in list_data_files(args.data_dir) for t in iter_documents(f)]
        corpus_file = work / "corpus.txt"
        corpus_file.write_text("\n\n".join(docs), "utf-8")
        tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
        if tok_dir is None:
            cfg = TokenizerTrainConfig(
                save_dir=str(work / "tok"), vocab_size=8000, tokenizer_type=args.tokenizer_type
            )
            tok_dir = train_tokenizer(docs, cfg)
        modes = ["pretokenize", "encode_whole", "encode_chunked"]
        modes += [] if args.no_train else ["train_whole", "train_chunked"]
        runs = [
            measure(mode, tok_dir, corpus_file, mb)
            for mb in args.mb
            for mode in modes
            if mb <= args.whole_max_mb or not mode.endswith("whole")
        ]
        sha = {(r["mb"], r["mode"]): r.get("ids_sha256") for r in runs}
        for r in runs:
            if r["mode"] == "encode_chunked" and (r["mb"], "encode_whole") in sha:
                r["same_ids"] = r.get("ids_sha256") == sha[(r["mb"], "encode_whole")]
        result = {
            "benchmark": "long_document",
            "data_dir": str(args.data_dir),
            "tokenizer_dir": str(tok_dir) if args.tokenizer_dir else f"trained {args.tokenizer_type} 8000",
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "python": platform.python_version(),
            "runs": runs,
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
