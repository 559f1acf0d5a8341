"""Write ``<name>.ibin`` (sample index for one max_seq_len) next to every ``<name>.bin`` of a folder.

    python -m data_preprocess.build_pretrain_sample_index_map --data_dir=DIR --max_seq_len=L [--force=true]

Sample k of a file is the window ``bin[k*L : k*L + L + 1]`` (overlap-by-one packing); the index stores
those start offsets as uint64 after a 64-byte header (layout in ``docs/data.md``). An index that
``check_ibin`` accepts (header for this L and this ``.bin``, and the size that header implies) is up to
date and skipped; any other is rebuilt, saying why. Offsets are written in blocks, so memory stays flat
however large the corpus.

Refused, naming the folder: a folder whose pretokenize run did not finish (no manifest, see
``z2all.data.pretrain_dataset``), and an L that leaves the whole folder without a single sample.
Prints the sample count on stdout; logs go to stderr.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from z2all.atomic import atomic_open
from z2all.cli_args import run_cli
from z2all.data.pretrain_dataset import (
    IbinHeader,
    PretokFormatError,
    check_ibin,
    check_pretokenize_finished,
    ibin_path,
    list_pretrain_bins,
    num_windows,
    read_sidecar,
    window_starts,
)

logger = logging.getLogger(__name__)
_BLOCK = 1 << 20  # samples per write: 8 MiB of offsets


@dataclass
class IndexConfig:
    """Every flag of ``python -m data_preprocess.build_pretrain_sample_index_map``."""

    data_dir: str = ""
    """Folder with the .bin files written by pretokenize_pretrain_data (recursive)."""
    max_seq_len: int = 0
    """L: each sample is a window of L+1 tokens (x = w[:-1], y = w[1:])."""
    force: bool = False
    """Rebuild even up-to-date indexes."""

    def __post_init__(self):
        if not self.data_dir:
            raise ValueError("--data_dir is required")
        if self.max_seq_len < 1:
            raise ValueError(f"--max_seq_len must be >= 1, got {self.max_seq_len}")


def build_index(bin_path: Path, max_seq_len: int, force: bool = False) -> tuple[int, bool]:
    """Write the .ibin of one .bin; returns ``(num_samples, written)``."""
    meta = read_sidecar(bin_path)  # refuses incomplete / truncated .bin files
    num_tokens = int(meta["num_tokens"])
    header = IbinHeader(
        max_seq_len=max_seq_len,
        num_samples=num_windows(num_tokens, max_seq_len),
        num_tokens=num_tokens,
        bin_id=bytes.fromhex(meta["bin_id"]),
    )
    out = ibin_path(bin_path)
    if not force and out.is_file():
        try:
            check_ibin(out, meta, max_seq_len)
            return header.num_samples, False
        except PretokFormatError as e:
            logger.info("rebuilding %s", e)
    with atomic_open(out, "wb") as f:
        f.write(header.pack())
        for lo in range(0, header.num_samples, _BLOCK):
            hi = min(lo + _BLOCK, header.num_samples)
            f.write(window_starts(num_tokens, max_seq_len, lo, hi).tobytes())
    return header.num_samples, True


def build_all(cfg: IndexConfig) -> dict[Path, int]:
    """Index every .bin under ``cfg.data_dir``; returns samples per .bin."""
    data_dir = Path(cfg.data_dir)
    bins = list_pretrain_bins(data_dir)
    if not bins:
        raise FileNotFoundError(f"--data_dir={data_dir}: no .bin files (run pretokenize_pretrain_data first)")
    metas = {b: read_sidecar(b) for b in bins}
    check_pretokenize_finished(data_dir, metas)
    tokens = {b: int(m["num_tokens"]) for b, m in metas.items()}
    if not any(num_windows(n, cfg.max_seq_len) for n in tokens.values()):
        longest = max(tokens, key=tokens.get)
        raise ValueError(
            f"--data_dir={data_dir}: no sample for --max_seq_len={cfg.max_seq_len}: a sample needs "
            f"{cfg.max_seq_len + 1} tokens of one file, the longest ({longest}) holds {tokens[longest]}; "
            "lower --max_seq_len or add data"
        )
    counts = {}
    for b in bins:
        n, written = build_index(b, cfg.max_seq_len, cfg.force)
        counts[b] = n
        logger.info(
            "%s %s: %d samples of %d tokens",
            "wrote" if written else "up to date",
            ibin_path(b),
            n,
            cfg.max_seq_len + 1,
        )
    return counts


def _run(cfg: IndexConfig) -> None:
    counts = build_all(cfg)
    print(f"{sum(counts.values())} samples in {len(counts)} files for max_seq_len={cfg.max_seq_len}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(IndexConfig, _run, argv, __doc__, prog="build_pretrain_sample_index_map")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
