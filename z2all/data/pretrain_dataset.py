"""Pretokenized pretraining data: the ``.bin`` / sidecar / ``.ibin`` formats and the dataset reading them.

Formats (byte tables in ``docs/data.md``):

* ``<name>.bin``: the token ids of every document, each followed by EOS, as raw little-endian
  ``uint16`` (vocab <= 65536) or ``uint32``. No header, so ``np.memmap`` maps it directly.
* ``<name>.bin.json``: the sidecar, written last. Its presence certifies the ``.bin`` is complete; it holds
  dtype, vocab size, tokenizer fingerprint, token/document counts, the source file's size and mtime, the
  bad-record summary and a random ``bin_id`` that changes on every rewrite.
* ``<name>.ibin``: the sample index for one ``max_seq_len`` L: a 64-byte header then ``uint64`` start
  offsets. Sample ``k`` is the window ``bin[start_k : start_k + L + 1]`` (overlap-by-one packing as in
  nanoGPT / llama2.c: consecutive windows share one token, ``x = w[:-1]``, ``y = w[1:]``), so reading a
  sample is one contiguous slice of the file: O(1) time and memory whatever the corpus size.

This module is the single owner of these formats: ``data_preprocess`` writes them through the helpers
here, the dataset reads and validates them.
"""

from __future__ import annotations

import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BIN_FORMAT = "z2all-pretok-v1"
SIDECAR_SUFFIX = ".json"  # full name: <name>.bin.json
IBIN_MAGIC = b"Z2ALLIDX"
IBIN_VERSION = 1
# magic, version, max_seq_len, num_samples, num_tokens of the .bin, bin_id (16 bytes), 16 reserved bytes
IBIN_HEADER = struct.Struct("<8sIIQQ16s16x")
assert IBIN_HEADER.size == 64
OFFSET_DTYPE = np.dtype("<u8")
_MAX_OPEN_FILES = 256  # per process; beyond this the dataset closes its files and reopens on demand


class PretokFormatError(ValueError):
    """A .bin/.ibin that is incomplete, stale, or made with another tokenizer or max_seq_len."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype holding every id: uint16 when the vocab fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# pretokenize_sft_data writes <source>.sft.bin (+ .sft.mask/.sft.idx/.sft.json, see z2all.data.sft_pretok);
# such files may share a folder with pretraining .bin files but are not pretraining data.
SFT_BIN_SUFFIX = ".sft.bin"


def list_pretrain_bins(data_dir: str | os.PathLike) -> list[Path]:
    """The pretraining ``.bin`` files under ``data_dir``: recursive, sorted; no hidden or ``.sft.bin`` files.

    The one rule both the index builder and :class:`PretokDatasetWithIndex` use, so they always agree on
    which files make up the corpus.
    """
    return sorted(
        p
        for p in Path(data_dir).rglob("*.bin")
        if not p.name.startswith(".") and not p.name.endswith(SFT_BIN_SUFFIX)
    )


def sidecar_path(bin_path: str | os.PathLike) -> Path:
    return Path(str(bin_path) + SIDECAR_SUFFIX)


def ibin_path(bin_path: str | os.PathLike) -> Path:
    return Path(bin_path).with_suffix(".ibin")


def read_sidecar(bin_path: str | os.PathLike, check_size: bool = True) -> dict:
    """The sidecar of ``bin_path``, validated; raises :class:`PretokFormatError` naming the file."""
    bin_path = Path(bin_path)
    side = sidecar_path(bin_path)
    if not side.is_file():
        raise PretokFormatError(
            f"{bin_path}: no sidecar {side.name}, so the file is incomplete or not ours; "
            "rerun python -m data_preprocess.pretokenize_pretrain_data"
        )
    try:
        meta = json.loads(side.read_text("utf-8"))
        fmt, dtype, num_tokens = meta["format"], np.dtype(meta["dtype"]), int(meta["num_tokens"])
        bytes.fromhex(meta["bin_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise PretokFormatError(f"{side}: not a valid pretokenize sidecar ({e})") from e
    if fmt != BIN_FORMAT:
        raise PretokFormatError(f"{side}: format {fmt!r}, expected {BIN_FORMAT!r}")
    if check_size:
        expected = num_tokens * dtype.itemsize
        actual = bin_path.stat().st_size if bin_path.is_file() else -1
        if actual != expected:
            raise PretokFormatError(
                f"{bin_path}: size {actual} bytes, but its sidecar says {num_tokens} tokens of {dtype} "
                f"= {expected} bytes (truncated or replaced); rerun pretokenize"
            )
    return meta


@dataclass(frozen=True)
class IbinHeader:
    max_seq_len: int
    num_samples: int
    num_tokens: int
    bin_id: bytes  # 16 bytes

    def pack(self) -> bytes:
        return IBIN_HEADER.pack(
            IBIN_MAGIC, IBIN_VERSION, self.max_seq_len, self.num_samples, self.num_tokens, self.bin_id
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> IbinHeader:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(IBIN_HEADER.size)
        except OSError as e:
            raise PretokFormatError(f"{path}: cannot read sample index ({e})") from e
        if len(raw) != IBIN_HEADER.size:
            raise PretokFormatError(f"{path}: shorter than the {IBIN_HEADER.size}-byte index header")
        magic, version, seq_len, n, ntok, bin_id = IBIN_HEADER.unpack(raw)
        if magic != IBIN_MAGIC or version != IBIN_VERSION:
            raise PretokFormatError(f"{path}: not a z2all sample index (magic {magic!r}, version {version})")
        return cls(seq_len, n, ntok, bin_id)


def num_windows(num_tokens: int, max_seq_len: int) -> int:
    """Windows of L+1 tokens starting every L tokens that fit in ``num_tokens`` tokens."""
    return max(0, (num_tokens - 1) // max_seq_len)


def window_starts(num_tokens: int, max_seq_len: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Start offsets of windows ``lo..hi-1`` (overlap-by-one packing: window k starts at k*L)."""
    hi = num_windows(num_tokens, max_seq_len) if hi is None else hi
    return np.arange(lo, hi, dtype=OFFSET_DTYPE) * OFFSET_DTYPE.type(max_seq_len)


