"""Streaming readers: one layer that every tool uses to read .jsonl, .json, .parquet and .txt corpora.

Memory stays flat in the file size: ``.jsonl`` and ``.txt`` are read line by line, ``.json`` (one
top-level array) is streamed with ijson, ``.parquet`` is read one record batch at a time.

Bad records are skipped, counted per kind in a :class:`ReadStats` and the first few are kept with their
file and position, so a summary at the end says exactly what was dropped. Positions are ``line N``
(1-based) for .jsonl/.txt, ``item N`` (0-based index in the array) for .json and ``row N`` (0-based)
for .parquet. A file that cannot be opened, is not of its format at all, or fails mid-read (a corrupt
parquet page, an I/O error) raises :class:`DataFileError` naming it and where it stopped (line, item, or
parquet row group and row).

Kinds of bad records:

=================  ==============================================================================
``invalid_json``   a .jsonl line that is not JSON; in a .json array, the rest of the file is lost
``invalid_utf8``   bytes that are not UTF-8 (or lone surrogates that cannot be encoded as UTF-8)
``not_an_object``  a record that is not a JSON object
``missing_field``  the text field is absent or null
``wrong_type``     the text field is not a string
``empty_text``     the text is empty or only whitespace
=================  ==============================================================================

``.txt`` files hold documents separated by blank lines (paragraph mode); each document keeps its
internal newlines. The record view of a .txt paragraph is ``{"text": paragraph}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
DEFAULT_TEXT_FIELDS = ("text", "content")
BAD_KINDS = ("invalid_json", "invalid_utf8", "not_an_object", "missing_field", "wrong_type", "empty_text")
# Metadata written next to data by z2all tools (pretokenize sidecars and the run manifest, whose name
# z2all.data.pretrain_dataset.MANIFEST_NAME owns); never read as corpus.
_SIDECAR_SUFFIXES = (".bin.json", ".ibin.json", ".sft.json")
_TOOL_FILE_NAMES = ("pretokenize_manifest.json",)
_PARQUET_BATCH_ROWS = 1024
# A "\uD800".."\uDFFF" JSON escape that is not half of a high+low pair: valid JSON, not encodable UTF-8.
_LONE_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_SCAN_BLOCK = 128 << 10  # small: reading a .json must keep memory flat (tests/data/test_readers.py)


class DataFileError(ValueError):
    """A data file that cannot be read at all (missing, unreadable, wrong format, no text column)."""


@dataclass
class ReadStats:
    """Counts of good and bad records; keeps the first ``max_examples`` bad ones with their position."""

    max_examples: int = 5
    good: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    truncated_files: list[str] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    n_bad = num_bad  # alias

    def add_bad(self, path: str | os.PathLike, where: str, kind: str, detail: str = "") -> None:
        assert kind in BAD_KINDS, kind
        self.bad[kind] = self.bad.get(kind, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{path}:{where}: {kind}" + (f" ({detail})" if detail else ""))

    def merge(self, other: ReadStats) -> None:
        self.good += other.good
        for k, v in other.bad.items():
            self.bad[k] = self.bad.get(k, 0) + v
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])
        self.truncated_files.extend(other.truncated_files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "good": self.good,
            "bad": dict(sorted(self.bad.items())),
            "examples": list(self.examples),
            "truncated_files": list(self.truncated_files),
        }

    def summary(self) -> str:
        if not self.num_bad:
            return f"{self.good} good records, no bad records"
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items()))
        lines = [f"{self.good} good records, {self.num_bad} bad records skipped ({kinds}); first ones:"]
        lines += [f"  {e}" for e in self.examples]
        lines += [f"  unreadable after an error, rest of file skipped: {p}" for p in self.truncated_files]
        return "\n".join(lines)


def list_data_files(data_dir: str | os.PathLike) -> list[Path]:
    """Every supported file under ``data_dir`` (recursive), sorted, skipping hidden files and sidecars."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataFileError(f"data folder {root} does not exist or is not a folder")
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name in _TOOL_FILE_NAMES or p.name.endswith(_SIDECAR_SUFFIXES):
            continue
        if p.suffix in SUPPORTED_SUFFIXES:
            files.append(p)
    return files


