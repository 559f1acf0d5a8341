"""What a save refuses and how its failures are told apart: non-finite state, a full disk, a changed model.

Pure functions and error types under :mod:`z2all.training.checkpoint` (docs/checkpoint.md, "Save
protocol"); no collectives and no file layout here.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException


class NonFiniteStateError(RuntimeError):
    """The state to save holds NaN/Inf: :meth:`CheckpointManager.save` refuses it."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed for lack of space (ENOSPC/EDQUOT); the partial folder was removed
    and the checkpoints already on disk are intact."""


# Error codes of a save phase, agreed on by all ranks (the maximum wins).
FAILED, NO_SPACE = 1, 2
# What torch's zip writer (PyTorchStreamWriter) says when the file under it stops accepting bytes:
# it swallows the OSError of the short write, so ENOSPC arrives only as this text.
_SHORT_WRITE_TEXTS = ("unexpected pos", "failed writing file")
# Model config fields a resumed run may change: they pick how an op is computed, not what it computes
# (kernels), or only how fresh weights are drawn, which a resumed run loads instead (init fields).
RESUME_MAY_CHANGE = ("kernels", "initializer_range", "scale_output_init")


def float_tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` of every floating-point tensor in a nested state dict (of a sharded
    tensor, ZeRO-1's: the chunks this rank holds)."""
    if hasattr(tree, "local_shards"):
        return [(prefix, s.tensor) for s in tree.local_shards() if s.tensor.is_floating_point()]
    if torch.is_tensor(tree):
        return [(prefix, tree)] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    out = []
    for k, v in items:
        out += float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def nonfinite_names(tree: Any) -> tuple[list[str], int]:
    """(names of the floating tensors in ``tree`` holding a NaN or Inf, bytes of all of them).

    One host read per device. A tensor is finite iff its min and max are (both propagate NaN): one
    read of the tensor and no temporary of its size, far cheaper than ``isfinite(t).all()``, so a
    save barely notices it."""
    tensors = float_tensors(tree)
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    bad = []
    for items in by_device.values():
        finite = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all() for _, t in items])
        bad += [name for (name, _), ok in zip(items, finite.tolist()) if not ok]
    return bad, sum(t.numel() * t.element_size() for _, t in tensors)


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it, or a rank's failure inside DCP's CheckpointException) is a
    full disk or an exhausted quota."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(x, RuntimeError) and any(text in str(x) for text in _SHORT_WRITE_TEXTS):
            return True
        if isinstance(x, CheckpointException):
            todo += [failure[0] for failure in x.failures.values()]  # (exception, traceback) per rank
        todo += [x.__cause__, x.__context__]
    return False


def error_code(failure: BaseException | None) -> int:
    """0 (none), FAILED or NO_SPACE: what one rank contributes to a save phase's agreement."""
    if failure is None:
        return 0
    return NO_SPACE if is_no_space(failure) else FAILED


def config_changes(saved: dict, live: dict) -> list[str]:
    """``field: checkpoint X, model Y`` for each model config field that differs (JSON-normalised).
    A field the checkpoint does not record (saved by a z2all that did not have it yet) is not compared."""
    live = json.loads(json.dumps(live))
    return [
        f"{k}: checkpoint {saved.get(k)!r}, model {live.get(k)!r}"
        for k in sorted(saved)
        if k not in RESUME_MAY_CHANGE and saved.get(k) != live.get(k)
    ]
