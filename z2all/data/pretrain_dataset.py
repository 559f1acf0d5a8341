"""Pretokenized pretraining data: the ``.bin`` / sidecar / ``.ibin`` formats and the dataset reading them.

Formats (byte tables in ``docs/data.md``):

* ``<name>.bin``: the token ids of every document, each followed by EOS, as raw little-endian
  ``uint16`` (vocab <= 65536) or ``uint32``. No header, so ``np.memmap`` maps it directly.
* ``<name>.bin.json``: the sidecar, written last. Its presence certifies the ``.bin`` is complete; it holds
  dtype, vocab size, tokenizer fingerprint, token/document counts, the largest token id, the source
  file's size and mtime, the bad-record summary and a random ``bin_id`` that changes on every rewrite.
* ``pretokenize_manifest.json`` (:data:`MANIFEST_NAME`) at the top of a pretokenize run's output folder:
  written atomically LAST, and deleted first by the next run, so its presence certifies that the run
  finished. It lists every ``.bin`` of the run with its ``bin_id`` and the source files skipped as
  unreadable (``--allow_bad_files``). The index builder and the dataset refuse a ``.bin`` that no
  finished run lists: one bad file can no longer leave a half-written folder that trains silently.
* ``<name>.ibin``: the sample index for one ``max_seq_len`` L: a 64-byte header then ``uint64`` start
  offsets. Sample ``k`` is the window ``bin[start_k : start_k + L + 1]`` (overlap-by-one packing as in
  nanoGPT / llama2.c: consecutive windows share one token, ``x = w[:-1]``, ``y = w[1:]``), so reading a
  sample is one contiguous slice of the file: O(1) time and memory whatever the corpus size.

This module is the single owner of these formats: ``data_preprocess`` writes them through the helpers
here, the dataset reads and validates them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from z2all.atomic import atomic_write_json, fsync_dir
from z2all.tokenizer import Z2allTokenizer

logger = logging.getLogger(__name__)

BIN_FORMAT = "z2all-pretok-v1"
MANIFEST_NAME = "pretokenize_manifest.json"  # z2all.data.readers never reads it as corpus
MANIFEST_FORMAT = "z2all-pretok-manifest-v1"
_RERUN_PRETOKENIZE = (
    "rerun python -m data_preprocess.pretokenize_pretrain_data with the same --data_dir and --save_dir "
    "(finished files are skipped)"
)
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


# pretokenize_sft_data writes <source>.sft.bin (+ .sft.mask/.sft.idx/.sft.json, see z2all.data.sft_shards);
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


def max_token_id(meta: dict) -> int | None:
    """The largest id of the sidecar's ``.bin`` (-1 when it holds no token); None in sidecars written
    before the field existed."""
    value = meta.get("max_token_id")
    return None if value is None else int(value)


# --------------------------------------------------------------------------------------------- manifest
def write_manifest(folder: str | os.PathLike, bin_ids: dict[Path, str], bad_files: dict[str, str]) -> Path:
    """Mark the pretokenize run that wrote ``folder`` finished; the caller writes it after every ``.bin``.

    ``bin_ids``: each ``.bin`` of the run (under ``folder``) -> its sidecar's ``bin_id``;
    ``bad_files``: source file -> why it was skipped.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    atomic_write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "bins": {p.relative_to(folder).as_posix(): bid for p, bid in sorted(bin_ids.items())},
            "bad_files": dict(sorted(bad_files.items())),
        },
    )
    return path


def remove_manifest(folder: str | os.PathLike) -> None:
    """Unmark ``folder`` before a run changes anything in it (durably: a crash cannot bring it back)."""
    path = Path(folder) / MANIFEST_NAME
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def read_pretokenize_manifest(path: Path) -> dict:
    """The pretokenize manifest at ``path``, validated; raises :class:`PretokFormatError` naming it."""
    try:
        m = json.loads(path.read_text("utf-8"))
        ok = m["format"] == MANIFEST_FORMAT and isinstance(m["bins"], dict)
        ok = ok and isinstance(m["bad_files"], dict)
    except (ValueError, KeyError, TypeError) as e:
        raise PretokFormatError(f"{path}: not a pretokenize manifest ({e}); {_RERUN_PRETOKENIZE}") from e
    if not ok:
        raise PretokFormatError(f"{path}: not a {MANIFEST_FORMAT} manifest; {_RERUN_PRETOKENIZE}")
    return m


