"""Every kernel backend usable here against the op's eager reference, values AND gradients.

CPU backends run in fp32 with atol 1e-5 (observed ~1e-6). CUDA backends (flash_attn, apex, liger,
xformers) run when a GPU and the library are present (``@pytest.mark.gpu``), in bf16 against the eager
reference computed in fp32 from the same inputs, atol 3e-2 (bf16 has ~3 significant digits).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.model.helpers import tiny_config, tiny_model
from z2all.model import Z2allForCausalLM, kernels
from z2all.model.kernels.attention import eager_attention
from z2all.model.kernels.cross_entropy import eager_lm_head_loss
from z2all.model.kernels.norm import eager_rms_norm
from z2all.model.kernels.rotary import eager_rotary
from z2all.model.kernels.swiglu import eager_swiglu
from z2all.model.rope import RotaryTables


def _attention_cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 16, 16

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, :5] = False  # left padding in row 0
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal[None] & pad[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]
    return {
        "causal": (r(B, H, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D), None),
        "padded": (r(B, H, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D), mask[:, None].to(device)),
        "decode_1": (r(B, H, 1, D), r(B, Hkv, T, D), r(B, Hkv, T, D), None),
        "decode_3": (r(B, H, 3, D), r(B, Hkv, T, D), r(B, Hkv, T, D), None),
    }


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _leaf(x):
    return x.detach().clone().requires_grad_(True) if _is_float(x) else x


def _run(fn, inputs, extra=(), n_out=None):
    """Run fn on leaf copies of the float inputs; return (first n_out outputs, input grads)."""
    leaves = [_leaf(x) for x in inputs]
    out = fn(*leaves, *extra)
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(o for o in outs if o is not None)[:n_out]
    torch.manual_seed(1)
    total = sum((o.float() * torch.randn(o.shape, device=o.device)).sum() for o in outs)
    total.backward()
    return outs, [x.grad for x in leaves if _is_float(x) and x.grad is not None]


def _compare(backend, eager, inputs, extra, atol, ref_inputs=None):
    if not backend.supports(*inputs, *extra):
        pytest.skip(f"{backend.name} does not take these inputs")
    outs, grads = _run(backend.fn, inputs, extra)
    # a loss-only backend returns (loss, None): compare the loss and the gradients of the loss alone
    ref_outs, ref_grads = _run(eager, ref_inputs if ref_inputs is not None else inputs, extra, len(outs))
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for a, b in zip(outs, ref_outs):
        assert a.shape == b.shape
        assert (a.float() - b.float()).abs().max().item() <= atol
    for a, b in zip(grads, ref_grads):
        assert (a.float() - b.float()).abs().max().item() <= atol


def _inputs(op: str, device, dtype):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device, dtype)

    if op == "rms_norm":
        return {"rms_norm": ((r(3, 5, 64), r(64, scale=0.1) + 1.0), (1e-5,))}
    if op == "rotary":
        cfg = tiny_config()
        tables = RotaryTables(cfg)
        shared = tables(torch.arange(10)[None])
        per_row = tables(torch.tensor([[0] * 3 + list(range(7)), list(range(10))]))
        q, k = r(2, 4, 10, 32), r(2, 2, 10, 32)
        return {
            "shared_positions": ((q, k, shared[0].to(device), shared[1].to(device)), ()),
            "per_row_positions": ((q, k, per_row[0].to(device), per_row[1].to(device)), ()),
        }
    if op == "swiglu":
        return {
            "mlp": ((r(2, 7, 64), r(176, 64, scale=0.1), r(176, 64, scale=0.1), r(64, 176, scale=0.1)), ())
        }
    if op == "cross_entropy":
        targets = torch.randint(0, 300, (24,), generator=g)
        targets[:5] = -100
        h, w = r(24, 64), r(300, 64, scale=0.1)
        return {
            "with_logits": ((h, w, targets.to(device)), (True,)),
            "loss_only": ((h, w, targets.to(device)), (False,)),
        }
    return {k: (v, ()) for k, v in _attention_cases(device, dtype).items()}


EAGER = {
    "attention": eager_attention,
    "rms_norm": eager_rms_norm,
    "rotary": eager_rotary,
    "swiglu": eager_swiglu,
    "cross_entropy": eager_lm_head_loss,
}

CPU_CASES = [
    (op, b.name, case)
    for op, kop in kernels.OPS.items()
    for b in kop.backends
    if b.available() and b.name != "eager"
    for case, (inputs, extra) in _inputs(op, "cpu", torch.float32).items()
    if b.supports(*inputs, *extra)  # e.g. a loss-only backend is not asked for logits
]


@pytest.mark.parametrize("op,backend,case", CPU_CASES)
def test_cpu_backend_matches_eager(op, backend, case):
    b = kernels.OPS[op]._by_name[backend]
    inputs, extra = _inputs(op, "cpu", torch.float32)[case]
    _compare(b, EAGER[op], inputs, extra, atol=1e-5)


def test_torch_backends_exist_on_cpu():
    """The CPU fast paths this machine should have: guards the parametrisation above from emptiness."""
    names = {(op, b) for op, b, _ in CPU_CASES}
    assert ("attention", "sdpa") in names
    assert ("rms_norm", "torch") in names
    assert ("cross_entropy", "torch") in names


GPU_CASES = [
    (op, b.name) for op, kop in kernels.OPS.items() for b in kop.backends if b.name not in ("eager",)
]


@pytest.mark.gpu
@pytest.mark.parametrize("op,backend", GPU_CASES)
def test_gpu_backend_matches_eager(op, backend):
    b = kernels.OPS[op]._by_name[backend]
    if not b.available():
        pytest.skip(f"{op}/{backend}: library not installed")
    for inputs, extra in _inputs(op, "cuda", torch.bfloat16).values():
        ref_inputs = tuple(x.float() if _is_float(x) else x for x in inputs)
        if b.supports(*inputs, *extra):
            _compare(b, EAGER[op], inputs, extra, atol=3e-2, ref_inputs=ref_inputs)


def test_forced_eager_model_matches_auto():
    auto = tiny_model()
    eager = tiny_model(kernels={op: "eager" for op in kernels.OPS})
    assert set(eager.kernel_backends.values()) == {"eager"}
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        a, e = auto(ids, labels=ids), eager(ids, labels=ids)
    assert (a.logits - e.logits).abs().max().item() <= 1e-5
    assert abs(a.loss.item() - e.loss.item()) <= 1e-6


def test_force_errors_name_op_and_backend():
    with pytest.raises(ValueError, match="kernel attention: unknown backend 'nope'"):
        tiny_model(kernels={"attention": "nope"})
    with pytest.raises(ValueError, match="unknown op 'attn'"):
        tiny_config(kernels={"attn": "eager"})
    unavailable = [(op, b.name) for op, kop in kernels.OPS.items() for b in kop.backends if not b.available()]
    if unavailable:
        op, name = unavailable[0]
        with pytest.raises(
            ValueError, match=f"kernel {op}: backend '{name}' was forced but is not available"
        ):
            kernels.set_backend(op, name)


def test_set_backend_and_active_backends(caplog):
    before = kernels.active_backends()
    assert set(before) == set(kernels.OPS)
    try:
        kernels.set_backend("rms_norm", "eager")
        assert kernels.active_backends()["rms_norm"] == "eager"
        with caplog.at_level(logging.INFO, logger="z2all.model.llama"):
            model = Z2allForCausalLM(tiny_config())
        assert model.kernel_backends["rms_norm"] == "eager"
        assert "kernels: attention=" in caplog.text and "rms_norm=eager" in caplog.text
        # a config entry wins over the process-wide choice
        assert kernels.active_backends({"rms_norm": "torch"})["rms_norm"] == "torch"
    finally:
        kernels.set_backend("rms_norm", "auto")
    assert kernels.active_backends() == before


def test_missing_library_is_not_an_error():
    from z2all.model.kernels._registry import try_import

    assert try_import("z2all_no_such_kernel_library") is None


def test_chunked_ce_chunking_and_no_grad():
    """Chunk size must not change the result; under no_grad only the loss is computed."""
    from z2all.model.kernels.chunked_ce import chunked_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = torch.randn(70, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 70, (50,), generator=g)
    t[::7] = -100
    ref, _ = eager_lm_head_loss(h, w, t)
    ref.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    for chunk in (1, 7, 50, 64):
        h.grad, w.grad = None, None
        loss = chunked_linear_cross_entropy(h, w, t, chunk)
        loss.backward()
        assert abs(loss.item() - ref.item()) <= 1e-5
        assert (h.grad - ref_gh).abs().max().item() <= 1e-5
        assert (w.grad - ref_gw).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert abs(chunked_linear_cross_entropy(h, w, t, 16).item() - ref.item()) <= 1e-5


def test_fallback_when_backend_cannot_take_inputs(caplog):
    """A chosen backend that refuses the inputs hands the call to the next one, logged once."""
    from z2all.model.kernels import Backend, KernelOp

    calls = []
    op = KernelOp(
        "toy",
        [
            Backend("picky", lambda x: calls.append("picky") or x * 2, supports=lambda x: x.dim() == 1),
            Backend("missing", lambda x: x * 3, available=lambda: False),
            Backend("eager", lambda x: calls.append("eager") or x * 2),
        ],
    )
    assert op.available_backends() == ["picky", "eager"]
    kernel = op.resolve("auto")
    assert kernel.name == "picky" and [b.name for b in kernel.chain] == ["picky", "eager"]
    with caplog.at_level(logging.INFO, logger="z2all.model.kernels._registry"):
        assert torch.equal(kernel(torch.ones(2)), torch.full((2,), 2.0))
        kernel(torch.ones(2, 2))
        kernel(torch.ones(2, 2))
    assert calls == ["picky", "eager", "eager"]
    assert caplog.text.count("falling back to eager") == 1
    with pytest.raises(ValueError, match="backend 'missing' was forced but is not available"):
        op.resolve("missing")


def test_loss_only_call_uses_fused_linear_and_logits_call_falls_back():
    model = tiny_model()
    assert model.kernel_backends["cross_entropy"] == "torch_chunked"
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        fused = model(ids, labels=ids, return_logits=False)
        full = model(ids, labels=ids)
    assert fused.logits is None and full.logits.shape == (2, 16, 256)
    assert abs(fused.loss.item() - full.loss.item()) <= 1e-5


def test_env_variable_forces_backends(monkeypatch):
    monkeypatch.setenv("Z2ALL_KERNELS", "attention=eager, swiglu=eager")
    assert kernels.active_backends()["attention"] == "eager"
    assert tiny_model().kernel_backends["swiglu"] == "eager"
    assert tiny_model(kernels={"attention": "sdpa"}).kernel_backends["attention"] == "sdpa"  # config wins
    monkeypatch.setenv("Z2ALL_KERNELS", "attention")
    with pytest.raises(ValueError, match="Z2ALL_KERNELS: entry 'attention' is not op=backend"):
        kernels.active_backends()
    monkeypatch.setenv("Z2ALL_KERNELS", "attn=eager")
    with pytest.raises(ValueError, match="unknown kernel op 'attn'"):
        kernels.active_backends()
