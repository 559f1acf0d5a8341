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
* Finished or not marked: the run deletes ``save_dir``'s manifest before it changes anything and writes
  it (``z2all.data.pretrain_dataset.write_manifest``) after the last sidecar, only if every source was
  read (or ``--allow_bad_files``). A source that cannot be read (``DataFileError``) is skipped, its old
  output removed, and reported at the end; the other files are still written, so a rerun after fixing it
  redoes only that file. Without a manifest the index builder and the dataset refuse the folder.
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
from tqdm import tqdm

from z2all.atomic import atomic_write_json, fsync_dir
from z2all.data.pretrain_dataset import (
    BIN_FORMAT,
    MANIFEST_NAME,
    PretokFormatError,
    read_pretokenize_manifest,
    read_sidecar,
    remove_manifest,
    sidecar_path,
    token_dtype,
    write_manifest,
)
from z2all.data.readers import DataFileError, ReadStats, iter_documents, list_data_files
from z2all.tokenizer import Z2allTokenizer
from z2all.tokenizer.chunked import DEFAULT_MAX_CHARS, encode_long

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
    allow_bad_files: bool = False
    """Mark the output complete (manifest, exit 0) even when some source files cannot be read; they are
    left out of the corpus and listed in the manifest. Without it such a run exits 2 and marks nothing."""

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
    skipped: bool  # up to date: not rewritten (the counts come from its sidecar)
    num_tokens: int = 0
    num_documents: int = 0
    stats: ReadStats = field(default_factory=ReadStats)
    error: str = ""  # why the source could not be read; then there is no .bin
    bin_id: str = ""  # of the .bin's sidecar (what the manifest records)


def plan_outputs(data_dir: Path, save_dir: Path) -> list[tuple[Path, Path]]:
    """``(source, <save_dir>/<rel dir>/<stem>.bin)`` for each data file; two sources may not share a .bin."""
    plan, seen = [], {}
    for src in list_data_files(data_dir):
        rel = src.relative_to(data_dir)
        out = save_dir / rel.parent / (rel.stem + ".bin")
        if out in seen:
            raise DataFileError(f"{src} and {seen[out]} would both write {out}; rename one of them")
        seen[out] = src
        plan.append((src, out))
    return plan


def source_signature(src: Path, text_field: str) -> dict:
    st = src.stat()
    return {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "text_field": text_field}


def up_to_date_sidecar(src: Path, bin_path: Path, fingerprint: str, text_field: str) -> dict | None:
    """The sidecar of ``bin_path`` if it was made from ``src`` as it is now with this tokenizer, else None."""
    try:
        meta = read_sidecar(bin_path)
    except (PretokFormatError, OSError):
        return None
    sig, old = source_signature(src, text_field), meta.get("source", {})
    same_source = all(old.get(k) == sig[k] for k in ("size", "mtime_ns", "text_field"))
    if not (same_source and meta.get("tokenizer_fingerprint") == fingerprint):
        return None
    if "max_token_id" not in meta:
        meta = _add_max_token_id(bin_path, meta)
    return meta


def _add_max_token_id(bin_path: Path, meta: dict) -> dict:
    """A sidecar of an older z2all has no ``max_token_id``: scan the .bin once (far cheaper than
    retokenizing) and rewrite the sidecar with it; the bin_id stays, so its indexes stay valid."""
    dtype = np.dtype(meta["dtype"])
    largest = -1
    with open(bin_path, "rb") as f:
        while block := f.read(1 << 24):  # 16 MiB, a whole number of ids
            largest = max(largest, int(np.frombuffer(block, dtype=dtype).max()))
    meta = {**meta, "max_token_id": largest}
    atomic_write_json(sidecar_path(bin_path), meta)
    logger.info("%s: recorded max_token_id=%d in its sidecar (written by an older z2all)", bin_path, largest)
    return meta


def _remove_output(bin_path: Path) -> None:
    """Delete the outputs of a source that is now unreadable: stale, and no finished run would list them."""
    sidecar_path(bin_path).unlink(missing_ok=True)  # sidecar first: the .bin never looks complete alone
    bin_path.unlink(missing_ok=True)


