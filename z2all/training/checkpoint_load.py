"""The three phases of loading one checkpoint on every rank, each agreed on by all ranks before the next.

:meth:`z2all.training.checkpoint.CheckpointManager.load_latest` picks the candidate and runs
``verify -> prepare -> restore`` through :func:`agreed`: a phase that fails on ANY rank is seen by every
rank (all-reduce of the worst outcome) before anyone enters the next phase, so no rank waits in DCP's
collective load while another already gave up on the candidate (docs/checkpoint.md, "Load protocol").

- verify: the manifest parses and the 1/W share of the files this rank checks is intact;
- prepare: read what the restore needs (a version-1 translation, the DCP metadata, the live state-dict
  templates), run the resume rules on the checkpoint's run facts, check strictly that the model fits;
- restore: ``dcp.load`` (collective), then every component's ``load_state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import CheckpointException

from z2all.training.checkpoint_format import (
    CheckpointMismatchError,
    CheckpointVersionError,
    CorruptCheckpointError,
    read_manifest,
    verify_files,
)
from z2all.training.checkpoint_guard import config_changes
from z2all.training.checkpoint_io import check_fits, load_dcp, read_metadata
from z2all.training.checkpoint_safety import UnsafeCheckpointError, safe_torch_load
from z2all.training.checkpoint_v1 import V1View, v1_view
from z2all.training.collectives import all_reduce_max, dist_on
from z2all.training.config import ConfigError
from z2all.training.rng_state import rank_seed, seed_all
from z2all.training.state import TrainState

logger = logging.getLogger(__name__)

# Outcomes of a phase, agreed by all ranks (the maximum wins). All but CORRUPT are refusals: the
# checkpoint is intact but must not be resumed, so no older one is tried instead.
CORRUPT, MISMATCH, UNSAFE, VERSION, REFUSED = 1, 2, 3, 4, 5
REFUSALS = {
    MISMATCH: CheckpointMismatchError,
    UNSAFE: UnsafeCheckpointError,
    VERSION: CheckpointVersionError,
    REFUSED: ConfigError,  # a resume rule, or a component that refuses the state (parallelize.py)
}
ResumeCheck = Callable[[Path, dict], None]
"""``check(checkpoint folder, run facts)``: raise ConfigError to refuse resuming from that checkpoint."""


def agreed(fn: Callable[..., Any], *args: Any) -> tuple[int, Any, Any]:
    """Run ``fn(*args)`` on this rank; ``(outcome agreed by every rank, this rank's error, result)``."""
    code, error, result = 0, None, None
    try:
        result = fn(*args)
    except CheckpointVersionError as e:  # before CheckpointMismatchError: it is one
        code, error = VERSION, e
    except CheckpointMismatchError as e:
        code, error = MISMATCH, e
    except UnsafeCheckpointError as e:
        code, error = UNSAFE, e
    except ConfigError as e:
        code, error = REFUSED, e
    except CheckpointException as e:  # DCP's (a BaseException); str() is every rank's traceback
        code, error = (
            CORRUPT,
            "; ".join(
                f"rank {r}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                for r, (exc, _) in e.failures.items()
            ),
        )
    except Exception as e:  # noqa: BLE001 - any read/decode failure means "corrupt"
        code, error = CORRUPT, e
    return all_reduce_max(code), error, result


def verified_manifest(path: Path, rank: int, world: int, checksums: bool) -> dict:
    """The manifest of ``path`` if the 1/W of its files this rank checks are intact (every rank checks
    its share, in parallel); else CorruptCheckpointError saying why."""
    manifest = read_manifest(path)
    why = verify_files(path, manifest, sorted(manifest["files"])[rank::world], checksums=checksums)
    if why is not None:
        raise CorruptCheckpointError(why)
    return manifest


@dataclass
class LoadPlan:
    templates: dict[str, Any] = field(default_factory=dict)
    """Live state dicts of the components saved in DCP, which ``dcp.load`` fills in place."""
    not_in_dcp: dict[str, dict] = field(default_factory=dict)
    """States of the other shared components: saved empty (``{}``), or kept elsewhere by version 1."""
    per_rank: dict[str, Any] | None = None
    """This rank's per-rank states; None when the checkpoint has no file of this rank."""


def prepare(path: Path, manifest: dict, state: TrainState, rank: int, check: ResumeCheck | None) -> LoadPlan:
    """Everything but the load itself (module docstring); raises the refusal or the damage found."""
    view: V1View | None = v1_view(path, manifest, rank) if manifest["version"] == 1 else None
    if check is not None:  # the same facts on every rank: every rank decides alike
        check(path, view.run if view is not None else manifest.get("run", {}))
    if view is None:
        comps = manifest.get("components", {})
        in_dcp, empty, elsewhere = set(comps.get("shared", [])), set(comps.get("empty", [])), {}
    else:
        in_dcp, empty, elsewhere = view.in_dcp, view.empty, view.shared
    plan = LoadPlan()
    meta = read_metadata(path)
    for name, comp in state.shared.items():
        if name in in_dcp:
            if hasattr(comp, "template_for"):  # a component that reads more than one saved layout
                prefix = f"{name}."
                saved = {k[len(prefix) :] for k in meta.state_dict_metadata if k.startswith(prefix)}
                template = comp.template_for(saved)
            else:
                template = comp.load_template() if hasattr(comp, "load_template") else comp.state_dict()
            if name == "model":  # strict: names every missing, unexpected or reshaped tensor
                check_fits(meta, name, template, path)
            plan.templates[name] = template
        elif name in empty or name in elsewhere:
            plan.not_in_dcp[name] = elsewhere.get(name, {})
        else:
            raise CheckpointMismatchError(f"{path}: saved without {name} state, cannot resume it")
    model, saved_cfg = state.model, manifest.get("model_config")
    live_cfg = model.config_dict() if model is not None else None
    changes = config_changes(saved_cfg, live_cfg) if saved_cfg is not None and live_cfg else []
    if changes:  # same shapes, other model: the weights would load and compute something else
        raise CheckpointMismatchError(
            f"{path}: the model config differs from the one this checkpoint was saved with: "
            f"{'; '.join(changes)}. A resumed run must build the same model (was its --model_config "
            "file edited?)"
        )
    own = path / f"rank_{rank:05d}.pt"
    if own.is_file():
        plan.per_rank = view.per_rank if view is not None else safe_torch_load(own)
    return plan


def restore(path: Path, manifest: dict, plan: LoadPlan, state: TrainState, rank: int, seed: int) -> None:
    """``dcp.load`` (collective) and every component's ``load_state_dict``."""
    load_dcp(path, plan.templates, no_dist=not dist_on())
    for name, comp in state.shared.items():
        comp.load_state_dict(plan.templates[name] if name in plan.templates else plan.not_in_dcp[name])
    if plan.per_rank is None:
        # This rank did not exist when the checkpoint was written: its own components start as built
        # ({}: a failed attempt at a newer checkpoint may have loaded something), and its RNG streams
        # are seeded by the run's convention.
        logger.warning(
            "rank %d: %s was saved by %d ranks; seeding this rank's RNG from (seed=%d, rank=%d)",
            rank,
            path,
            manifest["world_size"],
            seed,
            rank,
        )
        for comp in state.per_rank.values():
            comp.load_state_dict({})
        seed_all(rank_seed(seed, rank))
        return
    for name, comp in state.per_rank.items():
        comp.load_state_dict(plan.per_rank.get(name, {}))
