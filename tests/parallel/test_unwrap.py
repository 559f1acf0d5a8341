"""The one unwrap rule (parallel/unwrap.py) against real wrappers: torch.compile, torch DDP, our DDP.

Every stack of wrappers, in every order, must unwrap to the very model object, and ``param_name`` of
the wrapper's names must be the model's own names. The process group is one gloo rank in this
process (conftest's autouse fixture destroys it after each test).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import DistributedDataParallel, DistributedDataParallelConfig, param_name, unwrap_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def _compile(m: nn.Module) -> nn.Module:
    return torch.compile(m, backend="eager")  # a real OptimizedModule; "eager" skips codegen


def _torch_ddp(m: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(m)


def _our_ddp(m: nn.Module) -> nn.Module:
    return DistributedDataParallel(DistributedDataParallelConfig(bucket_size=64), m)


WRAPPERS = {"compile": _compile, "torch_ddp": _torch_ddp, "our_ddp": _our_ddp}
# Every stack of up to three wrappers, innermost first, each DDP at most once (ours turns parameters
# into views of its buffers; two DDPs over one model make no sense anyway) and no compile directly of
# a compiled module (torch.compile then returns a function, not a module).
STACKS = [
    stack
    for n in range(1, 4)
    for stack in itertools.product(WRAPPERS, repeat=n)
    if stack.count("our_ddp") <= 1
    and stack.count("torch_ddp") <= 1
    and ("compile", "compile") not in zip(stack, stack[1:])
]


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield  # destroyed by conftest's _restore_global_state


def _wrap(model: nn.Module, stack) -> nn.Module:
    for name in stack:
        model = WRAPPERS[name](model)
    return model


@pytest.mark.parametrize("stack", STACKS, ids="-".join)
def test_unwrap_model_and_param_name_agree_for_every_stack(one_rank_group, stack):
    model = Net()
    own = [n for n, _ in model.named_parameters()]
    wrapped = _wrap(model, stack)
    assert unwrap_model(wrapped) is model
    names = [n for n, _ in wrapped.named_parameters()]
    assert names != own  # the wrappers did add segments...
    assert [param_name(n) for n in names] == own  # ...and param_name drops exactly those
    assert {param_name(n) for n in names} == {n for n, _ in unwrap_model(wrapped).named_parameters()}
    assert [param_name(k) for k in wrapped.state_dict()] == list(model.state_dict())
    # a forward through the whole stack still runs (the wrappers were real, not just named)
    assert wrapped(torch.randn(3, 4)).shape == (3, 2)


def test_our_ddp_reports_the_models_own_names(one_rank_group):
    model = Net()
    own = {p: n for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=64), _compile(model))
    assert ddp.param_to_name == own
    assert sorted(n for _, names in ddp.bucket_layout() for n in names) == sorted(own.values())


def test_unwrap_model_leaves_unwrapped_and_look_alike_modules_alone():
    model = Net()
    assert unwrap_model(model) is model

    class HasModule(nn.Module):  # a `.module` attribute does not make a DDP
        def __init__(self):
            super().__init__()
            self.module = Net()

    holder = HasModule()
    assert unwrap_model(holder) is holder
    assert param_name("module.embed.weight") == "embed.weight"  # a string cannot tell (docstring)


def test_param_name_strips_only_leading_wrapper_segments():
    assert param_name("module._orig_mod.layers.0.w") == "layers.0.w"
    assert param_name("_orig_mod.module.x") == "x"
    assert param_name("_orig_mod._orig_mod.module.module.x") == "x"
    assert param_name("layers.0.w") == "layers.0.w"
    # deeper segments belong to the model: a compiled submodule, a child named `module`
    assert param_name("module.layers.0._orig_mod.w") == "layers.0._orig_mod.w"
    assert param_name("_orig_mod.block.module.w") == "block.module.w"
    assert param_name("modules.x") == "modules.x"  # whole segments only


def test_compiled_submodule_keeps_its_segment(one_rank_group):
    model = Net()
    model.layers[0] = _compile(model.layers[0])
    wrapped = _torch_ddp(_compile(model))
    assert unwrap_model(wrapped) is model
    own = [n for n, _ in model.named_parameters()]
    assert "layers.0._orig_mod.weight" in own
    assert [param_name(n) for n, _ in wrapped.named_parameters()] == own
