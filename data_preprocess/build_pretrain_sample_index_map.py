"""Write ``<name>.ibin`` (sample index for one max_seq_len) next to every ``<name>.bin`` of a folder.

    python -m data_preprocess.build_pretrain_sample_index_map --data_dir=DIR --max_seq_len=L [--force=true]

Sample k of a file is the window ``bin[k*L : k*L + L + 1]`` (overlap-by-one packing); the index stores
those start offsets as uint64 after a 64-byte header (layout in ``docs/data.md``). An index whose header
matches the ``.bin`` (its ``bin_id`` and token count) and L is up to date and skipped. Offsets are
written in blocks, so memory stays flat however large the corpus.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from z2all.atomic import atomic_open
from z2all.cli_args import parse_dataclass_args
from z2all.data.pretrain_dataset import (
    IbinHeader,
    PretokFormatError,
    ibin_path,
    list_pretrain_bins,
    num_windows,
    read_sidecar,
    window_starts,
)
from z2all.log import setup_logging

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
            if IbinHeader.read(out) == header:
                return header.num_samples, False
        except PretokFormatError:
            pass
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
    logger.info("%d samples in %d files for max_seq_len=%d", sum(counts.values()), len(bins), cfg.max_seq_len)
    return counts


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    build_all(parse_dataclass_args(IndexConfig, argv, description=__doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