@dataclass
class _Shard:
    bin_path: Path
    ibin_path: Path
    dtype: np.dtype
    num_tokens: int
    num_samples: int


class PretokDatasetWithIndex(torch.utils.data.Dataset):
    """All ``.bin`` files of a folder (recursive, sorted) as one indexable list of samples.

    ``ds[i] -> (x, y)``: int64 tensors of shape ``(max_seq_len,)`` with ``y[t] == x[t+1]`` for t < L-1.
    Validation is every ``stride``-th sample (``stride = N // n_valid``) at a seed-chosen slot inside
    each stride, so it spreads over all files and the split is O(1) arithmetic, not a stored list.
    Reading a sample is two positioned reads (``os.pread``): 8 bytes of ``.ibin`` for the start, then
    the ``(L+1)``-token window of ``.bin``. Nothing is mapped, so the process's RSS does not grow with
    the corpus: with a long-lived ``np.memmap``, every random read maps ~64 KiB of neighbouring pages
    (the kernel's fault-around) and RSS climbs towards the corpus size
    (``benchmarks/bench_index_rss.py``). Files are opened lazily per process, never pickled.

    Args:
        data_dir: folder with ``.bin`` + ``.bin.json`` + ``.ibin`` files.
        max_seq_len: L; every ``.ibin`` must have been built for this L.
        tokenizer: a ``Z2allTokenizer``, a tokenizer folder, or None (then all files must merely agree).
        split: ``"train"`` or ``"valid"``.
        valid_ratio: share of samples held out for validation (ignored when ``valid_samples`` is set).
        valid_samples: exact number of validation samples.
        seed: picks the validation slot inside each stride.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        max_seq_len: int,
        tokenizer=None,
        split: str = "train",
        valid_ratio: float = 0.0,
        valid_samples: int | None = None,
        seed: int = 0,
    ):
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.data_dir = Path(data_dir)
        self.max_seq_len = max_seq_len
        self.split = split
        expected_fp = _fingerprint_of(tokenizer)
        bins = list_pretrain_bins(self.data_dir)
        if not bins:
            raise FileNotFoundError(
                f"{self.data_dir}: no .bin files (run data_preprocess.pretokenize_pretrain_data)"
            )
        self._shards: list[_Shard] = []
        fingerprints: dict[str, Path] = {}
        for b in bins:
            meta = read_sidecar(b)
            fp = meta["tokenizer_fingerprint"]
            if expected_fp is not None and fp != expected_fp:
                raise PretokFormatError(
                    f"{b}: pretokenized with tokenizer {fp[:12]}, but the given tokenizer is "
                    f"{expected_fp[:12]}; rerun pretokenize with this tokenizer"
                )
            fingerprints.setdefault(fp, b)
            if len(fingerprints) > 1:
                other = next(p for f, p in fingerprints.items() if f != fp)
                raise PretokFormatError(f"{b} and {other} were pretokenized with different tokenizers")
            self._shards.append(self._check_index(b, meta))
        self.tokenizer_fingerprint = next(iter(fingerprints))
        counts = np.array([s.num_samples for s in self._shards], dtype=np.int64)
        self._cum = np.concatenate([[0], np.cumsum(counts)])  # (F+1,) first global sample of each file
        self.total_samples = int(self._cum[-1])
        n = self.total_samples
        n_valid = valid_samples if valid_samples is not None else int(round(n * valid_ratio))
        if not 0 <= n_valid < max(n, 1) or (n_valid and n // n_valid < 2):
            raise ValueError(f"{self.data_dir}: cannot hold out {n_valid} of {n} samples for validation")
        self.num_valid = n_valid
        self._stride = n // n_valid if n_valid else 0
        self._slot = random.Random(seed).randrange(self._stride) if n_valid else 0
        self._fds: dict[Path, int] = {}

    def _check_index(self, b: Path, meta: dict) -> _Shard:
        num_tokens = int(meta["num_tokens"])
        ip = ibin_path(b)
        if not ip.is_file():
            raise PretokFormatError(
                f"{b}: no sample index {ip.name}; run python -m "
                f"data_preprocess.build_pretrain_sample_index_map --data_dir={self.data_dir} "
                f"--max_seq_len={self.max_seq_len}"
            )
        h = IbinHeader.read(ip)
        if h.max_seq_len != self.max_seq_len:
            raise PretokFormatError(
                f"{ip}: built for max_seq_len={h.max_seq_len}, not {self.max_seq_len}; rebuild it with "
                f"build_pretrain_sample_index_map --max_seq_len={self.max_seq_len}"
            )
        if h.bin_id != bytes.fromhex(meta["bin_id"]) or h.num_tokens != num_tokens:
            raise PretokFormatError(f"{ip}: stale, built for an older version of {b.name}; rebuild the index")
        expected = IBIN_HEADER.size + h.num_samples * OFFSET_DTYPE.itemsize
        if ip.stat().st_size != expected or h.num_samples != num_windows(num_tokens, self.max_seq_len):
            raise PretokFormatError(f"{ip}: size {ip.stat().st_size} bytes, expected {expected}; rebuild it")
        return _Shard(b, ip, np.dtype(meta["dtype"]), num_tokens, h.num_samples)

    def __len__(self) -> int:
        return self.num_valid if self.split == "valid" else self.total_samples - self.num_valid

    def global_index(self, i: int) -> int:
        """Position of split sample ``i`` among all samples of the folder."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.split} split of {len(self)}")
        s, r = self._stride, self._slot
        if self.split == "valid":
            return i * s + r
        if not self.num_valid:
            return i
        per_block = s - 1  # train samples in each stride block
        if i < self.num_valid * per_block:
            b, w = divmod(i, per_block)
            return b * s + w + (1 if w >= r else 0)
        return self.num_valid * s + (i - self.num_valid * per_block)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_FILES:
                self._close_files()
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _pread(self, path: Path, nbytes: int, offset: int) -> bytes:
        data = os.pread(self._fd(path), nbytes, offset)
        if len(data) != nbytes:
            raise PretokFormatError(f"{path}: short read of {nbytes} bytes at {offset} (file changed?)")
        return data

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.global_index(int(i))
        f = int(np.searchsorted(self._cum, g, side="right")) - 1
        sh = self._shards[f]
        local = g - int(self._cum[f])
        raw = self._pread(
            sh.ibin_path, OFFSET_DTYPE.itemsize, IBIN_HEADER.size + local * OFFSET_DTYPE.itemsize
        )
        start = int(np.frombuffer(raw, dtype=OFFSET_DTYPE)[0])
        n = self.max_seq_len + 1
        raw = self._pread(sh.bin_path, n * sh.dtype.itemsize, start * sh.dtype.itemsize)
        window = torch.from_numpy(np.frombuffer(raw, dtype=sh.dtype).astype(np.int64))  # (L+1,)
        return window[:-1], window[1:]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}  # file descriptors are per process: workers open their own
        return state

    def __del__(self):
        if getattr(self, "_fds", None):
            self._close_files()


def _fingerprint_of(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        from z2all.tokenizer import Z2allTokenizer

        tokenizer = Z2allTokenizer.from_pretrained(tokenizer)
    return tokenizer.fingerprint()
