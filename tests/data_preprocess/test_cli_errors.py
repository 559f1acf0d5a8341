"""The four data tools on user errors: ``prog: error: <message naming the file>`` on stderr, status 2,
no traceback unless ``--debug``. Run as users run them (``python -m``), in a fresh process each."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.data.conftest import pretokenize_small_corpus, write_corrupt_parquet
from z2all.data.pretrain_dataset import MANIFEST_NAME


def _garbage_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("garbage")
    return tok


def _case(name, tmp_path, tiny_tokenizer_dir):
    """(module, flags, the error line it must print) for each tool."""
    data = tmp_path / "data"
    data.mkdir()
    if name == "train_tokenizer":
        bad = write_corrupt_parquet(data / "corrupt.parquet")
        flags = [f"--data_dir={data}", f"--save_dir={tmp_path / 'out'}", "--vocab_size=400"]
        line = f"{bad}: corrupt or unreadable parquet data in row group 1 of 3 (at row 1000): Corrupt snappy"
        return "z2all.tokenizer.train_tokenizer", flags, line
    if name in ("pretokenize_pretrain_data", "pretokenize_sft_data"):
        (data / "a.jsonl").write_text('{"text": "x"}\n')
        tok = _garbage_tokenizer(tmp_path)
        flags = [f"--data_dir={data}", f"--tokenizer_dir={tok}"]
        flags += ["--max_seq_len=8"] if name == "pretokenize_sft_data" else ["--num_workers=1"]
        line = f"{tok / 'tokenizer.json'}: invalid JSON at line 1 column 1: Expecting value"
        return f"data_preprocess.{name}", flags, line
    # A folder as an older z2all (or an interrupted run) leaves it: every .bin, no manifest.
    out = pretokenize_small_corpus(tmp_path / "corpus", tiny_tokenizer_dir)
    (out / MANIFEST_NAME).unlink()
    line = f"{out}: no {MANIFEST_NAME} here or above, so the pretokenize run that wrote a.bin did not finish"
    return f"data_preprocess.{name}", [f"--data_dir={out}", "--max_seq_len=8"], line


@pytest.mark.parametrize(
    "name",
    [
        "train_tokenizer",
        "pretokenize_pretrain_data",
        "pretokenize_sft_data",
        "build_pretrain_sample_index_map",
    ],
)
def test_user_error_is_one_line_naming_the_file_and_status_2(name, tmp_path, tiny_tokenizer_dir):
    module, flags, line = _case(name, tmp_path, tiny_tokenizer_dir)
    cmd = [sys.executable, "-m", module, *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    last = res.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{name}: error: {line}"), res.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2
    assert "Traceback (most recent call last):" in debug.stderr
    assert debug.stderr.rstrip("\n").splitlines()[-1] == last
