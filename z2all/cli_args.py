"""Turn a config dataclass into ``--field=value`` command-line flags, and run a ``python -m`` tool on them.

Generic: imports nothing from z2all but the logger setup, so any package's ``python -m`` entry point
may use it. :func:`parse_bool` is the project's one rule for boolean flags (these flags, the training
config's, ``python -m z2all.sample``'s).

Each field becomes one flag with the field's type and default; the docstring under a field is not
available at runtime, so the help text names the type and default. Unknown flags are an error, and
so is a value the dataclass's ``__post_init__`` refuses: both print ``prog: error: <message>`` and
exit with status 2, as argparse does.

:func:`run_cli` is the whole ``main`` of a data tool: parse the flags (plus ``--debug``), set up
logging (to stderr: stdout carries the tool's result), run, and turn a user error into that same
one-line ``prog: error: <message>`` with status 2. What counts as a user error is the library's
convention: bad input raises ``ValueError`` (``DataFileError``, ``PretokFormatError``,
``TokenizerFileError`` and every config check are ValueErrors) and a missing or unwritable file
``OSError``; their messages name the file or the flag. The traceback, which only helps to debug z2all
itself, is printed with ``--debug``. Any other exception is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from typing import TypeVar

from z2all.log import setup_logging

T = TypeVar("T")

# The status of a run stopped by its input (the same code as train_my_ddp.py's USER_ERROR,
# z2all/training/exit_codes.py, which this floor may not import); argparse uses it for bad flags too.
USER_ERROR = 2
USER_ERRORS = (ValueError, OSError)


class _NotABoolError(ValueError, argparse.ArgumentTypeError):
    """A ValueError for callers; as an ArgumentTypeError, argparse prints its message verbatim
    (``prog: error: argument --flag: expected true/false ...``) instead of "invalid value"."""


def parse_bool(value: str | bool) -> bool:
    """The one boolean flag rule: 1/true/yes/on and 0/false/no/off (any case), or a real bool.

    Anything else (another string, a number, None) raises ValueError naming the value. Usable as an
    argparse ``type=`` as it is: argparse reports that error as a bad flag.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
    raise _NotABoolError(f"expected true/false (or 1/0, yes/no, on/off), got {value!r}")


def _dataclass_parser(cls: type, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """One ``--field`` flag per init field of ``cls``; fields without a default are required flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        typ = hints[f.name]
        conv = parse_bool if typ is bool else typ
        if conv not in (int, float, str, parse_bool):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {typ}")
        has_default = f.default is not dataclasses.MISSING
        parser.add_argument(
            f"--{f.name}",
            type=conv,
            default=f.default if has_default else None,
            required=not has_default,
            help=f"{typ.__name__}" + (f" (default: {f.default!r})" if has_default else " (required)"),
        )
    return parser


def _build(cls: type[T], parser: argparse.ArgumentParser, flags: dict) -> T:
    try:
        return cls(**flags)
    except USER_ERRORS as e:  # __post_init__ refused a value: report it like any other bad flag
        parser.error(str(e))


def parse_dataclass_args(
    cls: type[T], argv: Sequence[str] | None = None, description: str = "", prog: str | None = None
) -> T:
    """Parse ``argv`` into ``cls(**flags)``; a bad flag or value exits: ``prog: error: ...``, status 2."""
    parser = _dataclass_parser(cls, description, prog)
    return _build(cls, parser, vars(parser.parse_args(argv)))


def run_cli(
    cls: type[T],
    run: Callable[[T], int | None],
    argv: Sequence[str] | None = None,
    description: str = "",
    prog: str | None = None,
) -> int:
    """Parse ``argv`` into ``cls`` (plus ``--debug``), call ``run(cfg)``; returns the exit status.

    ``run`` returns None or 0 for success, or its own non-zero status. A user error (see the module
    docstring) prints ``prog: error: <message>`` on stderr and returns 2; ``--debug`` also prints its
    traceback and logs at DEBUG. ``--help`` returns 0.
    """
    parser = _dataclass_parser(cls, description, prog)
    parser.add_argument(
        "--debug",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="bool: log at DEBUG and print the traceback of an error (default: False)",
    )
    try:
        flags = vars(parser.parse_args(argv))
        debug = flags.pop("debug")
        cfg = _build(cls, parser, flags)
    except SystemExit as e:  # --help, or a bad flag argparse has already reported
        return e.code if isinstance(e.code, int) else USER_ERROR
    setup_logging(debug=debug)
    try:
        return run(cfg) or 0
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return USER_ERROR
