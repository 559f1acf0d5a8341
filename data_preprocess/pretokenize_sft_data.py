"""Pretokenize SFT data: ChatML ids + label mask + offsets index + JSON sidecar per source file.

    python -m data_preprocess.pretokenize_sft_data --data_dir=DIR --tokenizer_dir=TOKDIR \\
        --max_seq_len=L [--save_dir=OUT] [--sft_type=conversation|instruction] [--force=true]

Then ``SFTDataset(DIR, tokenizer, L, sft_type, cache_dir=OUT)`` memory-maps the result (OUT defaults
to beside the sources). Face only: the work is :func:`z2all.data.sft_pretokenize.pretokenize_sft`.
Prints one JSON summary per source on stdout; logs go to stderr.
Formats, files and the label picture: ``docs/sft_dpo_data.md``.
"""

from __future__ import annotations

import json
import sys

from z2all.cli_args import run_cli
from z2all.data.sft_pretokenize import PretokenizeSFTConfig, pretokenize_sft


def _run(cfg: PretokenizeSFTConfig) -> None:
    for summary in pretokenize_sft(cfg):
        print(json.dumps(summary, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    return run_cli(PretokenizeSFTConfig, _run, argv, __doc__, prog="pretokenize_sft_data")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
