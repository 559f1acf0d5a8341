"""PretokDatasetWithIndex and .ibin: exact sample windows, exact splits, stale or foreign data refused."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all, build_index
from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize
from data_preprocess.pretok_sft import PretokenizeSFTConfig, pretokenize_sft
from tests.data.conftest import pretokenize_small_corpus
from z2all.data.pretrain_dataset import (
    IBIN_HEADER,
    MANIFEST_NAME,
    SFT_BIN_SUFFIX,
    IbinHeader,
    PretokDatasetWithIndex,
    PretokFormatError,
    ibin_path,
    list_pretrain_bins,
    num_windows,
    read_sidecar,
    sidecar_path,
    write_manifest,
)
from z2all.data.sft_shards import sft_paths

L = 16


@pytest.fixture
def bin_dir(tmp_path, tiny_tokenizer_dir):
    return pretokenize_small_corpus(tmp_path, tiny_tokenizer_dir, max_seq_len=L)


def _streams(bin_dir) -> list[np.ndarray]:
    return [np.fromfile(p, dtype=np.uint16).astype(np.int64) for p in sorted(bin_dir.rglob("*.bin"))]


def test_every_sample_is_the_right_window_of_the_token_stream(bin_dir, tiny_tokenizer):
    ds = PretokDatasetWithIndex(bin_dir, L, tokenizer=tiny_tokenizer)
    streams = _streams(bin_dir)
    expected = []  # independent reference: windows of L+1 tokens every L tokens, file by file
    for s in streams:
        k = 0
        while k * L + L + 1 <= len(s):
            expected.append(s[k * L : k * L + L + 1])
            k += 1
    assert len(ds) == len(expected) == sum(num_windows(len(s), L) for s in streams) > 20
    assert len(streams[2]) < L + 1  # d.bin: too short for one window, contributes no sample
    for i, w in enumerate(expected):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (L,)
        np.testing.assert_array_equal(x.numpy(), w[:-1])
        np.testing.assert_array_equal(y.numpy(), w[1:])
    # overlap-by-one packing covers each file's stream up to the last full window, nothing skipped
    for s, p in zip(streams, sorted(bin_dir.rglob("*.bin"))):
        n = num_windows(len(s), L)
        offsets = np.fromfile(ibin_path(p), dtype="<u8", offset=IBIN_HEADER.size)
        np.testing.assert_array_equal(offsets, np.arange(n) * L)


def test_window_edge_cases(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    n_tokens = len(tiny_tokenizer.encode("tiny")) + 1
    (data / "d.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    out = tmp_path / "bin"
    pretokenize(
        PretokenizeConfig(data_dir=str(data), tokenizer_dir=str(tiny_tokenizer_dir), save_dir=str(out))
    )
    assert build_index(out / "d.bin", n_tokens - 1) == (1, True)  # exactly L+1 tokens: one sample
    assert build_index(out / "d.bin", n_tokens) == (0, True)  # one short: none
    assert (
        num_windows(0, 4) == 0
        and num_windows(5, 4) == 1
        and num_windows(9, 4) == 2
        and num_windows(8, 4) == 1
    )


@pytest.mark.parametrize("kw", [{"valid_ratio": 0.1}, {"valid_samples": 3}, {"valid_ratio": 0.1, "seed": 7}])
def test_train_and_valid_split_partition_all_samples(bin_dir, kw):
    train = PretokDatasetWithIndex(bin_dir, L, split="train", **kw)
    valid = PretokDatasetWithIndex(bin_dir, L, split="valid", **kw)
    n = train.total_samples
    n_valid = kw.get("valid_samples") or round(n * kw["valid_ratio"])
    assert len(valid) == n_valid and len(train) == n - n_valid
    t = [train.global_index(i) for i in range(len(train))]
    v = [valid.global_index(i) for i in range(len(valid))]
    assert sorted(t + v) == list(range(n))  # disjoint and complete
    assert t == sorted(t) and v == sorted(v)
    assert v == [
        PretokDatasetWithIndex(bin_dir, L, split="valid", **kw).global_index(i) for i in range(len(v))
    ]
    x, _ = valid[0]
    full = PretokDatasetWithIndex(bin_dir, L)
    assert torch.equal(x, full[v[0]][0])
    with pytest.raises(IndexError):
        valid[len(valid)]


def test_split_seed_moves_validation_and_bad_sizes_are_refused(bin_dir):
    a = PretokDatasetWithIndex(bin_dir, L, split="valid", valid_samples=4, seed=0)
    b = PretokDatasetWithIndex(bin_dir, L, split="valid", valid_samples=4, seed=1)
    assert [a.global_index(i) for i in range(4)] != [b.global_index(i) for i in range(4)]
    n = a.total_samples
    for bad in (n, n // 2 + 1, -1):
        with pytest.raises(ValueError, match="cannot hold out"):
            PretokDatasetWithIndex(bin_dir, L, valid_samples=bad)
    with pytest.raises(ValueError, match="split"):
        PretokDatasetWithIndex(bin_dir, L, split="test")


def test_refuses_other_tokenizer(bin_dir, tiny_sp_tokenizer_dir):
    with pytest.raises(PretokFormatError, match=r"a.bin: pretokenized with tokenizer .* given tokenizer"):
        PretokDatasetWithIndex(bin_dir, L, tokenizer=tiny_sp_tokenizer_dir)


def test_refuses_truncated_bin(bin_dir):
    p = bin_dir / "b.bin"
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 2)
    with pytest.raises(PretokFormatError, match=r"b.bin: size .* sidecar says"):
        PretokDatasetWithIndex(bin_dir, L)


def test_refuses_bin_without_sidecar(bin_dir):
    (bin_dir / "a.bin.json").unlink()
    with pytest.raises(PretokFormatError, match="a.bin: no sidecar"):
        PretokDatasetWithIndex(bin_dir, L)


def test_refuses_index_for_other_max_seq_len_or_missing_or_stale(bin_dir, tmp_path, tiny_tokenizer_dir):
    with pytest.raises(PretokFormatError, match="a.ibin: built for max_seq_len=16, not 32"):
        PretokDatasetWithIndex(bin_dir, 32)
    build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=32))
    assert len(PretokDatasetWithIndex(bin_dir, 32)) > 0
    ibin_path(bin_dir / "b.bin").unlink()
    with pytest.raises(PretokFormatError, match="b.bin: no sample index b.ibin"):
        PretokDatasetWithIndex(bin_dir, 32)
    # Re-pretokenizing gives the .bin a new bin_id: the old index is stale even if sizes agree.
    cfg = PretokenizeConfig(
        data_dir=str(tmp_path / "data"),
        tokenizer_dir=str(tiny_tokenizer_dir),
        save_dir=str(bin_dir),
        force=True,
    )
    build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=32))
    pretokenize(cfg)
    with pytest.raises(PretokFormatError, match="a.ibin: stale"):
        PretokDatasetWithIndex(bin_dir, 32)
    build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=32))
    PretokDatasetWithIndex(bin_dir, 32)


def test_refuses_truncated_index_and_mixed_tokenizers(bin_dir, tmp_path, tiny_sp_tokenizer_dir):
    p = ibin_path(bin_dir / "a.bin")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 8)
    with pytest.raises(PretokFormatError, match="a.ibin: size"):
        PretokDatasetWithIndex(bin_dir, L)
    other = pretokenize_small_corpus(tmp_path / "sp", tiny_sp_tokenizer_dir, max_seq_len=L)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src, name in [(bin_dir / "b", "b"), (other / "sub" / "c", "c")]:
        for ext in (".bin", ".bin.json", ".ibin"):
            os.link(str(src) + ext, mixed / (name + ext))
    write_manifest(mixed, {b: read_sidecar(b)["bin_id"] for b in list_pretrain_bins(mixed)}, {})
    with pytest.raises(PretokFormatError, match="different tokenizers"):
        PretokDatasetWithIndex(mixed, L)


def test_index_builder_is_idempotent(bin_dir):
    before = {p: p.stat().st_mtime_ns for p in bin_dir.rglob("*.ibin")}
    counts = build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=L))
    assert {p: p.stat().st_mtime_ns for p in bin_dir.rglob("*.ibin")} == before
    for b, n in counts.items():
        h = IbinHeader.read(ibin_path(b))
        assert h.num_samples == n and h.max_seq_len == L


def test_pickle_carries_no_mapped_data_and_dataloader_works(bin_dir):
    ds = PretokDatasetWithIndex(bin_dir, L)
    _ = ds[0]  # opens its files in this process
    assert len(pickle.dumps(ds)) < 10_000
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][1], ds[3][1])
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == y.shape == (4, L)
    # worker processes open their own files and read the same samples
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    got = torch.cat([xb for xb, _ in loader])
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(len(ds))]))


def test_sft_pretokenized_files_in_the_same_folder_are_not_pretraining_bins(bin_dir, tiny_tokenizer_dir):
    """<name>.sft.bin from pretokenize_sft_data beside the pretraining .bin files changes nothing."""
    before = [(x.tolist(), y.tolist()) for x, y in PretokDatasetWithIndex(bin_dir, L)]
    bins = list_pretrain_bins(bin_dir)
    src = bin_dir / "chat.jsonl"
    src.write_text(
        json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) + "\n"
    )
    cfg = PretokenizeSFTConfig(data_dir=str(src), tokenizer_dir=str(tiny_tokenizer_dir), max_seq_len=L)
    pretokenize_sft(cfg)
    assert sft_paths(src)["bin"].is_file() and sft_paths(src)["bin"].name.endswith(SFT_BIN_SUFFIX)
    assert (
        list_pretrain_bins(bin_dir) == bins == [bin_dir / n for n in ("a.bin", "b.bin", "d.bin", "sub/c.bin")]
    )
    counts = build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=L))
    assert sorted(counts) == bins and not ibin_path(sft_paths(src)["bin"]).exists()
    assert [(x.tolist(), y.tolist()) for x, y in PretokDatasetWithIndex(bin_dir, L)] == before


# ------------------------------------------------------------------- a finished run, complete indexes
def test_folder_without_manifest_is_refused_by_the_index_builder_and_the_dataset(bin_dir):
    """What an interrupted run (or an older z2all) leaves: every .bin it got to, no manifest."""
    (bin_dir / MANIFEST_NAME).unlink()
    msg = (
        rf"{bin_dir}: no {MANIFEST_NAME} here or above, .* did not finish .* rerun python -m data_preprocess"
    )
    with pytest.raises(PretokFormatError, match=msg):
        build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=L))
    with pytest.raises(PretokFormatError, match=msg):
        PretokDatasetWithIndex(bin_dir, L)


def _copy_pair(bin_dir, src: str, dst: str) -> None:
    for ext in (".bin", ".bin.json", ".ibin"):
        shutil.copyfile(bin_dir / f"{src}{ext}", bin_dir / f"{dst}{ext}")


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: _copy_pair(d, "b", "leftover"),
            r"leftover.bin: not written by the finished pretokenize run",
        ),
        (lambda d: (d / "sub" / "c.bin").unlink(), r"lists sub/c.bin, which is missing"),
        (
            lambda d: _copy_pair(d, "b", "a"),  # a.bin replaced by another file's complete pair
            r"a.bin: rewritten after the pretokenize run of .* finished",
        ),
    ],
)
def test_the_manifest_must_vouch_for_every_bin(bin_dir, damage, message):
    damage(bin_dir)
    with pytest.raises(PretokFormatError, match=message):
        PretokDatasetWithIndex(bin_dir, L)


def test_a_subfolder_of_a_finished_run_is_finished_too(bin_dir):
    """The nearest manifest above a .bin vouches for it: training on one subfolder works."""
    sub = PretokDatasetWithIndex(bin_dir / "sub", L)
    assert len(sub) == num_windows(read_sidecar(bin_dir / "sub" / "c.bin")["num_tokens"], L) > 0


def test_truncated_index_is_rebuilt_not_called_up_to_date(bin_dir):
    """Training said "rebuild it" and the builder, reading only the header, said "up to date"."""
    p = ibin_path(bin_dir / "a.bin")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 8)
    with pytest.raises(PretokFormatError, match=r"a.ibin: size .*; rebuild it"):
        PretokDatasetWithIndex(bin_dir, L)
    n, written = build_index(bin_dir / "a.bin", L)
    assert written and os.path.getsize(p) == IBIN_HEADER.size + 8 * n
    assert build_index(bin_dir / "a.bin", L) == (n, False)  # now it is up to date
    PretokDatasetWithIndex(bin_dir, L)


def test_max_seq_len_longer_than_every_file_is_refused_naming_the_folder(bin_dir):
    before = {p: p.stat().st_mtime_ns for p in bin_dir.rglob("*.ibin")}
    with pytest.raises(ValueError, match=rf"--data_dir={bin_dir}: no sample for --max_seq_len=100000: .*"):
        build_all(IndexConfig(data_dir=str(bin_dir), max_seq_len=100_000))
    assert {p: p.stat().st_mtime_ns for p in bin_dir.rglob("*.ibin")} == before  # nothing written


# ----------------------------------------------------------------------------- token ids vs vocabulary
def test_corrupted_token_id_is_caught_on_load_naming_file_and_offset(bin_dir):
    """It used to train, then die steps later in torch.embedding with an IndexError."""
    pos = 3 * L + 5  # inside sample 3 of a.bin, the folder's first file
    with open(bin_dir / "a.bin", "r+b") as f:
        f.seek(pos * 2)
        f.write(b"\xff\xff")  # id 65535 > vocab; same size, so construction cannot see it
    vocab = read_sidecar(bin_dir / "a.bin")["vocab_size"]  # the fixture tokenizer's (corpus-dependent)
    ds = PretokDatasetWithIndex(bin_dir, L)
    ds[2]
    with pytest.raises(
        PretokFormatError,
        match=rf"a.bin: token id 65535 at token {pos} \(byte {2 * pos}\) is not below the tokenizer's "
        rf"vocab_size {vocab}: the file is corrupted",
    ):
        ds[3]


def test_start_up_check_of_the_recorded_max_token_id(bin_dir, z2all_log):
    ds = PretokDatasetWithIndex(bin_dir, L)
    largest = max(int(s.max()) for s in _streams(bin_dir))
    ds.check_token_ids(largest + 1)
    with pytest.raises(
        PretokFormatError, match=rf"holds token id {largest}, but the model has {largest} emb"
    ):
        ds.check_token_ids(largest)
    # sidecars of an older z2all have no max_token_id: the start-up check skips them (debug log)
    for b in list_pretrain_bins(bin_dir):
        meta = read_sidecar(b)
        del meta["max_token_id"]
        sidecar_path(b).write_text(json.dumps(meta))
    z2all_log.set_level(logging.DEBUG, logger="z2all")
    PretokDatasetWithIndex(bin_dir, L).check_token_ids(1)
    assert "4 .bin files record no max_token_id" in z2all_log.text


def test_training_start_up_refuses_ids_the_model_has_no_embedding_for(bin_dir, tiny_tokenizer_dir):
    """z2all.training.build checks the recorded max id against the model's vocab before step 1."""
    from z2all.training.build import build_components, build_tokenizer
    from z2all.training.config import ConfigError, parse_args

    meta = read_sidecar(bin_dir / "b.bin")
    meta["max_token_id"] = 10**6  # as if a tokenizer with a bigger vocab had written it
    sidecar_path(bin_dir / "b.bin").write_text(json.dumps(meta))
    cfg = parse_args(
        [
            f"--data_dir={bin_dir}",
            f"--tokenizer_dir={tiny_tokenizer_dir}",
            f"--out_dir={bin_dir.parent / 'run'}",
            "--model_config=tiny",
            f"--max_seq_len={L}",
            "--train_batch_size=2",
        ]
    )
    with pytest.raises(
        ConfigError, match=rf"--data_dir={bin_dir}: .*b.bin: holds token id 1000000, but the mo"
    ):
        build_components(cfg, torch.device("cpu"), *build_tokenizer(cfg))
