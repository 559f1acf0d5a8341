"""DistributedOptimizer: ZeRO-1 over z2all's DDP buffers. Design page: docs/distributed_optimizer.md.

Each of the W data-parallel ranks owns shard r of every bucket (shard_map.py) and keeps fp32 main
params and AdamW moments for that shard only: 12/W bytes per parameter instead of 12. One step::

    backward: the DDP reduce-scatters each bucket (use_distributed_optimizer=True): afterwards only
              this rank's shard of main_grad holds the all-rank average
    step():   main grads = the owned slices of main_grad (fp32: views, no copy)
              fp16: unscale + found-inf, ONE all-reduce(MAX)          } the MixedPrecisionOptimizer
              global norm: sum of the shards' squared norms, ONE      } base, over the DDP's group
              all-reduce(SUM); clip; inner AdamW on the fp32 shards   }
              owned slices of the weights <- main shards (16-bit: rounded; fp32 weights ARE the
              main shards, stepped in place)
              all-gather every bucket's param_data in place, in bucket order: each rank sends its
              shard, receives the others'
    (overlap_param_gather: the all-gathers are launched here and each is waited for by a forward
     pre-hook just before the first module that uses the bucket runs: param_gather.py)

Invariants:
- Every rank issues the same collectives in the same order: found-inf (fp16), norm, then one
  all-gather per bucket, or none at all on a skipped step (a skip is decided from all-reduced values).
- A skipped step (overflow, non-finite norm) changes no weight, main shard, moment or step count.
- After a step (and once the gathers completed) every rank holds identical full weights, each
  element written by its one owner; padding stays zero (nobody owns it, all-gather copies zeros).
- A parameter that no rank used gets a zero gradient (the DDP zeroes its slot before the reduction)
  and is stepped like any other (AdamW's weight decay moves it), as in Megatron-LM; the unsharded
  path leaves such a parameter alone like torch DDP. Llama uses every parameter every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from optimizer import DynamicGradScaler, MainParams, MixedPrecisionOptimizer, OptimizerConfig, adamw_factory
from parallel.distributed_data_parallel import DistributedDataParallel
from parallel.distributed_optimizer.param_gather import ParamGather
from parallel.distributed_optimizer.shard_map import OwnedSlice, owned_slices, param_view
from parallel.distributed_optimizer.sharded_state import ShardedTensor, sharded_tensor

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


class DistributedOptimizer(MixedPrecisionOptimizer):
    """ZeRO-1: the optimizer state of this rank's shards only (module docstring)."""

    def __init__(
        self,
        ddp: DistributedDataParallel,
        config: OptimizerConfig,
        *,
        inner_factory: OptimizerFactory | None = None,
        grad_scaler: DynamicGradScaler | None = None,
        main_params: MainParams | None = None,
        overlap_param_gather: bool = False,
        prefetch_depth: int = 2,
    ):
        """``ddp`` must be built with ``use_distributed_optimizer=True`` and no comm hook (its
        reduce-scatter leaves each rank its shard). ``main_params``: fp32 values to cut the main
        shards from (16-bit weights whose fp32 originals exist); default: the weights themselves,
        upcast. ``inner_factory(groups)`` builds the inner optimizer over the fp32 shards (default:
        ``adamw_factory(config)``); the groups split weight decay by the *parameter's* ndim."""
        if not ddp.config.use_distributed_optimizer:
            raise ValueError(
                "DistributedOptimizer needs DistributedDataParallelConfig(use_distributed_optimizer=True)"
            )
        if ddp._comm_hook is not None:
            raise ValueError(
                "DistributedOptimizer reads the shards the DDP's reduce-scatter leaves; a comm hook "
                "(PowerSGD, fp16/bf16 compression, the overlapped optimizer step) all-reduces instead"
            )
        self.ddp = ddp
        group = ddp.process_group
        self.slices: list[OwnedSlice] = owned_slices(ddp.param_and_grad_buffers, ddp.dp_rank, ddp.dp_size)
        self._mine = {s.param: i for i, s in enumerate(self.slices)}  # param -> index of its slice here
        # param -> every rank's (rank, start, end): the global layout of a sharded checkpoint entry
        self._ranges: dict[nn.Parameter, list[tuple[int, int, int]]] = {}
        for r in range(ddp.dp_size):
            for s in owned_slices(ddp.param_and_grad_buffers, r, ddp.dp_size):
                self._ranges.setdefault(s.param, []).append((r, s.start, s.end))
        model_shards, main_shards = [], []
        decay, no_decay = [], []
        for s in self.slices:
            model = param_view(s.param, s)  # a view into the DDP's param buffer
            if s.param.dtype == torch.float32:
                main = model  # fp32 weights are their own main params: stepped in place
            else:
                source = main_params.of(s.param) if main_params is not None else s.param
                main = param_view(source, s).float().clone()
            model_shards.append(model)
            main_shards.append(main)
            (decay if s.param.ndim >= config.decay_ndim_min else no_decay).append(main)
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:  # this rank owns no element (a tiny model on many ranks): a state-less stand-in
            groups = [{"params": [torch.zeros(0, device=ddp.buckets[0].param_data.device)]}]
        optimizer = (inner_factory or adamw_factory(config))(groups)
        device = ddp.buckets[0].param_data.device
        super().__init__(
            optimizer, model_shards, main_shards, config, grad_scaler, group, group, device=device
        )
        self._gather = ParamGather(ddp, overlap=overlap_param_gather, prefetch_depth=prefetch_depth)

    # ---- the step (the base class's step() calls these) ----------------------------------------------
    def _copy_model_grads_to_main_grads(self) -> None:
        for s, main in zip(self.slices, self._main_params):
            g = param_view(s.param.main_grad, s)  # valid: this rank's shard of the reduced bucket
            main.grad = g if g.dtype == torch.float32 else g.float()

    def _copy_main_params_to_model_params(self) -> None:
        with torch.no_grad():
            for model, main in zip(self._model_params, self._main_params):
                if main is not model:
                    model.copy_(main)
        self._gather.start()  # every rank, every bucket, in bucket order (waited now, or in forward)

    def zero_grad(self) -> None:
        for p in self._main_params:
            p.grad = None

    def finish_param_sync(self) -> None:
        """Wait for every pending parameter all-gather (before reading full weights outside forward)."""
        self._gather.finish()

    @property
    def model_params(self) -> list[torch.Tensor]:
        """The owned slices of the weights (flat views into the DDP's buffer), one per main shard."""
        return list(self._model_params)

    def shard_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for its main shards (beyond the weights) and optimizer state."""
        weights = {id(m) for m in self._model_params}
        main = sum(m.numel() * m.element_size() for m in self._main_params if id(m) not in weights)
        state = sum(
            v.numel() * v.element_size()
            for st in self.optimizer.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        return {"main_params": main, "optimizer_state": state}

    def remove_hooks(self) -> None:
        self._gather.remove()

    # ---- checkpoints: the canonical per-parameter layout (sharded_state.py) ---------------------------
    def _sharded(self, param: nn.Parameter, local_of) -> ShardedTensor:
        i = self._mine.get(param)
        sl = self.slices[i] if i is not None else None
        local = local_of(i) if i is not None else None
        return sharded_tensor(
            local,
            (sl.start, sl.end) if sl is not None else None,
            tuple(param.shape),
            self._ranges[param],
            self.ddp.dp_rank,
            torch.float32,
            param.device,
        )

    def sharded_main_params(self, named: list[tuple[str, nn.Parameter]]) -> dict[str, ShardedTensor]:
        """``{name: fp32 main params of the parameter's shape}``, this rank's chunks being views of its
        main shards: the checkpoint's model entry for 16-bit weights (the truth; a load fills the
        shards in place, then :meth:`load_sharded_main_params`)."""
        return {name: self._sharded(p, lambda i: self._main_params[i].detach()) for name, p in named}

    def load_sharded_main_params(self) -> None:
        """After the main shards were filled in place: round them into the weights and all-gather."""
        self._copy_main_params_to_model_params()
        self._gather.finish()

    def _materialize_state(self) -> None:
        """Create the inner optimizer's state for every shard (a zero-lr step on zero gradients, the
        trick of DCP's own helper): what a load fills in place."""
        missing = [m for m in self._main_params if m not in self.optimizer.state]
        if not missing:
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        grads = [m.grad for m in self._main_params]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for m in self._main_params:
            m.grad = torch.zeros_like(m)
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        for m, g in zip(self._main_params, grads, strict=True):
            m.grad = g

    def sharded_optimizer_state(self, named: list[tuple[str, nn.Parameter]], for_load: bool = False) -> dict:
        """The optimizer entry in ``get_optimizer_state_dict``'s layout: ``{"state": {name: {"exp_avg",
        "exp_avg_sq": sharded, "step": tensor}}, "param_groups": [...]}``; {} before the first step
        (the empty-state rule). ``for_load``: the template a load fills (state created, no
        ``param_groups``: the hyper-parameters are this run's)."""
        if not for_load and not self.optimizer.state:
            return {}
        if for_load:
            self._materialize_state()
        local_steps = [st["step"] for st in self.optimizer.state.values() if "step" in st]
        step = float(max(local_steps)) if local_steps else 0.0  # every shard steps together
        state = {}
        for name, p in named:
            state[name] = {
                key: self._sharded(p, lambda i, key=key: self.optimizer.state[self._main_params[i]][key])
                for key in ("exp_avg", "exp_avg_sq")
            }
            state[name]["step"] = torch.tensor(step)
        if for_load:
            return {"state": state}
        hp = {k: v for k, v in self.optimizer.param_groups[0].items() if k not in ("params", "weight_decay")}
        decay = [n for n, p in named if p.ndim >= self.config.decay_ndim_min]
        rest = [n for n, p in named if p.ndim < self.config.decay_ndim_min]
        groups = [
            {**hp, "weight_decay": self.config.weight_decay, "params": decay},
            {**hp, "weight_decay": 0.0, "params": rest},
        ]
        return {"state": state, "param_groups": [g for g in groups if g["params"]]}

    def load_sharded_optimizer_state(self, sd: dict, named: list[tuple[str, nn.Parameter]]) -> None:
        """After a load filled the moments in place: the step counts. {}: as built (no state)."""
        if not sd:
            self.optimizer.state.clear()
            return
        for name, p in named:
            i = self._mine.get(p)
            if i is not None:
                self.optimizer.state[self._main_params[i]]["step"].fill_(float(sd["state"][name]["step"]))
