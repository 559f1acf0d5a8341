"""The one unwrap rule: from a wrapped module, and from its parameter names, back to the model's own.

Training wraps the model from outside (STYLE.md: the model knows nothing about parallelism), and
each wrapper adds one segment to every name ``named_parameters()`` and ``state_dict()`` report:

    torch.compile(m)                              -> _orig_mod.<name>   (OptimizedModule._orig_mod)
    torch.nn.parallel.DistributedDataParallel(m)  -> module.<name>
    parallel.DistributedDataParallel(m)           -> module.<name>

Wrappers nest in any order (``compile(DDP(m))``: ``_orig_mod.module.<name>``), so the model's own
name is what is left after every LEADING wrapper segment. The invariant both functions keep, for any
stack of these wrappers ``w`` around a model (tested in tests/parallel/test_unwrap.py)::

    {param_name(n) for n, _ in w.named_parameters()} == {n for n, _ in unwrap_model(w).named_parameters()}

Only leading segments are wrappers. A ``_orig_mod`` deeper in a name (``layers.0._orig_mod.w``)
comes from a submodule compiled inside the model: that is part of the model, ``unwrap_model``
keeps it, and so does ``param_name`` (its ``state_dict()`` keys carry it too).

``unwrap_model`` decides by type, so it never strips a module merely because it has a ``.module``
attribute. ``param_name`` sees only a string: it cannot tell a wrapper's ``module.`` from a model
whose own top-level child is called ``module`` (or ``_orig_mod``), so such a model is not supported
by it; where you hold the module, ``unwrap_model(w).named_parameters()`` gives the names exactly.
"""

from __future__ import annotations

from torch import nn

# Leading name segments that wrappers add (see the module docstring).
_COMPILE_SEGMENT = "_orig_mod."
_DDP_SEGMENT = "module."


class _ModuleWrapper(nn.Module):
    """Base of this package's wrappers that hold the wrapped model as ``self.module`` (our DDP).

    It exists so that :func:`unwrap_model` can recognise them by type without importing them: this
    module is imported by ``distributed_data_parallel.py``, not the other way round.
    """

    module: nn.Module


def _inner(module: nn.Module) -> nn.Module | None:
    """The module ``module`` wraps, or None when it is no wrapper."""
    compiled = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(compiled, nn.Module):
        return compiled
    if isinstance(module, (nn.parallel.DistributedDataParallel, _ModuleWrapper)):
        return module.module
    return None


def unwrap_model(module: nn.Module) -> nn.Module:
    """The model inside every torch.compile / torch DDP / our DDP wrapper, however nested."""
    inner = _inner(module)
    while inner is not None:
        module, inner = inner, _inner(inner)
    return module


def param_name(name: str) -> str:
    """The model's own name of a parameter (or state-dict key) named ``name`` by a wrapped module.

    Drops every leading ``_orig_mod.`` / ``module.`` wrapper segment:
    ``module._orig_mod.layers.0.w`` -> ``layers.0.w``, ``_orig_mod.module.x`` -> ``x``; a name of an
    unwrapped model comes back unchanged (unless its first segment is ``module``: module docstring).
    """
    while True:
        if name.startswith(_COMPILE_SEGMENT):
            name = name[len(_COMPILE_SEGMENT) :]
        elif name.startswith(_DDP_SEGMENT):
            name = name[len(_DDP_SEGMENT) :]
        else:
            return name
