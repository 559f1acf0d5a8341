"""Every cross_entropy backend agrees when no target is trainable: loss 0.0 and zero gradients, never NaN.

The rule (docs/model.md): the loss is ``sum(per-token loss) / max(n_valid, 1)``, so a batch whose labels
are all -100 (e.g. an SFT batch of prompts only) contributes nothing to a step.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import tiny_model
from z2all.model import kernels

CE = kernels.OPS["cross_entropy"]


def _check_backend(backend, device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(12, 32, generator=g)).to(device, dtype).requires_grad_()
    w = (torch.randn(50, 32, generator=g) * 0.1).to(device, dtype).requires_grad_()
    targets = torch.full((12,), -100, dtype=torch.long, device=device)
    cases = [need for need in (True, False) if backend.supports(h, w, targets, need)]
    assert cases, backend.name
    for need_logits in cases:
        h.grad = w.grad = None
        loss, _ = backend.fn(h, w, targets, need_logits)
        assert loss.dtype == torch.float32 and loss.item() == 0.0, (backend.name, need_logits, loss)
        loss.backward()
        for grad in (h.grad, w.grad):
            assert grad is not None and torch.count_nonzero(grad).item() == 0, (backend.name, need_logits)
        # one valid target: the ordinary mean over one token (guards against a backend that always says 0)
        one = targets.clone()
        one[3] = 7
        with torch.no_grad():
            ref = torch.nn.functional.cross_entropy((h.float() @ w.float().t())[3:4], one[3:4])
            got, _ = backend.fn(h, w, one, need_logits)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert abs(got.item() - ref.item()) <= tol, (backend.name, got.item(), ref.item())


CPU_BACKENDS = [b.name for b in CE.backends if b.available()]


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_every_cpu_backend_gives_zero_loss_and_zero_grads(name):
    _check_backend(CE._by_name[name], "cpu", torch.float32)


def test_cpu_backends_cover_eager_torch_and_chunked():
    assert {"eager", "torch", "torch_chunked"} <= set(CPU_BACKENDS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [b.name for b in CE.backends])
def test_every_gpu_backend_gives_zero_loss_and_zero_grads(name):
    backend = CE._by_name[name]
    if not backend.available():
        pytest.skip(f"cross_entropy/{name}: library not installed")
    _check_backend(backend, "cuda", torch.bfloat16)


@pytest.mark.parametrize("return_logits", [True, False])
def test_model_loss_is_zero_when_every_label_is_ignored(return_logits):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, labels=torch.full_like(ids, -100), return_logits=return_logits)
    assert out.loss.item() == 0.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g).item() == 0 for g in grads)
