"""Pretokenize pretraining corpora into ``.bin`` files (library part of ``pretokenize_pretrain_data``).

Pipeline (one process pool for the whole run, so there is no drain between files)::

    main: reader (z2all.data.readers) -> chunks of documents --imap, ordered--> workers: encode_batch
    main: <- token arrays (doc ids + EOS each), in order -> temp file -> fsync -> rename -> sidecar

Invariants:

* Order is preserved: ``Pool.imap`` returns chunk results in submission order, so a ``.bin`` holds its
  documents in file order whatever the number of workers (tests compare 1 vs 2 workers byte for byte).
* Atomic: a ``.bin`` is written under a hidden temp name and renamed after fsync; the old sidecar is
  removed *before* that rename and the new sidecar written *after* it. A sidecar therefore always
  describes the ``.bin`` next to it, and an interrupted run leaves no ``.bin`` that looks complete.
* Flat memory: the pool's task pipe blocks the reader thread until a worker takes the next chunk, so
  only about ``num_workers + 2`` chunks are in flight whatever the file size.
* Idempotent: a file whose sidecar matches the source (size, mtime), the tokenizer fingerprint, the text
  field and the ``.bin`` size is skipped.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from z2all.atomic import atomic_write_json, fsync_dir
from z2all.data.pretrain_dataset import BIN_FORMAT, PretokFormatError, read_sidecar, sidecar_path, token_dtype
from z2all.data.readers import ReadStats, iter_documents, list_data_files
from z2all.tokenizer import Z2allTokenizer

logger = logging.getLogger(__name__)


@dataclass
class PretokenizeConfig:
    """Every flag of ``python -m data_preprocess.pretokenize_pretrain_data``."""

    data_dir: str = ""
    """Folder of .jsonl/.json/.parquet/.txt corpora (recursive)."""
    tokenizer_dir: str = ""
    """Folder written by ``z2all.tokenizer.train_tokenizer``."""
    save_dir: str = ""
    """Output folder, mirroring data_dir's subfolders; empty = ``<data_dir>_pretok`` next to data_dir."""
    num_workers: int = 0
    """Tokenizer processes (0 = one per CPU core; 1 = encode in the main process)."""
    text_field: str = ""
    """Record field with the text; empty tries ``text`` then ``content``."""
    chunk_chars: int = 256_000
    """Documents are sent to workers in chunks of about this many characters (small enough that the
    last chunks of a run keep every worker busy, large enough that IPC is noise)."""
    force: bool = False
    """Rewrite even up-to-date outputs."""

    def __post_init__(self):
        if not self.data_dir or not self.tokenizer_dir:
            raise ValueError("--data_dir and --tokenizer_dir are required")
        if not self.save_dir:
            self.save_dir = str(Path(self.data_dir).resolve()) + "_pretok"
        if self.num_workers <= 0:
            self.num_workers = os.cpu_count() or 1
        if self.chunk_chars < 1:
            raise ValueError(f"--chunk_chars must be >= 1, got {self.chunk_chars}")


@dataclass
class FileResult:
    source: Path
    bin_path: Path
    skipped: bool
    num_tokens: int = 0
    num_documents: int = 0
    stats: ReadStats = field(default_factory=ReadStats)


def plan_outputs(data_dir: Path, save_dir: Path) -> list[tuple[Path, Path]]:
    """``(source, <save_dir>/<rel dir>/<stem>.bin)`` for each data file; two sources may not share a .bin."""
    plan, seen = [], {}
    for src in list_data_files(data_dir):
        rel = src.relative_to(data_dir)
        out = save_dir / rel.parent / (rel.stem + ".bin")
        if out in seen:
            raise ValueError(f"{src} and {seen[out]} would both write {out}; rename one of them")
        seen[out] = src
        plan.append((src, out))
    return plan


def source_signature(src: Path, text_field: str) -> dict:
    st = src.stat()
    return {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "text_field": text_field}


def is_up_to_date(src: Path, bin_path: Path, fingerprint: str, text_field: str) -> bool:
    try:
        meta = read_sidecar(bin_path)
    except (PretokFormatError, OSError):
        return False
    sig, old = source_signature(src, text_field), meta.get("source", {})
    same_source = all(old.get(k) == sig[k] for k in ("size", "mtime_ns", "text_field"))
    return same_source and meta.get("tokenizer_fingerprint") == fingerprint


# ------------------------------------------------------------------------------------------- workers
_TOKENIZER: Z2allTokenizer | None = None
_DTYPE: np.dtype | None = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _TOKENIZER, _DTYPE
    _TOKENIZER = Z2allTokenizer.from_pretrained(tokenizer_dir)
    _DTYPE = np.dtype(dtype)