# ------------------------------------------------------------------------------------------- records
def iter_records(path: str | os.PathLike, stats: ReadStats | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(position, record)`` for every JSON-object record of a file (``{"text": ...}`` for .txt).

    Records that are not valid objects are counted in ``stats``; field checks are the caller's job
    (:func:`iter_documents` does them for text, the SFT/DPO datasets for messages and pairs).
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    suffix = path.suffix
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, stats)
    elif suffix == ".json":
        yield from _iter_json_array(path, stats)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, None, stats)
    elif suffix == ".txt":
        for line, text in _iter_txt(path, stats):
            yield line, {"text": text}
    else:
        raise DataFileError(f"{path}: unsupported file type {suffix!r} (use one of {SUPPORTED_SUFFIXES})")


def iter_documents(
    path: str | os.PathLike, text_field: str | None = None, stats: ReadStats | None = None
) -> Iterator[str]:
    """Yield the text of each good record of ``path``; bad ones are skipped and counted in ``stats``.

    ``text_field`` names the field/column; ``None`` or ``""`` tries ``text`` then ``content``.
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    fields = (text_field,) if text_field else DEFAULT_TEXT_FIELDS
    if path.suffix == ".txt":
        for line, text in _iter_txt(path, stats):
            if _check_text(text, path, f"line {line}", stats):
                yield text
        return
    if path.suffix == ".parquet":
        records = _iter_parquet(path, fields, stats)
        where = "row"
    else:
        records = iter_records(path, stats)
        where = "line" if path.suffix == ".jsonl" else "item"
    for pos, rec in records:
        value = None
        for f in fields:
            value = rec.get(f)
            if value is not None:
                break
        if value is None:
            stats.add_bad(path, f"{where} {pos}", "missing_field", f"no {' or '.join(map(repr, fields))}")
        elif not isinstance(value, str):
            stats.add_bad(path, f"{where} {pos}", "wrong_type", f"{type(value).__name__}, expected str")
        elif _check_text(value, path, f"{where} {pos}", stats):
            yield value


def _check_text(text: str, path: Path, where: str, stats: ReadStats) -> bool:
    if not text.strip():
        stats.add_bad(path, where, "empty_text")
        return False
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogate from a "\ud800" JSON escape
            stats.add_bad(path, where, "invalid_utf8", str(e.reason))
            return False
    stats.good += 1
    return True


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataFileError(f"cannot read data file {path}: {e}") from e


# --------------------------------------------------------------------------------------------- formats
def _read_failed(path: Path, where: str, e: OSError) -> DataFileError:
    return DataFileError(f"{path}: read failed {where}: {e}")


def _iter_jsonl(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict]]:
    with _open_binary(path) as f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines separate nothing and hold nothing
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
                except UnicodeDecodeError as e:
                    stats.add_bad(path, f"line {lineno}", "invalid_utf8", f"byte {e.start}")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    stats.add_bad(path, f"line {lineno}", "invalid_json", e.msg)
                    continue
                if not isinstance(rec, dict):
                    stats.add_bad(path, f"line {lineno}", "not_an_object", type(rec).__name__)
                    continue
                yield lineno, rec
        except OSError as e:
            raise _read_failed(path, f"after line {lineno}", e) from e


def _has_lone_surrogate_escape(f) -> bool:
    """True if the binary file ``f`` holds a lone-surrogate escape (read in blocks; rewinds ``f``).

    ijson's fast C backend silently turns such an escape into ``"?"``, which would put corrupted text
    into the corpus instead of counting the record as ``invalid_utf8``. Each round judges the matches
    that start in ``[lo, len(buf) - 12)``: 12 bytes after the start let the look-ahead see the pair,
    and the 24 carried bytes keep the 6-byte look-behind of the next round's first judged match.
    """
    f.seek(0)
    buf = b""
    lo = 0  # matches before lo were judged in the previous round (with their full context)
    while True:
        block = f.read(_SCAN_BLOCK)
        eof = not block
        buf += block
        hi = len(buf) if eof else len(buf) - 12
        if any(lo <= m.start() < hi for m in _LONE_SURROGATE_ESCAPE.finditer(buf)):
            f.seek(0)
            return True
        if eof:
            f.seek(0)
            return False
        lo = max(0, hi - max(0, len(buf) - 24))  # == 12 once buf holds >= 24 bytes
        buf = buf[-24:]


def _iter_json_array(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict]]:
    import ijson

    with _open_binary(path) as f:
        index = 0
        try:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            if not head.startswith(b"["):
                raise DataFileError(
                    f"{path}: a .json data file must be one top-level JSON array of records "
                    "(use .jsonl for one object per line)"
                )
            # The pure-Python backend keeps a lone surrogate in the str, so _check_text / the SFT
            # validators count the record as invalid_utf8; it is slower, so only files that need it use it.
            parser = ijson.get_backend("python") if _has_lone_surrogate_escape(f) else ijson
            for rec in parser.items(f, "item", use_float=True):
                if not isinstance(rec, dict):
                    stats.add_bad(path, f"item {index}", "not_an_object", type(rec).__name__)
                else:
                    yield index, rec
                index += 1
        except OSError as e:
            raise _read_failed(path, f"at item {index}", e) from e
        except ijson.JSONError as e:
            # A streaming parser cannot resynchronise inside an array: the rest of the file is lost.
            msg = str(e)
            kind = "invalid_utf8" if "UTF8" in msg or "utf-8" in msg.lower() else "invalid_json"
            stats.add_bad(path, f"item {index}", kind, msg.splitlines()[0] if msg else "")
            stats.truncated_files.append(str(path))
            logger.warning("%s: %s at item %d; the rest of this file is skipped", path, kind, index)


def _row_group_batches(pf, rg: int, columns: list[str] | None):
    """Record batches of row group ``rg``.

    ``ParquetFile.iter_batches`` over the whole file reads ahead: with pyarrow 26 its buffers grow with
    the file (10 MB held for an 8 MB file, 27 MB for 24 MB). Asking for one row group per call keeps
    Arrow's memory at about one decoded row group, whatever the number of row groups.
    """
    return pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns, row_groups=[rg])


def _iter_parquet(path: Path, fields: tuple[str, ...] | None, stats: ReadStats) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataFileError(f"cannot read parquet file {path}: {e}") from e
    columns = None
    if fields is not None:  # read only the text column
        names = pf.schema_arrow.names
        found = [f for f in fields if f in names]
        if not found:
            raise DataFileError(f"{path}: no column {' or '.join(map(repr, fields))} (columns: {names})")
        columns = found[:1]
    row = 0
    for rg in range(pf.num_row_groups):
        try:
            for batch in _row_group_batches(pf, rg, columns):
                # A corrupt page fails here: decompression (OSError "Corrupt snappy compressed data."),
                # decoding (ArrowException), or a string column holding non-UTF-8 bytes (UnicodeDecodeError).
                for rec in batch.to_pylist():
                    for k, v in rec.items():
                        if isinstance(v, bytes):  # binary column: decode ourselves to catch bad UTF-8
                            try:
                                rec[k] = v.decode("utf-8")
                            except UnicodeDecodeError as e:
                                stats.add_bad(
                                    path, f"row {row}", "invalid_utf8", f"column {k!r} byte {e.start}"
                                )
                                rec = None
                                break
                    if rec is not None:
                        yield row, rec
                    row += 1
        except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
            raise DataFileError(
                f"{path}: corrupt or unreadable parquet data in row group {rg} of {pf.num_row_groups} "
                f"(at row {row}): {e}"
            ) from e


def _iter_txt(path: Path, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """Yield ``(first line number, paragraph)``; paragraphs are separated by blank lines."""
    with _open_binary(path) as f:
        buf: list[str] = []
        start = lineno = 0
        broken = False
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if not broken:
                        stats.add_bad(path, f"line {lineno}", "invalid_utf8", f"byte {e.start}")
                    broken = True
                    line = "x\n"  # placeholder: keeps the paragraph open so the whole paragraph is skipped
                if line.strip():
                    if not buf:
                        start = lineno
                    buf.append(line)
                    continue
                if buf and not broken:
                    yield start, "".join(buf).rstrip("\r\n")
                buf, broken = [], False
        except OSError as e:
            raise _read_failed(path, f"after line {lineno}", e) from e
        if buf and not broken:
            yield start, "".join(buf).rstrip("\r\n")
