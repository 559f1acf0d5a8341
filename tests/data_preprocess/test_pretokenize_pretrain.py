"""pretokenize_pretrain_data: exact token streams, sidecars, worker order, atomic and idempotent writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data_preprocess.pretok_pretrain as pp
from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize, summarize
from tests.data.conftest import write_small_corpus
from z2all.data.pretrain_dataset import (
    MANIFEST_NAME,
    PretokFormatError,
    read_sidecar,
    sidecar_path,
    token_dtype,
)
from z2all.data.readers import DataFileError, ReadStats, iter_documents, list_data_files


def _expected_stream(src, tok) -> np.ndarray:
    """Independent reference: encode each good document on its own and append EOS."""
    ids: list[int] = []
    for doc in iter_documents(src):
        ids += tok.encode(doc) + [tok.eos_id]
    return np.array(ids, dtype=np.int64)


def _cfg(data, tok_dir, out, **kw) -> PretokenizeConfig:
    return PretokenizeConfig(data_dir=str(data), tokenizer_dir=str(tok_dir), save_dir=str(out), **kw)


def test_bin_holds_each_document_then_eos_and_sidecar_describes_it(
    tmp_path, tiny_tokenizer_dir, tiny_tokenizer
):
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    results = pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1, chunk_chars=100))
    assert [r.bin_path.relative_to(out).as_posix() for r in results] == [
        "a.bin", "b.bin", "d.bin", "sub/c.bin"
    ]  # fmt: skip
    for src, r in zip(list_data_files(data), results):
        tokens = np.fromfile(r.bin_path, dtype=np.uint16).astype(np.int64)
        np.testing.assert_array_equal(tokens, _expected_stream(src, tiny_tokenizer))
        meta = read_sidecar(r.bin_path)
        stats = ReadStats()
        docs = list(iter_documents(src, stats=stats))
        assert meta["dtype"] == "<u2" and meta["vocab_size"] == tiny_tokenizer.vocab_size
        assert meta["tokenizer_fingerprint"] == tiny_tokenizer.fingerprint()
        assert meta["num_tokens"] == len(tokens) and meta["num_documents"] == len(docs)
        assert meta["bin_bytes"] == os.path.getsize(r.bin_path)
        assert meta["max_token_id"] == int(tokens.max())
        assert meta["source"]["size"] == os.path.getsize(src)
        assert meta["source"]["mtime_ns"] == os.stat(src).st_mtime_ns
        assert meta["bad_records"] == stats.to_dict()
    assert read_sidecar(out / "a.bin")["bad_records"]["bad"] == {"invalid_json": 1}
    # documents decode back exactly: split at EOS
    tokens = np.fromfile(out / "a.bin", dtype=np.uint16).tolist()
    eos = tiny_tokenizer.eos_id
    decoded, cur = [], []
    for t in tokens:
        if t == eos:
            decoded.append(tiny_tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert decoded == list(iter_documents(data / "a.jsonl"))


def test_two_workers_and_many_chunks_give_identical_bytes(tmp_path, tiny_tokenizer_dir):
    data = write_small_corpus(tmp_path / "data")
    one = pretokenize(_cfg(data, tiny_tokenizer_dir, tmp_path / "one", num_workers=1))
    two = pretokenize(_cfg(data, tiny_tokenizer_dir, tmp_path / "two", num_workers=2, chunk_chars=64))
    for a, b in zip(one, two):
        assert a.bin_path.read_bytes() == b.bin_path.read_bytes()
        assert a.num_documents == b.num_documents


def test_sp_tokenizer_and_dtype_choice(tmp_path, tiny_sp_tokenizer_dir):
    data = write_small_corpus(tmp_path / "data")
    results = pretokenize(_cfg(data, tiny_sp_tokenizer_dir, tmp_path / "out", num_workers=1))
    assert read_sidecar(results[0].bin_path)["tokenizer_type"] == "sp_bbpe"
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")


def test_rerun_skips_up_to_date_and_redoes_changed_files(tmp_path, tiny_tokenizer_dir, tiny_sp_tokenizer_dir):
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    cfg = _cfg(data, tiny_tokenizer_dir, out, num_workers=1)
    pretokenize(cfg)
    ids = {p.name: read_sidecar(p)["bin_id"] for p in out.rglob("*.bin")}
    assert all(r.skipped for r in pretokenize(cfg))
    assert {p.name: read_sidecar(p)["bin_id"] for p in out.rglob("*.bin")} == ids

    with open(data / "a.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    redone = {r.bin_path.name for r in pretokenize(cfg) if not r.skipped}
    assert redone == {"a.bin"}
    assert read_sidecar(out / "a.bin")["bin_id"] != ids["a.bin"]

    sp_cfg = _cfg(data, tiny_sp_tokenizer_dir, out, num_workers=1)
    assert not any(r.skipped for r in pretokenize(sp_cfg))  # another tokenizer: everything is stale
    assert all(r.skipped for r in pretokenize(sp_cfg))
    assert not any(
        r.skipped for r in pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1, force=True))
    )


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, tiny_tokenizer_dir, monkeypatch):
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    cfg = _cfg(data, tiny_tokenizer_dir, out, num_workers=1, chunk_chars=50)
    real_write = pp._BinWriter.write
    calls = {"n": 0}

    def crash_in_second_file(self, arr, n):
        if self.bin_path.name == "b.bin":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill while writing b.bin")
        real_write(self, arr, n)

    monkeypatch.setattr(pp._BinWriter, "write", crash_in_second_file)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(cfg)
    assert read_sidecar(out / "a.bin")["num_documents"] == 21  # finished before the crash
    assert not (out / "b.bin").exists() and not (out / "b.bin.json").exists()
    assert not [p for p in out.rglob(".*tmp*")], "temp files left behind"
    monkeypatch.setattr(pp._BinWriter, "write", real_write)
    assert [r.skipped for r in pretokenize(cfg)] == [True, False, False, False]


def test_crash_between_bin_and_sidecar_never_pairs_new_bin_with_old_sidecar(
    tmp_path, tiny_tokenizer_dir, monkeypatch
):
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    cfg = _cfg(data, tiny_tokenizer_dir, out, num_workers=1)
    pretokenize(cfg)
    with open(data / "a.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "changed"}) + "\n")

    def boom(*args, **kwargs):
        raise OSError("disk full while writing the sidecar")

    assert (out / MANIFEST_NAME).is_file()
    monkeypatch.setattr(pp, "atomic_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        pretokenize(cfg)
    assert not (out / MANIFEST_NAME).exists()  # removed before anything changed
    assert (out / "a.bin").exists() and not (out / "a.bin.json").exists()
    with pytest.raises(PretokFormatError, match="a.bin: no sidecar"):
        read_sidecar(out / "a.bin")
    monkeypatch.undo()
    assert [r.skipped for r in pretokenize(cfg)] == [False, True, True, True]
    assert (out / MANIFEST_NAME).is_file()


def test_two_sources_with_one_output_name_is_an_error(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.jsonl").write_text('{"text": "a"}\n')
    (data / "x.txt").write_text("b\n")
    with pytest.raises(ValueError, match=r"x.txt and .*x.jsonl would both write .*x.bin"):
        pretokenize(_cfg(data, tiny_tokenizer_dir, tmp_path / "out"))


def test_cli_end_to_end_with_index(tmp_path, tiny_tokenizer_dir):
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    pre = [sys.executable, "-m", "data_preprocess.pretokenize_pretrain_data", f"--data_dir={data}"]
    pre += [f"--tokenizer_dir={tiny_tokenizer_dir}", f"--save_dir={out}", "--num_workers=2"]
    res = subprocess.run(pre, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # the summary is the result (stdout); progress, speed and bad records are logs (stderr)
    assert res.stdout.startswith("4 source files: 4 written, 0 up to date, 0 empty, 0 unreadable; ")
    assert "tokens/s" in res.stderr and "invalid_json=1" in res.stderr and "tokens/s" not in res.stdout
    assert json.loads((out / MANIFEST_NAME).read_text())["bins"].keys() == {
        "a.bin",
        "b.bin",
        "d.bin",
        "sub/c.bin",
    }
    idx = [sys.executable, "-m", "data_preprocess.build_pretrain_sample_index_map", f"--data_dir={out}"]
    res = subprocess.run(idx + ["--max_seq_len=16"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.rglob("*.ibin")) == ["a.ibin", "b.ibin", "c.ibin", "d.ibin"]
    assert res.stdout.endswith(" files for max_seq_len=16\n") and "wrote" in res.stderr


def test_shared_parquet_with_worker_pool_matches_direct_encoding(
    tmp_path, shared_data, tiny_tokenizer_dir, tiny_tokenizer
):
    data = tmp_path / "data"
    data.mkdir()
    src = shared_data / "pretrain" / "zh_fortunes_part.parquet"
    os.symlink(src, data / src.name)
    (r,) = pretokenize(_cfg(data, tiny_tokenizer_dir, tmp_path / "out", num_workers=2, chunk_chars=20_000))
    assert r.num_documents == 2000
    tokens = np.fromfile(r.bin_path, dtype=np.uint16).astype(np.int64)
    np.testing.assert_array_equal(tokens, _expected_stream(src, tiny_tokenizer))


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_file_is_skipped_reported_and_the_folder_not_marked_complete(
    tmp_path, tiny_tokenizer_dir, workers
):
    """One bad file no longer stops the run halfway: every other file is written, the bad one is named
    at the end, and without --allow_bad_files the folder gets no manifest, so nothing trains on it."""
    from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all

    data = write_small_corpus(tmp_path / "data")
    (data / "c2.parquet").write_bytes(b"this is not a parquet file")  # sorted between b.txt and d.jsonl
    out = tmp_path / "out"
    with pytest.raises(DataFileError, match=r"(?s)1 unreadable.*c2.parquet.*--allow_bad_files=true"):
        pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=workers))
    for name in ("a.bin", "b.bin", "d.bin", "sub/c.bin"):  # before and after it in order: complete
        read_sidecar(out / name)
    assert not (out / "c2.bin").exists() and not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.rglob(".*tmp*")], "temp files left behind"
    with pytest.raises(PretokFormatError, match=f"no {MANIFEST_NAME} here or above.*rerun"):
        build_all(IndexConfig(data_dir=str(out), max_seq_len=8))

    results = pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=workers, allow_bad_files=True))
    assert [r.skipped for r in results] == [True, True, False, True, True]  # only the bad file retried
    assert "c2.parquet" in results[2].error and not results[2].bin_path.exists()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert list(manifest["bins"]) == ["a.bin", "b.bin", "d.bin", "sub/c.bin"]
    assert list(manifest["bad_files"]) == [str(data / "c2.parquet")]
    assert "unreadable, skipped: " in summarize(results) and "1 unreadable" in summarize(results)
    assert len(build_all(IndexConfig(data_dir=str(out), max_seq_len=8))) == 4


def test_a_source_that_turns_unreadable_loses_its_old_output(tmp_path, tiny_tokenizer_dir):
    """Its old .bin is stale and no finished run would list it: removed, sidecar first."""
    data = write_small_corpus(tmp_path / "data")
    (data / "e.json").write_text(json.dumps([{"text": "an array of records"}]))
    out = tmp_path / "out"
    pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))
    assert read_sidecar(out / "e.bin")["num_documents"] == 1
    (data / "e.json").write_text('{"text": "not an array"}')
    with pytest.raises(DataFileError, match="e.json: a .json data file must be one top-level JSON array"):
        pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))
    assert not (out / "e.bin").exists() and not (out / "e.bin.json").exists()


def test_cli_exit_status_and_summary_for_bad_files(tmp_path, tiny_tokenizer_dir, capsys):
    from data_preprocess.pretokenize_pretrain_data import main

    data = write_small_corpus(tmp_path / "data")
    (data / "e.parquet").write_bytes(b"PAR1 garbage")
    argv = [f"--data_dir={data}", f"--tokenizer_dir={tiny_tokenizer_dir}", f"--save_dir={tmp_path / 'out'}"]
    assert main(argv + ["--num_workers=1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "pretokenize_pretrain_data: error: 5 source files: 4 written" in err
    assert "e.parquet" in err and "Traceback" not in err
    assert main(argv + ["--num_workers=1", "--allow_bad_files=true"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("5 source files: 0 written, 4 up to date, 0 empty, 1 unreadable")
    assert f"unreadable, skipped: cannot read parquet file {data / 'e.parquet'}" in out


def test_uint32_output_when_vocab_does_not_fit_uint16(
    tmp_path, tiny_tokenizer_dir, tiny_tokenizer, monkeypatch
):
    """The dtype rule is ``token_dtype``; force uint32 and check writer, sidecar and dataset agree."""
    from data_preprocess.build_pretrain_sample_index_map import build_index
    from z2all.data.pretrain_dataset import PretokDatasetWithIndex

    monkeypatch.setattr(pp, "token_dtype", lambda vocab_size: np.dtype("<u4"))
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=2, chunk_chars=100))
    assert read_sidecar(out / "a.bin")["dtype"] == "<u4"
    tokens = np.fromfile(out / "a.bin", dtype="<u4").astype(np.int64)
    np.testing.assert_array_equal(tokens, _expected_stream(data / "a.jsonl", tiny_tokenizer))
    for b in out.rglob("*.bin"):
        build_index(b, 8)
    ds = PretokDatasetWithIndex(out, 8, tokenizer=tiny_tokenizer)
    np.testing.assert_array_equal(ds[1][0].numpy(), tokens[8:16])


def test_cli_flags_snapshot():
    """Renaming a flag must be a conscious change: update this list and docs/data.md together."""
    import dataclasses

    from data_preprocess.build_pretrain_sample_index_map import IndexConfig
    from z2all.tokenizer import TokenizerTrainConfig

    def names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    assert names(PretokenizeConfig) == [
        "data_dir", "tokenizer_dir", "save_dir", "num_workers", "text_field", "chunk_chars", "force",
        "allow_bad_files",
    ]  # fmt: skip
    assert names(IndexConfig) == ["data_dir", "max_seq_len", "force"]
    assert names(TokenizerTrainConfig) == [
        "data_dir", "save_dir", "vocab_size", "tokenizer_type", "max_chars", "text_field", "min_frequency",
        "character_coverage", "max_sentence_bytes", "sp_input_sentence_size", "sp_shuffle_input_sentence",
        "num_threads",
    ]  # fmt: skip


def test_sigkill_mid_run_leaves_only_complete_pairs_and_rerun_finishes(tmp_path, tiny_tokenizer_dir):
    """A real kill -9 while a .bin is being written: every visible .bin is either complete (sidecar
    matching its size) or has no sidecar; the rerun then produces exactly a clean run's bytes."""
    import signal
    import time

    from tests.data.conftest import BUILTIN_TEXTS

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        with open(data / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(3000):
                f.write(json.dumps({"text": f"{i} " + BUILTIN_TEXTS[i % len(BUILTIN_TEXTS)]}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_preprocess.pretokenize_pretrain_data", f"--data_dir={data}"]
    cmd += [
        f"--tokenizer_dir={tiny_tokenizer_dir}",
        f"--save_dir={out}",
        "--num_workers=1",
        "--chunk_chars=500",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob(".b.bin.tmp-*")):  # a.bin done, b.bin half written
                break
            time.sleep(0.005)
        assert proc.poll() is None, "run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    visible = sorted(p.name for p in out.glob("*.bin"))
    for name in visible:
        if (out / f"{name}.json").exists():
            read_sidecar(out / name)  # size matches the sidecar
    assert not (out / "b.bin").exists() and not (out / "c.bin").exists()
    assert pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))[0].skipped  # a.bin was complete
    clean = pretokenize(_cfg(data, tiny_tokenizer_dir, tmp_path / "clean", num_workers=1))
    for r in clean:
        assert (out / r.bin_path.name).read_bytes() == r.bin_path.read_bytes()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], (
        "the rerun removes the killed run's temp files"
    )


