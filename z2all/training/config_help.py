"""``--help`` and the flag list, generated from TrainConfig's source: the docstring under each field
(read with ``ast``), so the help text and the code cannot drift apart."""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from typing import Literal

from z2all.training.config import TrainConfig, flag_fields


def field_docs() -> dict[str, str]:
    """The docstring under each field, read from TrainConfig's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = nxt.value.value.strip()
    return docs


def help_text() -> str:
    """``--help``: every flag with its type/choices, default and docstring."""
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    lines = [
        "usage: train_my_ddp.py [CONFIG.json] [--key=value ...]",
        "       torchrun --nproc_per_node=N train_my_ddp.py [CONFIG.json] [--key=value ...]",
        "",
        "Settings (later sources win: defaults < saved config.json on --resume < CONFIG.json < flags):",
    ]
    for name, f in flag_fields().items():
        hint = hints[name]
        kind = "|".join(typing.get_args(hint)) if typing.get_origin(hint) is Literal else hint.__name__
        lines.append(f"  --{name}={kind}  (default: {f.default!r})")
        lines.append(textwrap.indent(textwrap.fill(docs.get(name, ""), 100), " " * 6))
    return "\n".join(lines)


def flag_names() -> list[str]:
    """The sorted flag names (snapshot-tested so a rename is a conscious change)."""
    return sorted(flag_fields())
