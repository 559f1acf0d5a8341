"""Bytes per parameter held by one rank, measured from the tensors, against the theory table.

A Llama ``tiny``-shaped model inside ``parallel.DistributedDataParallel`` (a one-rank gloo group, CPU)
with the optimizer wrappers of ``optimizer/`` after one real forward/backward/step, for each layout:

    fp32             fp32 weights, fp32 grads, FP32Optimizer                  theory 4 + 4 + 0 + 8 = 16
    bf16/fp32-grads  bf16 weights, fp32 main_grad, Float16OptimizerWithFloat16Params  2 + 4 + 4 + 8 = 18
    bf16/bf16-grads  bf16 weights, bf16 main_grad, same wrapper                2 + 2 + 4 + 8 = 16
    autocast         fp32 weights and grads, bf16 autocast compute, FP32Optimizer     4 + 4 + 0 + 8 = 16

``params`` and ``grads`` are the DDP's contiguous buffers (padding included), ``main_params`` the fp32
copies the wrapper holds beyond the weights themselves, ``optimizer_state`` every tensor of the inner
AdamW's state (the per-parameter ``step`` counters included), each divided by the model's parameter
count (fp16 weights cost what bf16 ones do, plus the loss scaler's three scalars). Activations and
temporaries are not counted. Prints one JSON object.

    python benchmarks/bench_bytes_per_param.py
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
import torch.distributed as dist

from optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer, OptimizerConfig
from parallel import DistributedDataParallel, DistributedDataParallelConfig
from z2all.model import Z2allForCausalLM, get_preset

THEORY = {"fp32": 16, "bf16/fp32-grads": 18, "bf16/bf16-grads": 16, "autocast": 16}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def measure(layout: str) -> dict:
    torch.manual_seed(0)
    model = Z2allForCausalLM(get_preset("tiny"))
    n = sum(p.numel() for p in model.parameters())
    half = layout.startswith("bf16")
    if half:
        model = model.to(torch.bfloat16)
    ddp = DistributedDataParallel(
        DistributedDataParallelConfig(grad_reduce_in_fp32=layout != "bf16/bf16-grads"), model
    )
    params = [p for p in model.parameters() if p.requires_grad]
    config = OptimizerConfig(lr=1e-3, backend="foreach")
    wrapper = Float16OptimizerWithFloat16Params if half else FP32Optimizer
    opt = wrapper([{"params": params}], config)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if layout == "autocast" else contextlib.nullcontext()
    with cast:
        loss = ddp(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss
    loss.backward()
    ddp.finish_grad_sync()
    stepped, _, _ = opt.step()
    assert stepped
    weights = {id(p) for p in params}
    held = {
        "params": sum(b.param_data.numel() * b.param_data.element_size() for b in ddp.param_and_grad_buffers),
        "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.param_and_grad_buffers),
        "main_params": _tensor_bytes(m for m in opt.main_params if id(m) not in weights),
        "optimizer_state": _tensor_bytes(v for s in opt.optimizer.state.values() for v in s.values()),
    }
    held["total"] = sum(held.values())
    return {
        "num_params": n,
        "bytes_per_param": {k: round(v / n, 3) for k, v in held.items()},
        "theory_total": THEORY[layout],
    }


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            result = {layout: measure(layout) for layout in THEORY}
        finally:
            dist.destroy_process_group()
    print(json.dumps({"benchmark": "bytes_per_param", "layouts": result}, indent=2))


if __name__ == "__main__":
    main()
