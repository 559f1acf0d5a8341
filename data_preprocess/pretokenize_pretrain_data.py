"""Pretokenize every corpus file of a folder into ``<name>.bin`` + ``<name>.bin.json`` sidecar.

    python -m data_preprocess.pretokenize_pretrain_data --data_dir=DIR --tokenizer_dir=TOKDIR \\
        [--save_dir=OUT] [--num_workers=K] [--text_field=text] [--force=true]

Up-to-date outputs are skipped; see ``docs/data.md`` for the formats and ``pretok_pretrain.py`` for how.
"""

from __future__ import annotations

import sys

from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize
from z2all.cli_args import parse_dataclass_args
from z2all.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_dataclass_args(PretokenizeConfig, argv, description=__doc__)
    pretokenize(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
