"""Turn a config dataclass into ``--field=value`` command-line flags (used by the command-line faces).

Generic: imports nothing from z2all, so any package's ``python -m`` entry point may use it.

Each field becomes one flag with the field's type and default; the docstring under a field is not
available at runtime, so the help text names the type and default. Unknown flags are an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_dataclass_args(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Parse ``argv`` into ``cls(**flags)``; fields without a default are required flags."""
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        typ = hints[f.name]
        conv = _parse_bool if typ is bool else typ
        if conv not in (int, float, str, _parse_bool):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {typ}")
        has_default = f.default is not dataclasses.MISSING
        parser.add_argument(
            f"--{f.name}",
            type=conv,
            default=f.default if has_default else None,
            required=not has_default,
            help=f"{typ.__name__}" + (f" (default: {f.default!r})" if has_default else " (required)"),
        )
    ns = parser.parse_args(argv)
    return cls(**vars(ns))
