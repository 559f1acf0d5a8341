"""Records of an SFT/DPO source file, parsed one by one, with a report of what was skipped and why.

Shared by the SFT and DPO builders. Records are numbered (``line N`` in .jsonl, ``item N`` in a
.json array, ``row N`` in .parquet); a ``parse`` function turns a record into the builder's
input or raises :class:`~z2all.data.chat.ChatFormatError` naming the record. Bad records are counted
and the first few named, never fatal: one broken line in a million should not stop a run, but the
report (logged, and stored in the pretokenized sidecar) makes it visible.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from z2all.data.chat import ChatFormatError
from z2all.data.readers import DataFileError, ReadStats, iter_records

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # how many bad / dropped records a report names
T = TypeVar("T")


class BuildMemo:
    """The most recently tokenized sources of this process, up to ``max_bytes`` of token arrays.

    A trainer builds a train and a valid dataset over the same files; both see the same key (source
    size + mtime, tokenizer fingerprint, settings), so the second one reuses the first one's arrays
    instead of tokenizing again. Values are shared, never mutated. Least recently used goes first.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()  # key -> (value, nbytes)

    @staticmethod
    def make_key(kind: str, source: str | os.PathLike, key: dict) -> tuple:
        return (kind, str(Path(source).resolve()), json.dumps(key, sort_keys=True))

    def get(self, key: tuple) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: tuple, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, nbytes)
        self._items.move_to_end(key)
        while sum(n for _, n in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


# Shared by the SFT and DPO datasets of this process.
BUILD_MEMO = BuildMemo(max_bytes=2 << 30)


@dataclass
class BuildReport:
    """What happened to the records of one source."""

    source: str
    n_records: int = 0  # records in the file, good or bad
    n_bad: int = 0  # skipped: unparsable JSON, or not in an accepted layout
    n_samples: int = 0  # samples kept
    n_truncated: int = 0  # kept, but cut to max_seq_len
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count of valid records not kept
    bad_examples: list[str] = field(default_factory=list)  # "file line N: reason", the first few
    dropped_examples: list[str] = field(default_factory=list)  # "file line N: reason", the first few

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def add_bad(self, where: str, reason: str) -> None:
        self.n_bad += 1
        if len(self.bad_examples) < MAX_EXAMPLES:
            self.bad_examples.append(f"{where}: {reason}")

    def add_dropped(self, where: str, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.dropped_examples) < MAX_EXAMPLES:
            self.dropped_examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        return asdict(self)

    def log_summary(self) -> None:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        logger.info(
            "%s: %d samples from %d records (%d truncated); dropped %d (%s); %d bad records",
            *(
                self.source,
                self.n_samples,
                self.n_records,
                self.n_truncated,
                self.n_dropped,
                dropped,
                self.n_bad,
            ),
        )
        for line in self.bad_examples:
            logger.warning("bad record %s", line)
        if self.n_bad and not self.n_samples and not self.n_dropped:
            logger.warning("%s: every record is bad; is this file in the format you selected?", self.source)
        for line in self.dropped_examples:
            logger.info("dropped %s", line)


def iter_json_records(path: str | os.PathLike, stats: ReadStats) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of a .jsonl/.json/.parquet source; unparsable records go to ``stats``.

    .json and .parquet go through the shared reader (streamed; records must be objects). .jsonl is
    read here because a conversation may be a bare JSON *list* of messages per line, which the
    shared reader (objects only) would reject.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        kind = "item" if path.suffix == ".json" else "row"
        for pos, record in iter_records(path, stats=stats):
            yield f"{path}:{kind} {pos}", record
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataFileError(f"cannot read data file {path}: {e}") from e
    with f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    # utf-8-sig on line 1: files saved by some Windows editors start with a BOM.
                    record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except UnicodeDecodeError as e:
                    stats.add_bad(path, f"line {lineno}", "invalid_utf8", f"byte {e.start}")
                    continue
                except json.JSONDecodeError as e:
                    stats.add_bad(path, f"line {lineno}", "invalid_json", f"{e.msg} at column {e.colno}")
                    continue
                if not isinstance(record, (dict, list)):
                    stats.add_bad(path, f"line {lineno}", "not_an_object", type(record).__name__)
                    continue
                yield f"{path}:line {lineno}", record
        except OSError as e:  # the same message as the shared reader's (z2all.data.readers)
            raise DataFileError(f"{path}: read failed after line {lineno}: {e}") from e


@dataclass
class _ReportingStats(ReadStats):
    """Reader stats that also enter each unparsable record into a :class:`BuildReport`, in file order."""

    report: BuildReport | None = None

    def add_bad(self, path: str | os.PathLike, where: str, kind: str, detail: str = "") -> None:
        super().add_bad(path, where, kind, detail)
        self.report.n_records += 1
        self.report.add_bad(f"{path}:{where}", kind + (f" ({detail})" if detail else ""))


def iter_parsed(
    path: str | os.PathLike, parse: Callable[[Any, str], T], report: BuildReport
) -> Iterator[tuple[T, str]]:
    """``(parse(record, where), where)`` for each good record; bad ones are counted in ``report``."""
    stats = _ReportingStats(report=report)
    for where, record in iter_json_records(path, stats):
        report.n_records += 1
        try:
            yield parse(record, where), where
        except ChatFormatError as e:
            report.add_bad(where, str(e).removeprefix(f"{where}: "))


def iter_parsed_chunks(
    path: str | os.PathLike, parse: Callable[[Any, str], T], report: BuildReport, size: int = 512
) -> Iterator[list[tuple[T, str]]]:
    """:func:`iter_parsed` in lists of up to ``size`` items (records per ``encode_batch`` call)."""
    chunk: list[tuple[T, str]] = []
    for item in iter_parsed(path, parse, report):
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
