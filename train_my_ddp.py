"""The training entry point: pretrain, SFT or DPO, on one process or under torchrun.

    python train_my_ddp.py [CONFIG.json] --task_type=pretrain --data_dir=... --tokenizer_dir=...
    torchrun --standalone --nproc_per_node=4 train_my_ddp.py ...
    python train_my_ddp.py --help

Thin on purpose: parse the configuration, set up logging, join the process group, build the trainer
(:func:`z2all.training.build.build_trainer`), run it. Everything else lives in ``z2all/training``
(docs/training.md, docs/architecture.md).

A user error (:data:`USER_ERRORS`: a bad flag, data file or checkpoint...) and a non-finite stop
print one line ``train_my_ddp.py: error: ...`` on stderr (``rank R: `` first when there are several
ranks; ``--debug`` adds the traceback) and exit with the code of ``z2all/training/exit_codes.py``.
Any other exception is a bug: Python prints its traceback and exits 1.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback

from z2all.cli_args import parse_bool
from z2all.data.chat import ChatFormatError
from z2all.data.pretrain_dataset import PretokFormatError
from z2all.data.readers import DataFileError
from z2all.log import env_rank, setup_logging
from z2all.tokenizer import TokenizerFileError
from z2all.training import ConfigError, exit_codes, parse_args
from z2all.training.build import build_trainer
from z2all.training.checkpoint import (
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NonFiniteStateError,
    UnsafeCheckpointError,
)
from z2all.training.config_help import help_text
from z2all.training.heartbeat import write_exit_code
from z2all.training.loop import NonFiniteStepError
from z2all.training.runtime import distributed_runtime
from z2all.training.stop_signal import PreemptedStop

# What the person running the script must fix; each message names the flag, file or folder, and a
# traceback would only bury that line. (Plain ValueErrors are not here: torch raises them for bugs.)
USER_ERRORS = (
    ConfigError,
    DataFileError,  # z2all/data/readers.py
    PretokFormatError,  # z2all/data/pretrain_dataset.py: a bad .bin / .ibin / sidecar
    ChatFormatError,  # z2all/data/chat.py, with its DPORecordError and SFTRecordError
    TokenizerFileError,  # z2all/tokenizer (build.py already turns it into ConfigError while building)
    CorruptCheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    CheckpointWriteError,  # no space left on device during a save
    FileNotFoundError,
    PermissionError,
)
# The run diverged: restarting it unchanged would diverge again.
NONFINITE_ERRORS = (NonFiniteStepError, NonFiniteStateError)


def _is_user_error(e: BaseException) -> bool:
    # a full disk outside a checkpoint save (config.json, metrics.jsonl) is the user's to fix too
    return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))


def _true(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        return False  # parse_args reports the bad value


def _report(e: BaseException, debug: bool) -> None:
    """``train_my_ddp.py: error: [rank R: ]message`` on stderr; with --debug the traceback first."""
    if debug:
        traceback.print_exception(e)
    message, rank = str(e), env_rank()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not message.startswith(f"rank {rank}:"):
        message = f"rank {rank}: {message}"
    print(f"train_my_ddp.py: error: {message}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return exit_codes.OK
    # --debug before parsing, for the traceback of a parse error
    debug = any(a == "--debug" or (a.startswith("--debug=") and _true(a[len("--debug=") :])) for a in argv)
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        _report(e, debug)
        return exit_codes.USER_ERROR
    setup_logging(debug=cfg.debug)
    try:
        with distributed_runtime(cfg) as rt:
            build_trainer(cfg, rt).run()
    except PreemptedStop as e:
        logging.getLogger("train_my_ddp").warning("%s", e)
        return _deliberate(cfg, exit_codes.PREEMPTED, "exit_after_minutes" if e.timed else "signal")
    except NONFINITE_ERRORS as e:
        _report(e, cfg.debug)
        return _deliberate(cfg, exit_codes.NONFINITE)
    except Exception as e:
        if not _is_user_error(e):
            raise  # a bug: Python prints the traceback and exits with exit_codes.CRASH (1)
        _report(e, cfg.debug)
        return _deliberate(cfg, exit_codes.USER_ERROR)
    return exit_codes.OK


def _deliberate(cfg, code: int, reason: str = "") -> int:
    """Record why we exit (``<out_dir>/exit_code.json``, rank 0): under torchrun a supervisor sees only
    the agent's 1."""
    write_exit_code(cfg.out_dir, code, env_rank(), reason)
    return code


def _exit(code: int) -> None:
    """Leave without the interpreter's teardown when torchrun started us: every file is closed and the
    process group destroyed by now, yet gloo's C++ threads can still abort the process while static
    objects are destroyed ("terminate called without an active exception", SIGABRT: about one run in
    five of the 2-rank CPU tests, with torch 2.13), turning a finished run into a failed one. Flush, then
    ``os._exit``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