def check_pretokenize_finished(data_dir: str | os.PathLike, metas: dict[Path, dict]) -> None:
    """Refuse ``.bin`` files that no finished pretokenize run vouches for.

    ``metas``: every ``.bin`` under ``data_dir`` -> its sidecar. A ``.bin`` belongs to the run whose
    :data:`MANIFEST_NAME` is nearest (its folder or the closest one above); that manifest must list it
    with its ``bin_id``, and every ``.bin`` a manifest lists inside ``data_dir`` must still exist.
    Source files a run skipped with ``--allow_bad_files`` are logged as a warning.
    """
    root = Path(data_dir).resolve()
    nearest: dict[Path, Path | None] = {}  # folder -> its manifest
    manifests: dict[Path, dict] = {}

    def manifest_of(folder: Path) -> Path | None:
        if folder not in nearest:
            here = folder / MANIFEST_NAME
            if here.is_file():
                nearest[folder] = here
            elif folder.parent == folder:  # the filesystem root
                nearest[folder] = None
            else:
                nearest[folder] = manifest_of(folder.parent)
        return nearest[folder]

    for b, meta in metas.items():
        m = manifest_of(b.resolve().parent)  # a symlinked .bin belongs to the run that wrote its target
        if m is None:
            raise PretokFormatError(
                f"{b.parent}: no {MANIFEST_NAME} here or above, so the pretokenize run that wrote {b.name} "
                f"did not finish (or an older z2all wrote it); {_RERUN_PRETOKENIZE}"
            )
        if m not in manifests:
            manifests[m] = read_pretokenize_manifest(m)
        listed = manifests[m]["bins"].get(b.resolve().relative_to(m.parent).as_posix())
        if listed is None:
            raise PretokFormatError(
                f"{b}: not written by the finished pretokenize run of {m} (a leftover of another run, or "
                f"its source was removed); delete it, or {_RERUN_PRETOKENIZE}"
            )
        if listed != meta["bin_id"]:
            raise PretokFormatError(
                f"{b}: rewritten after the pretokenize run of {m} finished (other bin_id); "
                f"{_RERUN_PRETOKENIZE}"
            )
    for m, manifest in manifests.items():
        for rel in manifest["bins"]:
            p = m.parent / rel
            if p.is_relative_to(root) and not p.is_file():
                raise PretokFormatError(f"{m} lists {rel}, which is missing; {_RERUN_PRETOKENIZE}")
        if manifest["bad_files"]:
            logger.warning(
                "%s: pretokenize skipped %d unreadable source files (--allow_bad_files): %s",
                m,
                len(manifest["bad_files"]),
                ", ".join(manifest["bad_files"]),
            )


# ------------------------------------------------------------------------------------------ sample index
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


def check_ibin(ip: Path, meta: dict, max_seq_len: int) -> IbinHeader:
    """The header of ``ip`` if it is the complete index of the sidecar's ``.bin`` for ``max_seq_len``.

    Complete means: header for this L, this ``bin_id`` and token count, ``num_windows`` samples, and a
    file of exactly ``64 + 8 * num_samples`` bytes (a truncated index fails here, not on a later read).
    Raises :class:`PretokFormatError` saying which of these fails.
    """
    num_tokens = int(meta["num_tokens"])
    h = IbinHeader.read(ip)
    if h.max_seq_len != max_seq_len:
        raise PretokFormatError(f"{ip}: built for max_seq_len={h.max_seq_len}, not {max_seq_len}")
    if h.bin_id != bytes.fromhex(meta["bin_id"]) or h.num_tokens != num_tokens:
        raise PretokFormatError(f"{ip}: stale, built for an older version of {ip.with_suffix('.bin').name}")
    expected_n = num_windows(num_tokens, max_seq_len)
    if h.num_samples != expected_n:
        raise PretokFormatError(f"{ip}: header says {h.num_samples} samples, the .bin holds {expected_n}")
    size, expected = ip.stat().st_size, IBIN_HEADER.size + h.num_samples * OFFSET_DTYPE.itemsize
    if size != expected:
        raise PretokFormatError(
            f"{ip}: size {size} bytes, expected {expected} for {h.num_samples} samples (truncated?)"
        )
    return h


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
    vocab_size: int  # of the tokenizer that wrote it: every id must be below
    max_token_id: int | None  # recorded by pretokenize; None in older sidecars