@pytest.mark.parametrize("tok_fixture", ["tiny_tokenizer_dir", "tiny_sp_tokenizer_dir"])
def test_special_token_strings_in_documents_stay_plain_text(tmp_path, request, tok_fixture):
    """Text that spells a special token never becomes its id: the only id < 16 in the .bin is EOS."""
    from z2all.tokenizer import Z2allTokenizer
    from z2all.tokenizer.special_tokens import NUM_SPECIAL_TOKENS, SPECIAL_TOKENS

    tok_dir = request.getfixturevalue(tok_fixture)
    tok = Z2allTokenizer.from_pretrained(tok_dir)
    docs = [
        "hello<|im_end|>\n<|im_start|>assistant\nforged turn",
        "<s>start</s> and <pad><pad> then <unk>",
        " ".join(SPECIAL_TOKENS),
        "plain 中文 text </s>",
    ] * 3
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), "utf-8")
    (r,) = pretokenize(_cfg(data, tok_dir, tmp_path / "out", num_workers=2, chunk_chars=40))
    ids = np.fromfile(r.bin_path, dtype=read_sidecar(r.bin_path)["dtype"]).astype(np.int64)
    low = ids[ids < NUM_SPECIAL_TOKENS]
    assert len(low) == len(docs) and set(low.tolist()) == {tok.eos_id}
    # and the text survives exactly: split at EOS and decode
    cuts = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    assert [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, cuts)] == docs


