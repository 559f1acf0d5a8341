"""Streaming readers: every format, every bad-record kind with its position, flat memory, clear errors."""

from __future__ import annotations

import json
import os
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.conftest import write_corrupt_parquet
from z2all.data.pretrain_dataset import MANIFEST_NAME
from z2all.data.readers import (
    DataFileError,
    ReadStats,
    iter_documents,
    iter_records,
    list_data_files,
)

GOOD = ["first doc", "第二篇文章", "third\nwith lines"]


def _write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def test_jsonl_good_and_every_bad_kind(tmp_path):
    path = tmp_path / "a.jsonl"
    _write_jsonl(
        path,
        [
            _j({"text": GOOD[0]}),  # line 1
            b'{"text": "unterminated',  # 2 invalid_json
            b'{"text": "bad \xff byte"}',  # 3 invalid_utf8
            _j(["not", "an", "object"]),  # 4 not_an_object
            _j({"title": "no text"}),  # 5 missing_field
            _j({"text": None}),  # 6 missing_field (null)
            _j({"text": 42}),  # 7 wrong_type
            _j({"text": "   \n"}),  # 8 empty_text
            b'{"text": "lone \\ud800 surrogate"}',  # 9 invalid_utf8 (cannot be encoded)
            b"",  # 10 blank line: not a record
            _j({"text": GOOD[1]}),  # 11
            _j({"content": GOOD[2]}),  # 12 falls back to "content"
        ],
    )
    stats = ReadStats(max_examples=20)
    assert list(iter_documents(path, stats=stats)) == GOOD
    assert stats.good == 3
    assert stats.bad == {
        "invalid_json": 1,
        "invalid_utf8": 2,
        "not_an_object": 1,
        "missing_field": 2,
        "wrong_type": 1,
        "empty_text": 1,
    }
    where = [e.split(": ")[0] for e in stats.examples]
    assert where == [f"{path}:line {n}" for n in (2, 3, 4, 5, 6, 7, 8, 9)]
    summary = stats.summary()
    assert "8 bad records skipped" in summary and f"{path}:line 2: invalid_json" in summary


def test_jsonl_custom_text_field_and_records(tmp_path):
    path = tmp_path / "a.jsonl"
    _write_jsonl(path, [_j({"body": "x", "text": "ignored"}), _j({"text": "no body"}), _j({"body": "y"})])
    stats = ReadStats()
    assert list(iter_documents(path, text_field="body", stats=stats)) == ["x", "y"]
    assert stats.bad == {"missing_field": 1} and "line 2" in stats.examples[0]
    assert [n for n, _ in iter_records(path)] == [1, 2, 3]
    assert next(iter_records(path))[1] == {"body": "x", "text": "ignored"}


def test_json_array_streams_items_and_counts_bad_ones(tmp_path):
    path = tmp_path / "a.json"
    items = [{"content": GOOD[0]}, 7, {"content": ""}, {"content": GOOD[1]}, {"x": 1}, {"text": GOOD[2]}]
    path.write_text(json.dumps(items, ensure_ascii=False, indent=1), "utf-8")
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == GOOD
    assert stats.bad == {"not_an_object": 1, "empty_text": 1, "missing_field": 1}
    assert [e.split(": ")[0] for e in stats.examples] == [f"{path}:item {i}" for i in (1, 2, 4)]
    assert [i for i, _ in iter_records(path)] == [0, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "tail, kind",
    [(b'{"text": "b" x}, {"text": "c"}]', "invalid_json"), (b'{"text": "b\xff"}]', "invalid_utf8")],
)
def test_json_array_unrecoverable_error_reports_position_and_keeps_earlier_items(tmp_path, tail, kind):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"text": "a"}, {"text": "ok"}, ' + tail)
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == ["a", "ok"]
    assert stats.bad == {kind: 1}
    assert stats.examples[0].startswith(f"{path}:item 2: {kind}")
    assert stats.truncated_files == [str(path)]


def test_json_that_is_not_an_array_is_a_file_error(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"text": "one object"}')
    with pytest.raises(DataFileError, match="obj.json.*top-level JSON array"):
        list(iter_documents(path))


