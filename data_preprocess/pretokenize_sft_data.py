"""Pretokenize SFT data: ChatML ids + label mask + offsets index + JSON sidecar per source file.

    python -m data_preprocess.pretokenize_sft_data --data_dir=DIR --tokenizer_dir=TOKDIR \\
        --max_seq_len=L [--save_dir=OUT] [--sft_type=conversation|instruction] [--force=true]

Then ``SFTDataset(DIR, tokenizer, L, sft_type, cache_dir=OUT)`` memory-maps the result (OUT defaults
to beside the sources). Face only: the work is :func:`data_preprocess.pretok_sft.pretokenize_sft`.
Prints one JSON summary per source on stdout; logs go to stderr.
Formats, files and the label picture: ``docs/sft_dpo_data.md``.
"""

from __future__ import annotations

import json
import sys

from data_preprocess.pretok_sft import PretokenizeSFTConfig, pretokenize_sft
from z2all.cli_args import run_cli


def _run(cfg: PretokenizeSFTConfig) -> None:
    for summary in pretokenize_sft(cfg):
        print(json.dumps(summary, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    return run_cli(PretokenizeSFTConfig, _run, argv, __doc__, prog="pretokenize_sft_data")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