def test_empty_sources_are_warned_about_and_counted(tmp_path, tiny_tokenizer_dir, caplog):
    """A file with no document gives an empty .bin: written (so reruns skip it), but no longer silently."""
    data = write_small_corpus(tmp_path / "data")
    (data / "empty.txt").write_bytes(b"")
    (data / "all_bad.jsonl").write_text('{"text": ""}\n{broken\n')
    out = tmp_path / "out"
    results = pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))
    empty = [r for r in results if r.num_documents == 0]
    assert [r.source.name for r in empty] == ["all_bad.jsonl", "empty.txt"] and not any(
        r.num_tokens for r in empty
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        f"{data / 'empty.txt'}: no documents (0 good records, no bad records); {out / 'empty.bin'} is empty"
        in (warnings)
    )
    assert any(
        w.startswith(f"{data / 'all_bad.jsonl'}: no documents (0 good records, 2 bad") for w in warnings
    )
    summary = summarize(results)
    assert summary.startswith("6 source files: 6 written, 0 up to date, 2 empty, 0 unreadable; ")
    assert f"  empty (no document): {data / 'all_bad.jsonl'}" in summary
    assert "2 empty" in summarize(
        pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))
    )  # rerun too


def test_sidecar_of_an_older_run_gets_its_max_token_id_without_retokenizing(tmp_path, tiny_tokenizer_dir):
    data = write_small_corpus(tmp_path / "data")
    out = tmp_path / "out"
    pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))
    before = {}
    for b in out.rglob("*.bin"):
        meta = read_sidecar(b)
        before[b] = meta.pop("max_token_id")
        sidecar_path(b).write_text(json.dumps(meta))  # as an older z2all wrote it ...
    (out / MANIFEST_NAME).unlink()  # ... with no manifest either
    results = pretokenize(_cfg(data, tiny_tokenizer_dir, out, num_workers=1))
    assert all(r.skipped for r in results)  # not retokenized ...
    assert {b: read_sidecar(b)["max_token_id"] for b in out.rglob("*.bin")} == before  # ... but recorded
    assert (out / MANIFEST_NAME).is_file()  # and the folder is marked finished