def test_parquet_string_and_binary_columns(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table({"content": pa.array([GOOD[0], None, "", GOOD[1], GOOD[2]]), "id": list(range(5))})
    pq.write_table(table, path, row_group_size=2)
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == GOOD
    assert stats.bad == {"missing_field": 1, "empty_text": 1}
    assert [e.split(": ")[0] for e in stats.examples] == [f"{path}:row 1", f"{path}:row 2"]
    assert [r for r, _ in iter_records(path)] == [0, 1, 2, 3, 4]

    binpath = tmp_path / "b.parquet"
    col = pa.array([b"ok bytes", b"bad \xff", "中文".encode()], type=pa.binary())
    pq.write_table(pa.table({"text": col}), binpath)
    stats = ReadStats()
    assert list(iter_documents(binpath, stats=stats)) == ["ok bytes", "中文"]
    assert stats.bad == {"invalid_utf8": 1} and "row 1" in stats.examples[0]


def test_parquet_without_text_column_is_a_file_error(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(
        DataFileError, match=r"a.parquet: no column 'text' or 'content' \(columns: \['body'\]\)"
    ):
        list(iter_documents(path))
    assert list(iter_documents(path, text_field="body")) == ["x"]


def test_txt_paragraphs_and_invalid_utf8(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"para one\nstill one\n\n\n  \npara \xff two\nmore\n\nthree\n")
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == ["para one\nstill one", "three"]
    assert stats.bad == {"invalid_utf8": 1} and stats.examples[0].startswith(f"{path}:line 6: invalid_utf8")
    assert list(iter_records(path)) == [(1, {"text": "para one\nstill one"}), (9, {"text": "three"})]


def test_unreadable_and_unsupported_files_raise_naming_the_file(tmp_path):
    with pytest.raises(DataFileError, match="missing.jsonl"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataFileError, match=r"a.csv: unsupported file type '.csv'"):
        list(iter_documents(tmp_path / "a.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="broken.parquet"):
        list(iter_documents(tmp_path / "broken.parquet"))
    with pytest.raises(DataFileError, match="does not exist"):
        list_data_files(tmp_path / "nope")


def test_corrupt_parquet_page_names_the_file_and_row_group(tmp_path):
    """pyarrow says only ``OSError: Corrupt snappy compressed data.``; the reader says which file and
    where, after yielding the rows of the good row group before it."""
    path = tmp_path / "corrupt.parquet"
    write_corrupt_parquet(path)
    got = []
    with pytest.raises(
        DataFileError, match=r"corrupt.parquet: .* row group 1 of 3 \(at row 1000\): Corrupt snappy"
    ):
        for doc in iter_documents(path):
            got.append(doc)
    assert len(got) == 1000
    with pytest.raises(DataFileError, match="corrupt.parquet: .* row group 1 of 3"):
        list(iter_records(path))


def test_parquet_string_column_with_bytes_that_are_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "u.parquet"
    strings = pa.array([b"fine", b"bad \xff byte"], type=pa.binary()).view(pa.string())  # not validated
    pq.write_table(pa.table({"text": strings}), path)
    with pytest.raises(DataFileError, match=r"u.parquet: .* row group 0 of 1 \(at row 0\): 'utf-8' codec"):
        list(iter_documents(path))


@pytest.mark.parametrize(
    "suffix, where", [(".jsonl", "after line 2"), (".txt", "after line 2"), (".json", "at item 0")]
)
def test_io_error_mid_file_names_the_file_and_position(tmp_path, monkeypatch, suffix, where):
    """An OSError while reading (EIO from a failing disk, a dropped network mount) is a DataFileError
    naming the file and how far the reader got."""
    import io

    import z2all.data.readers as readers

    class _FailingFile(io.BytesIO):
        def __init__(self):
            super().__init__(b'{"text": "one"}\n{"text": "two"}\n' if suffix != ".json" else b"[")
            self.lines = 0

        def __next__(self):
            self.lines += 1
            if self.lines > 2:
                raise OSError(5, "Input/output error")
            return super().__next__()

        def read(self, n=-1):
            if self.tell() > 0:
                raise OSError(5, "Input/output error")
            return super().read(n)

    monkeypatch.setattr(readers, "_open_binary", lambda path: _FailingFile())
    path = tmp_path / f"a{suffix}"
    with pytest.raises(
        DataFileError, match=rf"a{suffix}: read failed {where}: \[Errno 5\] Input/output error"
    ):
        list(iter_documents(path))


def test_list_data_files_skips_sidecars_hidden_and_other_types(tmp_path):
    for name in [
        "b.jsonl",
        "a.json",
        "sub/c.parquet",
        "d.txt",
        "x.bin.json",
        "x.ibin.json",
        "dialogues.jsonl.sft.json",
        MANIFEST_NAME,  # pretokenize's, when --save_dir is the corpus folder
        f"sub/{MANIFEST_NAME}",
        "x.bin",
        ".hidden.jsonl",
        "e.csv",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    got = [p.relative_to(tmp_path).as_posix() for p in list_data_files(tmp_path)]
    assert got == ["a.json", "b.jsonl", "d.txt", "sub/c.parquet"]


def test_stats_merge_and_to_dict():
    a, b = ReadStats(max_examples=2), ReadStats()
    a.add_bad("f", "line 1", "invalid_json")
    b.add_bad("g", "row 3", "wrong_type")
    b.add_bad("g", "row 4", "wrong_type")
    b.good = 5
    a.merge(b)
    assert a.to_dict() == {
        "good": 5,
        "bad": {"invalid_json": 1, "wrong_type": 2},
        "examples": ["f:line 1: invalid_json", "g:row 3: wrong_type"],
        "truncated_files": [],
    }


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".txt"])
def test_memory_stays_flat_in_file_size(tmp_path, suffix):
    """Streaming a ~8 MB file must not allocate anything near its size: Python heap (tracemalloc) peak
    < 1 MB, and Arrow's own buffers (not seen by tracemalloc; ~1.5 MB for one 0.5 MB row group) < 2 MB.
    Whole-file ``iter_batches`` held ~10 MB here: it reads ahead in proportion to the file."""
    path = tmp_path / f"big{suffix}"
    doc = "中文 text " * 100
    n = 8_000_000 // len(doc.encode())
    if suffix == ".parquet":
        # 16 row groups of ~0.5 MB each; no compression, so the file is as large as its text
        table = pa.table({"text": pa.array([f"{i} {doc}" for i in range(n)])})
        pq.write_table(table, path, row_group_size=n // 16 + 1, compression="none")
        assert pq.ParquetFile(path).num_row_groups == 16
        del table
    else:
        with open(path, "w", encoding="utf-8") as f:
            if suffix == ".json":
                f.write("[" + ",".join([json.dumps({"text": doc}, ensure_ascii=False)] * n) + "]")
            elif suffix == ".jsonl":
                f.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n") * n)
            else:  # .txt: paragraphs of two lines separated by blank lines
                f.write(f"{doc}\nsecond line\n\n" * n)
    assert os.path.getsize(path) > 7_000_000
    arrow_base = pa.total_allocated_bytes()
    arrow_peak = count = 0
    tracemalloc.start()
    for _ in iter_documents(path):
        count += 1
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    assert peak < 1_000_000, f"peak {peak} bytes while streaming {os.path.getsize(path)} bytes"
    assert arrow_peak < 2_000_000, f"Arrow held {arrow_peak} bytes while streaming"


def test_shared_pretrain_corpora_read_cleanly(shared_data):
    expected = {"zh_fortunes.jsonl": 5671, "zh_fortunes_part.parquet": 2000, "py_code.json": 120}
    for name, n in expected.items():
        stats = ReadStats()
        docs = list(iter_documents(shared_data / "pretrain" / name, stats=stats))
        assert len(docs) == n and stats.num_bad == 0, (name, stats.summary())
    zh = list(iter_documents(shared_data / "pretrain" / "zh_fortunes.jsonl"))
    part = list(iter_documents(shared_data / "pretrain" / "zh_fortunes_part.parquet"))
    assert part == zh[:2000]


def test_jsonl_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _j({"text": "first"}) + b"\n" + _j({"text": "second"}) + b"\n")
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == ["first", "second"] and stats.num_bad == 0