def summarize(results: list[FileResult]) -> str:
    """What a run did, one line, then the empty and the unreadable source files one per line."""
    bad = [r for r in results if r.error]
    empty = [r for r in results if not r.error and r.num_documents == 0]
    written = [r for r in results if not r.error and not r.skipped]
    lines = [
        f"{len(results)} source files: {len(written)} written, {len(results) - len(written) - len(bad)} up "
        f"to date, {len(empty)} empty, {len(bad)} unreadable; {sum(r.num_tokens for r in results)} tokens "
        f"in {len(results) - len(bad)} .bin files"
    ]
    lines += [f"  empty (no document): {r.source}" for r in empty]
    lines += [f"  unreadable, skipped: {r.error}" for r in bad]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- workers
_TOKENIZER: Z2allTokenizer | None = None
_DTYPE: np.dtype | None = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _TOKENIZER, _DTYPE
    _TOKENIZER = Z2allTokenizer.from_pretrained(tokenizer_dir)
    _DTYPE = np.dtype(dtype)


def _encode_chunk(task: tuple[int, list[str] | None]) -> tuple[int, np.ndarray | None, int]:
    """``(file index, ids of every doc each followed by EOS, number of docs)``; None marks end of file.

    A document longer than ``DEFAULT_MAX_CHARS`` is encoded in pieces cut where the tokenizer can
    never merge across (``z2all.tokenizer.chunked``): the same ids, with memory bounded by the piece
    size instead of the document's."""
    file_idx, texts = task
    if texts is None:
        return file_idx, None, 0
    short = iter(_TOKENIZER.encode_batch([t for t in texts if len(t) <= DEFAULT_MAX_CHARS]))
    eos = np.array([_TOKENIZER.eos_id], dtype=_DTYPE)
    parts = []
    for text in texts:  # document order kept; EOS once per document
        if len(text) <= DEFAULT_MAX_CHARS:
            parts.append(np.asarray(next(short), dtype=_DTYPE))
        else:
            parts.append(encode_long(_TOKENIZER, text, dtype=_DTYPE))
        parts.append(eos)
    return file_idx, np.concatenate(parts) if parts else np.empty(0, dtype=_DTYPE), len(texts)