class PretokDatasetWithIndex(torch.utils.data.Dataset):
    """All ``.bin`` files of a folder (recursive, sorted) as one indexable list of samples.

    ``ds[i] -> (x, y)``: int64 tensors of shape ``(max_seq_len,)`` with ``y[t] == x[t+1]`` for t < L-1,
    the ``(L+1)``-token window split once. That split is the only shift: the model is given
    ``input_ids=x, targets=y`` (position t scored on ``y[t]``), so nothing glues the two back together
    or shifts them again.
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
        metas = {b: read_sidecar(b) for b in bins}
        check_pretokenize_finished(self.data_dir, metas)
        self._shards: list[_Shard] = []
        fingerprints: dict[str, Path] = {}
        for b, meta in metas.items():
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
        ip = ibin_path(b)
        rebuild = (
            f"python -m data_preprocess.build_pretrain_sample_index_map --data_dir={self.data_dir} "
            f"--max_seq_len={self.max_seq_len}"
        )
        if not ip.is_file():
            raise PretokFormatError(f"{b}: no sample index {ip.name}; run {rebuild}")
        try:
            h = check_ibin(ip, meta, self.max_seq_len)
        except PretokFormatError as e:
            raise PretokFormatError(f"{e}; rebuild it: {rebuild}") from None
        return _Shard(
            b,
            ip,
            np.dtype(meta["dtype"]),
            int(meta["num_tokens"]),
            h.num_samples,
            int(meta["vocab_size"]),
            max_token_id(meta),
        )

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse, before training starts, a corpus whose recorded largest id has no row in an embedding
        of ``vocab_size`` rows (the model's); torch.embedding would fail on it only when it is drawn."""
        unknown = [s.bin_path.name for s in self._shards if s.max_token_id is None]
        if unknown:
            logger.debug(
                "%d .bin files record no max_token_id (pretokenized by an older z2all): ids checked per "
                "sample only: %s",
                len(unknown),
                ", ".join(unknown[:5]),
            )
        for s in self._shards:
            if s.max_token_id is not None and s.max_token_id >= vocab_size:
                raise PretokFormatError(
                    f"{s.bin_path}: holds token id {s.max_token_id}, but the model has {vocab_size} "
                    "embedding rows; pretokenize with the model's tokenizer"
                )

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
        tokens = np.frombuffer(raw, dtype=sh.dtype)  # (L+1,)
        # One vectorised max per sample: a corrupted id stops here, naming the file and offset, instead
        # of an IndexError from torch.embedding steps later.
        if int(tokens.max()) >= sh.vocab_size:
            k = int(np.argmax(tokens >= sh.vocab_size))
            raise PretokFormatError(
                f"{sh.bin_path}: token id {int(tokens[k])} at token {start + k} (byte "
                f"{(start + k) * sh.dtype.itemsize}) is not below the tokenizer's vocab_size "
                f"{sh.vocab_size}: the file is corrupted; delete it and rerun pretokenize"
            )
        window = torch.from_numpy(tokens.astype(np.int64))  # (L+1,)
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
        tokenizer = Z2allTokenizer.from_pretrained(tokenizer)
    return tokenizer.fingerprint()
