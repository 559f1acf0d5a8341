"""Backend registry for the fused kernels.

Every hot op has one eager PyTorch reference (always available, the ground truth in tests) and an
ordered list of optional backends. ``KernelOp.resolve(forced)`` picks one:

- ``"auto"``: the first backend whose library imports (and, for GPU-only ones, whose CUDA is present);
- a backend name: exactly that one, or a ``ValueError`` naming the op, the backend and what is available.

The result is a ``ResolvedKernel``: the chosen backend followed by every always-available backend after
it. A call runs the first one in that chain that ``supports`` the arguments, so a CUDA-only kernel
handed a CPU tensor (or a padded attention mask it cannot take) falls back, logged once, instead of
crashing. A missing optional library is never an error.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger(__name__)


@functools.cache
def try_import(module: str) -> ModuleType | None:
    """Import ``module`` or return None (missing or broken install); the result is cached."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # a broken CUDA extension raises OSError/RuntimeError, not ImportError
        logger.debug("optional kernel module %s not usable: %s", module, e)
        return None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` would run in: the autocast dtype when autocast is on, else x's.

    Custom kernels (triton / CUDA extensions) are not autocast-aware, so their wrappers cast
    explicitly to what the eager matmuls would have used.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _always(*args, **kwargs) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """One implementation of an op."""

    name: str
    fn: Callable
    """The implementation; same signature and semantics as the op's eager reference."""
    available: Callable[[], bool] = lambda: True
    """True when its library imports (and the hardware it needs is present)."""
    supports: Callable[..., bool] = _always
    """Given the call's arguments: can this backend handle them (device, dtype, mask)?"""


class ResolvedKernel:
    """The chosen backend plus its fallbacks; calling it runs the first that supports the args."""

    def __init__(self, op: str, chain: list[Backend]):
        self.op = op
        self.chain = chain
        self.name = chain[0].name
        self._warned: set[str] = set()

    def __call__(self, *args, **kwargs):
        for i, backend in enumerate(self.chain):
            if backend.supports(*args, **kwargs):
                if i > 0 and backend.name not in self._warned:
                    self._warned.add(backend.name)
                    logger.info(
                        "kernel %s: backend %s cannot take these inputs; falling back to %s",
                        self.op,
                        self.name,
                        backend.name,
                    )
                return backend.fn(*args, **kwargs)
        raise RuntimeError(f"kernel {self.op}: no backend supports these inputs (chain {self.chain})")

    def __repr__(self) -> str:
        return f"ResolvedKernel({self.op}={self.name})"

    def __reduce__(self):
        # Backends hold lambdas, which do not pickle; a model sent to spawned ranks (or deep-copied)
        # re-resolves the same chain by name in the receiving process.
        return (_rebuild_resolved, (self.op, [b.name for b in self.chain]))


_ALL_OPS: dict[str, KernelOp] = {}


def _rebuild_resolved(op: str, names: list[str]) -> ResolvedKernel:
    kop = _ALL_OPS[op]
    return ResolvedKernel(op, [kop._by_name[n] for n in names])


class KernelOp:
    """An op with backends in preference order; the last one must be the eager reference."""

    def __init__(self, name: str, backends: list[Backend]):
        assert backends[-1].name == "eager", "the eager reference closes every backend list"
        self.name = name
        self.backends = backends
        self._by_name = {b.name: b for b in backends}
        _ALL_OPS[name] = self

    def available_backends(self) -> list[str]:
        return [b.name for b in self.backends if b.available()]

    def resolve(self, forced: str = "auto") -> ResolvedKernel:
        if forced == "auto":
            start = next(i for i, b in enumerate(self.backends) if b.available())
        else:
            if forced not in self._by_name:
                raise ValueError(
                    f"kernel {self.name}: unknown backend {forced!r}; "
                    f"known: {[b.name for b in self.backends]}"
                )
            if not self._by_name[forced].available():
                raise ValueError(
                    f"kernel {self.name}: backend {forced!r} was forced but is not available here "
                    f"(library missing or no CUDA); available: {self.available_backends()}"
                )
            start = self.backends.index(self._by_name[forced])
        chosen = self.backends[start]
        # Fallbacks: the later backends that are available; the eager reference supports everything.
        fallbacks = [b for b in self.backends[start + 1 :] if b.available()]
        return ResolvedKernel(self.name, [chosen, *fallbacks])
