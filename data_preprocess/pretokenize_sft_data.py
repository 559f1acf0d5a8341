"""Pretokenize SFT data: ChatML ids + label mask + offsets index + JSON sidecar per source file.

    python -m data_preprocess.pretokenize_sft_data --data_dir=DIR --tokenizer_dir=TOKDIR \\
        --max_seq_len=L [--save_dir=OUT] [--sft_type=conversation|instruction] [--force=true]

Then ``SFTDataset(DIR, tokenizer, L, sft_type, cache_dir=OUT)`` memory-maps the result (OUT defaults
to beside the sources). Face only: the work is :func:`z2all.data.sft_pretokenize.pretokenize_sft`.
Formats, files and the label picture: ``docs/sft_dpo_data.md``.
"""

from __future__ import annotations

import json
import logging
import sys

from z2all.cli_args import parse_dataclass_args
from z2all.data.sft_pretokenize import PretokenizeSFTConfig, pretokenize_sft
from z2all.log import setup_logging

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> list[dict]:
    setup_logging()
    cfg = parse_dataclass_args(PretokenizeSFTConfig, argv, description=__doc__)
    summaries = pretokenize_sft(cfg)
    for s in summaries:
        logger.info("%s", json.dumps(s, ensure_ascii=False))
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