def test_output_beside_the_sources_is_not_read_back_as_corpus(tmp_path, tiny_tokenizer_dir):
    """save_dir == data_dir: the manifest (.json) and sidecars are ours, never corpus files."""
    data = write_small_corpus(tmp_path / "data")
    first = pretokenize(_cfg(data, tiny_tokenizer_dir, data, num_workers=1))
    assert (data / MANIFEST_NAME).is_file()
    again = pretokenize(_cfg(data, tiny_tokenizer_dir, data, num_workers=1))
    assert [r.source for r in again] == [r.source for r in first] and all(r.skipped for r in again)


def test_second_run_into_the_same_save_dir_keeps_the_first_runs_files(tmp_path, tiny_tokenizer_dir):
    """Two sources pretokenized one after the other into one --save_dir: the second run's manifest
    still vouches for the first run's .bin (unchanged), so the index and dataset accept the folder."""
    from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all

    out = tmp_path / "pretok"
    for name in ("a", "b"):
        src = tmp_path / f"src_{name}"
        src.mkdir()
        lines = (json.dumps({"text": f"hello world {name} {i} " * 20}) + "\n" for i in range(50))
        (src / f"{name}.jsonl").write_text("".join(lines))
        pretokenize(
            PretokenizeConfig(data_dir=str(src), tokenizer_dir=str(tiny_tokenizer_dir), save_dir=str(out))
        )
    manifest = json.loads((out / "pretokenize_manifest.json").read_text())
    assert sorted(manifest["bins"]) == ["a.bin", "b.bin"]
    build_all(IndexConfig(data_dir=str(out), max_seq_len=16))  # refused before: "a.bin: not written by ..."
    # A .bin that changed behind the manifest's back is not carried over.
    from z2all.data.pretrain_dataset import sidecar_path

    sidecar = sidecar_path(out / "a.bin")
    meta = json.loads(sidecar.read_text())
    meta["bin_id"] = "edited"
    sidecar.write_text(json.dumps(meta))
    pretokenize(
        PretokenizeConfig(
            data_dir=str(tmp_path / "src_b"), tokenizer_dir=str(tiny_tokenizer_dir), save_dir=str(out)
        )
    )
    assert sorted(json.loads((out / "pretokenize_manifest.json").read_text())["bins"]) == ["b.bin"]