def _tasks(
    todo: list[tuple[Path, Path]], cfg: PretokenizeConfig, stats: list[ReadStats], errors: list[str]
) -> Iterator[tuple]:
    """Chunks of documents of every file in order, then ``(file index, None)`` once a file is read.

    A file that cannot be read ends early: its error goes to ``errors[k]`` before its ``(k, None)``, so
    the consumer finds it there when that marker arrives (as it finds ``stats[k]`` final).
    """
    for k, (src, _) in enumerate(todo):
        chunk: list[str] = []
        chars = 0
        try:
            for text in iter_documents(src, cfg.text_field or None, stats[k]):
                chunk.append(text)
                chars += len(text)
                if chars >= cfg.chunk_chars:
                    yield k, chunk
                    chunk, chars = [], 0
            if chunk:
                yield k, chunk
        except DataFileError as e:
            errors[k] = str(e)
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
        self.max_token_id = -1

    def write(self, arr: np.ndarray, num_docs: int) -> None:
        self.f.write(arr.tobytes())  # arr is already little-endian uint16/uint32
        self.num_tokens += len(arr)
        self.num_documents += num_docs
        if len(arr):
            self.max_token_id = max(self.max_token_id, int(arr.max()))

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
    """Pretokenize every data file of ``cfg.data_dir``; returns one result per file (skipped or written).

    Unreadable sources are skipped and reported in their result; unless ``cfg.allow_bad_files``, the run
    then raises :class:`DataFileError` at the end and leaves ``save_dir`` without a manifest.
    """
    tok = Z2allTokenizer.from_pretrained(cfg.tokenizer_dir)
    fingerprint, dtype = tok.fingerprint(), token_dtype(tok.vocab_size)
    data_dir, save_dir = Path(cfg.data_dir), Path(cfg.save_dir)
    plan = plan_outputs(data_dir, save_dir)
    if not plan:
        raise FileNotFoundError(f"--data_dir={data_dir}: no .jsonl/.json/.parquet/.txt files found")
    # .bin files an earlier finished run put here from OTHER sources stay vouched for (a second run into
    # the same --save_dir adds to the corpus; it does not disown the first run's files).
    kept = _still_valid_bins(save_dir, {out for _, out in plan})
    remove_manifest(save_dir)  # from here until the end, the folder does not look finished
    results, todo = {}, []
    for src, out in plan:
        meta = None if cfg.force else up_to_date_sidecar(src, out, fingerprint, cfg.text_field)
        if meta is None:
            todo.append((src, out))
        else:
            logger.info("up to date, skipped: %s", out)
            results[src] = FileResult(
                src, out, True, meta["num_tokens"], meta["num_documents"], bin_id=meta["bin_id"]
            )
    stats = [ReadStats() for _ in todo]
    errors = [""] * len(todo)
    signatures = [source_signature(s, cfg.text_field) for s, _ in todo]  # before reading: a later edit reruns
    t0 = time.perf_counter()
    writers: dict[int, _BinWriter] = {}
    total_tokens = 0
    workers = cfg.num_workers if todo else 1
    pool = None
    if workers > 1:
        pool = _start_pool(workers, cfg.tokenizer_dir, dtype)
        # The reader runs in the pool's task-feeding thread; an unexpected error there is re-raised here
        # by imap at the position it happened (a DataFileError is caught by _tasks itself).
        results_iter = pool.imap(_encode_chunk, _tasks(todo, cfg, stats, errors), chunksize=1)
    else:  # encode in this process (HF tokenizers still multithreads inside encode_batch)
        _init_worker(cfg.tokenizer_dir, dtype.str)
        results_iter = map(_encode_chunk, _tasks(todo, cfg, stats, errors))
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
            # End of file k: the reader has finished it, so stats[k] and errors[k] are final.
            del writers[k]
            bar.update(signatures[k]["size"])
            if errors[k]:
                w.abort()
                _remove_output(out)
                results[src] = FileResult(src, out, False, stats=stats[k], error=errors[k])
                logger.warning("skipped: %s", errors[k])
                continue
            w.commit()
            meta = {
                "format": BIN_FORMAT,
                "dtype": dtype.str,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "tokenizer_fingerprint": fingerprint,
                "tokenizer_type": tok.tokenizer_type,
                "num_tokens": w.num_tokens,
                "num_documents": w.num_documents,
                "max_token_id": w.max_token_id,
                "bin_bytes": w.num_tokens * dtype.itemsize,
                "bin_id": uuid.uuid4().hex,
                "source": signatures[k],
                "bad_records": stats[k].to_dict(),
            }
            atomic_write_json(sidecar_path(out), meta)
            total_tokens += w.num_tokens
            results[src] = FileResult(
                src, out, False, w.num_tokens, w.num_documents, stats[k], bin_id=meta["bin_id"]
            )
            if stats[k].num_bad:
                logger.warning("%s: %s", src, stats[k].summary())
            if not w.num_documents:
                logger.warning("%s: no documents (%s); %s is empty", src, stats[k].summary(), out)
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
    written = [r for r in results.values() if not r.skipped and not r.error]
    logger.info(
        "pretokenized %d files: %d documents, %d tokens in %.2fs = %.0f tokens/s (%d workers, %s)",
        len(written),
        sum(r.num_documents for r in written),
        total_tokens,
        seconds,
        total_tokens / max(seconds, 1e-9),
        workers,
        tok.tokenizer_type,
    )
    ordered = [results[s] for s, _ in plan]
    bad = {str(r.source): r.error for r in ordered if r.error}
    if bad and not cfg.allow_bad_files:
        raise DataFileError(
            f"{summarize(ordered)}\n{save_dir} is not marked complete (no {MANIFEST_NAME}): fix or remove "
            "the unreadable files and rerun (finished files are skipped), or rerun with "
            "--allow_bad_files=true to leave them out"
        )
    write_manifest(save_dir, {**kept, **{r.bin_path: r.bin_id for r in ordered if not r.error}}, bad)
    return ordered


def _still_valid_bins(save_dir: Path, planned: set[Path]) -> dict[Path, str]:
    """``.bin`` -> ``bin_id`` of the existing manifest's entries that this run does not rewrite and
    whose file and sidecar are still the ones it vouched for (anything else is dropped)."""
    path = save_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        entries = read_pretokenize_manifest(path)["bins"]
    except PretokFormatError:
        return {}  # not a manifest we can trust: nothing is carried over
    kept = {}
    for rel, bin_id in entries.items():
        bin_path = save_dir / rel
        if bin_path in planned or not bin_path.is_file():
            continue
        try:
            if read_sidecar(bin_path).get("bin_id") == bin_id:
                kept[bin_path] = bin_id
        except PretokFormatError:
            continue
    return kept
