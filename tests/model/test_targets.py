"""``forward(targets=...)``: the loss on position-aligned targets, and ``labels`` as its shifted form.

Training passes a pretraining window ``w`` (L + 1 tokens) as ``input_ids = w[:-1]``, ``targets = w[1:]``:
every one of the L positions is scored, with no second shift and no token glued back on. ``labels``
keeps Hugging Face's meaning (shifted inside) and is defined as ``targets`` = labels shifted left by one
with IGNORE_INDEX appended; ``test_labels_are_targets_shifted_bit_exact`` holds the two to that.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from tests.model.helpers import tiny_model
from z2all.labels import IGNORE_INDEX
from z2all.model import kernels

V = 256
CPU_CE_BACKENDS = [b.name for b in kernels.OPS["cross_entropy"].backends if b.available()]


def _tokens(B: int = 2, T: int = 17) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's shift written out: targets[:, t] = labels[:, t + 1], nothing for the last position."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


@pytest.mark.parametrize("backend", CPU_CE_BACKENDS)
@pytest.mark.parametrize("return_logits", [True, False])
def test_targets_loss_is_cross_entropy_of_the_logits_at_the_same_positions(backend, return_logits):
    """Position t is scored on targets[:, t]: the loss is F.cross_entropy of the model's own logits
    against the targets as given, IGNORE_INDEX skipped. fp32 on CPU: measured 0.0 for every backend;
    the bound 1e-6 leaves room for another summation order (the chunked backend sums per chunk)."""
    model = tiny_model(kernels={"cross_entropy": backend})
    x = _tokens()
    targets = _tokens()
    targets[0, :5] = IGNORE_INDEX  # an SFT-style prompt
    targets[1, -2:] = IGNORE_INDEX
    with torch.no_grad():
        out = model(x, targets=targets, return_logits=return_logits)
        logits = model(x).logits  # (B, T, V): the same forward, without a loss
    ref = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.item()) <= 1e-6, (out.loss.item(), ref.item())
    if out.logits is not None:
        assert torch.equal(out.logits, logits)


@pytest.mark.parametrize("return_logits", [True, False])
def test_labels_are_targets_shifted_bit_exact(return_logits):
    """``labels=l`` is ``targets=_shift(l)``: same loss, logits and every gradient, bit for bit."""
    x = _tokens()
    labels = x.clone()
    labels[:, :4] = IGNORE_INDEX
    results = []
    for kwargs in ({"labels": labels}, {"targets": _shift(labels)}):
        model = tiny_model()
        out = model(x, return_logits=return_logits, **kwargs)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a.loss, b.loss)
    assert (a.logits is None and b.logits is None) or torch.equal(a.logits, b.logits)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None and torch.equal(grads_a[name], grads_b[name]), name


def test_a_window_split_once_scores_what_the_glued_window_scored():
    """The old pretraining path glued ``(x, y)`` back into the L + 1 window w and passed
    ``labels = [IGNORE_INDEX] + y``; the new one passes ``x`` with ``targets = y``. With causal
    attention both score the same L predictions, so the losses agree (fp32 on CPU: measured 0.0, bound
    1e-6; logits measured 0.0, bound 1e-5) and the new path runs one position fewer."""
    model = tiny_model()
    w = _tokens(T=33)  # L = 32
    x, y = w[:, :-1], w[:, 1:]
    glued_labels = torch.cat([torch.full_like(y[:, :1], IGNORE_INDEX), y], dim=1)
    with torch.no_grad():
        new = model(x, targets=y)
        old = model(w, labels=glued_labels)
    assert abs(new.loss.item() - old.loss.item()) <= 1e-6, (new.loss.item(), old.loss.item())
    assert (new.logits - old.logits[:, :-1]).abs().max().item() <= 1e-5


def test_labels_and_targets_together_or_misshapen_are_refused():
    model = tiny_model()
    x = _tokens()
    with pytest.raises(ValueError, match="not both"):
        model(x, labels=x, targets=x)
    with pytest.raises(ValueError, match=r"targets must be \(batch, new\) = \(2, 17\), got \(2, 16\)"):
        model(x, targets=x[:, 1:])
    with pytest.raises(ValueError, match=r"labels must be \(batch, new\)"):
        model(x, labels=x[:1])


def test_ignore_index_is_torch_and_hugging_face_convention():
    assert inspect.signature(F.cross_entropy).parameters["ignore_index"].default == IGNORE_INDEX == -100
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    assert inspect.signature(loss_utils.ForCausalLMLoss).parameters["ignore_index"].default == IGNORE_INDEX
