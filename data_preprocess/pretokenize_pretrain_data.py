"""Pretokenize every corpus file of a folder into ``<name>.bin`` + ``<name>.bin.json`` sidecar.

    python -m data_preprocess.pretokenize_pretrain_data --data_dir=DIR --tokenizer_dir=TOKDIR \\
        [--save_dir=OUT] [--num_workers=K] [--text_field=text] [--force=true] [--allow_bad_files=true]

Up-to-date outputs are skipped; a source file that cannot be read is skipped and reported, and the
run then exits 2 without marking OUT complete unless ``--allow_bad_files=true``. Prints the summary
on stdout; logs go to stderr. Formats: ``docs/data.md``; how: ``pretok_pretrain.py``.
"""

from __future__ import annotations

import sys

from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize, summarize
from z2all.cli_args import run_cli


def _run(cfg: PretokenizeConfig) -> None:
    print(summarize(pretokenize(cfg)))


def main(argv: list[str] | None = None) -> int:
    return run_cli(PretokenizeConfig, _run, argv, __doc__, prog="pretokenize_pretrain_data")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