def _encode_chunk(task: tuple[int, list[str] | None]) -> tuple[int, np.ndarray | None, int]:
    """``(file index, ids of every doc each followed by EOS, number of docs)``; None marks end of file."""
    file_idx, texts = task
    if texts is None:
        return file_idx, None, 0
    batch = _TOKENIZER.encode_batch(texts)
    eos = _TOKENIZER.eos_id
    total = sum(len(ids) for ids in batch) + len(batch)
    out = np.empty(total, dtype=_DTYPE)
    pos = 0
    for ids in batch:
        out[pos : pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eos
        pos += 1
    return file_idx, out, len(batch)


def _tasks(todo: list[tuple[Path, Path]], cfg: PretokenizeConfig, stats: list[ReadStats]) -> Iterator[tuple]:
    """Chunks of documents of every file in order, then ``(file index, None)`` once a file is read."""
    for k, (src, _) in enumerate(todo):
        chunk: list[str] = []
        chars = 0
        for text in iter_documents(src, cfg.text_field or None, stats[k]):
            chunk.append(text)
            chars += len(text)
            if chars >= cfg.chunk_chars:
                yield k, chunk
                chunk, chars = [], 0
        if chunk:
            yield k, chunk
        yield k, None


def _start_pool(workers: int, tokenizer_dir: str, dtype: np.dtype):
    """A pool of ``workers`` tokenizer processes, each single-threaded (one process per core already).

    TOKENIZERS_PARALLELISM=false is set only while forking: the children inherit it (no Rust thread
    pool per child, and no "forked after parallelism was used" warning); this process keeps its setting.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir, dtype.str))
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


class _BinWriter:
    """Writes one .bin under a hidden temp name; :meth:`commit` makes it visible atomically."""

    def __init__(self, bin_path: Path):
        self.bin_path = bin_path
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a killed run writing this output (its .bin or its sidecar): never complete, drop them.
        for stale in [
            *bin_path.parent.glob(f".{bin_path.name}.tmp-*"),
            *bin_path.parent.glob(f".{bin_path.name}.json.tmp-*"),
        ]:
            stale.unlink(missing_ok=True)
        self.tmp = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.num_tokens = 0
        self.num_documents = 0

    def write(self, arr: np.ndarray, num_docs: int) -> None:
        self.f.write(arr.tobytes())  # arr is already little-endian uint16/uint32
        self.num_tokens += len(arr)
        self.num_documents += num_docs

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        # Old sidecar first: from here until the new sidecar exists, the .bin does not look complete.
        sidecar_path(self.bin_path).unlink(missing_ok=True)
        os.replace(self.tmp, self.bin_path)
        fsync_dir(self.bin_path.parent)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def pretokenize(cfg: PretokenizeConfig) -> list[FileResult]:
    """Pretokenize every data file of ``cfg.data_dir``; returns one result per file (skipped or written)."""
    from tqdm import tqdm

    tok = Z2allTokenizer.from_pretrained(cfg.tokenizer_dir)
    fingerprint, dtype = tok.fingerprint(), token_dtype(tok.vocab_size)
    data_dir, save_dir = Path(cfg.data_dir), Path(cfg.save_dir)
    plan = plan_outputs(data_dir, save_dir)
    if not plan:
        raise FileNotFoundError(f"--data_dir={data_dir}: no .jsonl/.json/.parquet/.txt files found")
    results = {src: FileResult(src, out, skipped=True) for src, out in plan}
    todo = [(s, o) for s, o in plan if cfg.force or not is_up_to_date(s, o, fingerprint, cfg.text_field)]
    for src, out in plan:
        if (src, out) not in todo:
            logger.info("up to date, skipped: %s", out)
    stats = [ReadStats() for _ in todo]
    signatures = [source_signature(s, cfg.text_field) for s, _ in todo]  # before reading: a later edit reruns
    t0 = time.perf_counter()
    writers: dict[int, _BinWriter] = {}
    total_tokens = 0
    workers = cfg.num_workers if todo else 1
    pool = None
    if workers > 1:
        pool = _start_pool(workers, cfg.tokenizer_dir, dtype)
        # The reader runs in the pool's task-feeding thread; an error there (DataFileError) is
        # re-raised here by imap at the position it happened.
        results_iter = pool.imap(_encode_chunk, _tasks(todo, cfg, stats), chunksize=1)
    else:  # encode in this process (HF tokenizers still multithreads inside encode_batch)
        _init_worker(cfg.tokenizer_dir, dtype.str)
        results_iter = map(_encode_chunk, _tasks(todo, cfg, stats))
    bar = tqdm(total=sum(os.path.getsize(s) for s, _ in todo), unit="B", unit_scale=True, desc="pretokenize")
    try:
        for k, arr, ndocs in results_iter:
            src, out = todo[k]
            if k not in writers:
                writers[k] = _BinWriter(out)
            w = writers[k]
            if arr is not None:
                w.write(arr, ndocs)
                bar.set_postfix(tokens=total_tokens + w.num_tokens, refresh=False)
                continue
            # End of file k: the reader has finished it, so stats[k] is final.
            w.commit()
            del writers[k]
            meta = {
                "format": BIN_FORMAT,
                "dtype": dtype.str,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "tokenizer_fingerprint": fingerprint,
                "tokenizer_type": tok.tokenizer_type,
                "num_tokens": w.num_tokens,
                "num_documents": w.num_documents,
                "bin_bytes": w.num_tokens * dtype.itemsize,
                "bin_id": uuid.uuid4().hex,
                "source": signatures[k],
                "bad_records": stats[k].to_dict(),
            }
            atomic_write_json(sidecar_path(out), meta)
            total_tokens += w.num_tokens
            results[src] = FileResult(src, out, False, w.num_tokens, w.num_documents, stats[k])
            bar.update(signatures[k]["size"])
            if stats[k].num_bad:
                logger.warning("%s: %s", src, stats[k].summary())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    written = [r for r in results.values() if not r.skipped]
    logger.info(
        "pretokenized %d files (%d up to date): %d documents, %d tokens in %.2fs = %.0f tokens/s "
        "(%d workers, %s)",
        len(written),
        len(plan) - len(written),
        sum(r.num_documents for r in written),
        total_tokens,
        seconds,
        total_tokens / max(seconds, 1e-9),
        workers,
        tok.tokenizer_type,
    )
    return [results[s] for s, _ in plan]
