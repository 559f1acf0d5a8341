"""Task losses against independent references: torch's CE, the model's own shifted loss, a per-row
loop for sequence log-probs, TRL's formulation of the sigmoid DPO loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from z2all.labels import IGNORE_INDEX
from z2all.training.tasks import (
    DPO_METRICS,
    DPOTask,
    PretrainTask,
    SFTTask,
    dpo_sigmoid_loss,
    inputs_and_targets,
    sequence_logps,
    token_mean_ce,
)


def test_token_mean_ce_matches_torch_mean():
    logits = torch.randn(3, 7, 11)
    targets = torch.randint(0, 11, (3, 7))
    targets[0, :4] = IGNORE_INDEX
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(token_mean_ce(logits, targets), ref, rtol=1e-6, atol=0)
    # a micro-batch without any trainable token contributes 0, not nan
    assert token_mean_ce(logits, torch.full_like(targets, IGNORE_INDEX)).item() == 0.0


def test_inputs_and_targets_shift_hf_labels_once():
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    batch = inputs_and_targets(ids, labels)
    # position t is scored on labels[t + 1]; the last token is only a target, so it is not fed
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert batch["targets"].tolist() == [[IGNORE_INDEX, 3, 4, IGNORE_INDEX]]


def test_sequence_logps_matches_loop():
    logits = torch.randn(2, 5, 9)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 3, IGNORE_INDEX], [IGNORE_INDEX, 4, 4, 4, 8]])
    want = []
    for b in range(2):
        total = 0.0
        for t in range(5):
            if targets[b, t] != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, t].double(), -1)[targets[b, t]].item()
        want.append(total)
    torch.testing.assert_close(
        sequence_logps(logits, targets).double(),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


def _trl_dpo(pc, pr, rc, rr, beta):
    # TRL DPOTrainer, loss_type="sigmoid", label_smoothing=0: logits = (pc - pr) - (rc - rr)
    logits = (pc - pr) - (rc - rr)
    return -F.logsigmoid(beta * logits).mean()


def test_dpo_loss_matches_trl_formula_and_metrics():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 - 20 for _ in range(4))
    loss, stats = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(loss, _trl_dpo(pc, pr, rc, rr, 0.3), rtol=1e-6, atol=0)
    assert set(stats) == set(DPO_METRICS)
    torch.testing.assert_close(stats["rewards/chosen"], (0.3 * (pc - rc)).mean())
    torch.testing.assert_close(stats["rewards/rejected"], (0.3 * (pr - rr)).mean())
    torch.testing.assert_close(stats["rewards/margins"], (0.3 * (pc - rc) - 0.3 * (pr - rr)).mean())
    assert stats["rewards/accuracies"].item() == ((pc - rc) > (pr - rr)).float().mean().item()
    torch.testing.assert_close(stats["logps/chosen"], pc.mean())
    same, _ = dpo_sigmoid_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)


@pytest.fixture
def tiny_model():
    from z2all.model import Z2allForCausalLM, get_preset

    torch.manual_seed(0)
    return Z2allForCausalLM(get_preset("tiny", vocab_size=64))


def test_sft_loss_equals_ce_on_shifted_logits(tiny_model):
    samples = [
        (torch.tensor([1, 5, 6, 7, 8, 9]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9])),
        (torch.tensor([1, 3, 4]), torch.tensor([IGNORE_INDEX, 3, 4])),
    ]
    task = SFTTask(pad_id=0)
    batch = task.collate(samples)
    # padded to 6, then the last position dropped: it only ever was a target
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"][1, 3:].tolist() == [0, 0]
    assert batch["targets"][1].tolist() == [3, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    ours = task.micro_loss(tiny_model, batch).loss  # the model's (possibly fused) loss path
    # references: the Hugging Face labels path of the model on the full padded rows, and plain CE
    # over the logits of the trainable positions
    full_ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 3, 4, 0, 0, 0]])
    full_labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], [IGNORE_INDEX, 3, 4] + [IGNORE_INDEX] * 3]
    )
    hf = tiny_model(full_ids, labels=full_labels).loss
    logits = tiny_model(full_ids).logits
    manual = F.cross_entropy(
        torch.cat([logits[0, [1, 2, 4]], logits[1, [0, 1]]]).float(), torch.tensor([6, 7, 9, 3, 4])
    )
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, manual, rtol=1e-5, atol=1e-6)


def test_pretrain_task_is_plain_next_token_ce(tiny_model):
    w = torch.randint(0, 64, (3, 9))
    task = PretrainTask()
    batch = task.collate([(w[i, :-1], w[i, 1:]) for i in range(3)])
    assert torch.equal(batch["input_ids"], w[:, :-1]) and torch.equal(batch["targets"], w[:, 1:])
    res = task.micro_loss(tiny_model, batch)
    logits = tiny_model(w[:, :-1]).logits  # (3, 8, V): every one of the 8 positions is scored
    want = F.cross_entropy(logits.reshape(-1, 64).float(), w[:, 1:].reshape(-1))
    torch.testing.assert_close(res.loss, want, rtol=1e-5, atol=1e-6)
    assert res.n_tokens == 3 * 8


def test_dpo_task_step_one_is_ln2(tiny_model):
    def item(prompt, chosen, rejected):
        d = {}
        for side, resp in (("chosen", chosen), ("rejected", rejected)):
            d[f"{side}_input_ids"] = torch.tensor(prompt + resp)
            d[f"{side}_labels"] = torch.tensor([IGNORE_INDEX] * len(prompt) + resp)
            d[f"{side}_attention_mask"] = torch.ones(len(prompt) + len(resp), dtype=torch.long)
        return d

    samples = [item([1, 2, 3], [4, 5], [6, 7, 8]), item([1, 9], [10], [11, 12])]
    task = DPOTask(pad_id=0, beta=0.1)
    batch = task.collate(samples)
    assert batch["input_ids"].shape == (4, 5)  # chosen rows then rejected rows, one common T - 1
    ref = copy.deepcopy(tiny_model).eval()
    res = task.micro_loss(tiny_model, batch, ref)
    assert res.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # chosen log-prob of sample 0 equals the per-token sum computed from an unpadded forward
    logits = tiny_model(torch.tensor([[1, 2, 3, 4, 5]])).logits[0].log_softmax(-1)
    want = logits[2, 4] + logits[3, 5]
    got = sequence_logps(tiny_model(batch["input_ids"]).logits, batch["targets"])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    res.loss.backward()
    assert any(p.grad is not None for p in tiny_model.parameters())
    assert all(p.grad is None for p in ref.parameters())
