"""The three training objectives: pretrain, SFT and DPO, as losses over one micro-batch.

A micro-batch is a dict of tensors built by the task's ``collate``: ``input_ids`` and ``targets``,
both (B, T), ``targets[:, t]`` the token position t is scored on (``IGNORE_INDEX`` = no loss). Pretrain
and SFT take the model's own loss, ``model(input_ids, targets=targets, return_logits=False).loss``;
without logits the model may use a fused linear-cross-entropy kernel that never materialises the
(B, T, vocab) logits. A pretraining window ``(x, y)`` of the dataset (``y[t]`` follows ``x[t]``, L
tokens each) is fed as it is: exactly ``--max_seq_len`` positions, every one scored. SFT and DPO
samples carry Hugging Face ``labels`` aligned with ``input_ids``; their collate shifts them once
(``input_ids[:, :-1]`` against ``labels[:, 1:]``), so no position is computed without a target. DPO
needs per-sequence log-probs, so it reads the logits and scores the same ``targets``.

Normalisation rule (so that 1 rank == N ranks): a micro-batch's loss is the *mean over its own
trainable tokens* (pretrain/SFT) or over its pairs (DPO). The step loss is the mean of the G global
micro-batch losses; see ``loop.py`` for how ranks split it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from z2all.data.dpo_dataset import dpo_collate
from z2all.data.sft_dataset import sft_collate
from z2all.labels import IGNORE_INDEX

# The metric names TRL's DPOTrainer logs, so curves are comparable with TRL runs.
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class MicroResult:
    loss: torch.Tensor
    """Scalar loss of this micro-batch (graph attached), normalised as the module docstring says."""
    stats: dict[str, torch.Tensor]
    """Detached scalars averaged over micro-batches for logging (e.g. DPO rewards)."""
    n_tokens: int
    """Token positions this micro-batch pushed through the model (for tokens and tokens/s)."""


def inputs_and_targets(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, T) ids and Hugging Face labels -> (B, T-1) ``input_ids`` and ``targets``: the last token
    is only ever a target, so it is not fed (``targets[:, t] = labels[:, t + 1]``)."""
    return {"input_ids": input_ids[:, :-1], "targets": labels[:, 1:]}


def token_mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions with target != -100; 0 (not nan) when there are none."""
    # logits: (B, T, V), targets: (B, T); CE in fp32 whatever the autocast dtype.
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return flat / count


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(target) over positions with target != -100."""
    mask = targets != IGNORE_INDEX  # (B, T)
    safe = targets.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = torch.gather(logp, 2, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023) over (B,) sequence log-probs; returns (mean loss, TRL metrics)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    # -log sigmoid(margin); equals ln 2 when policy == reference (margin 0).
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    chosen_d, rejected_d = chosen_reward.detach(), rejected_reward.detach()
    stats = {
        "rewards/chosen": chosen_d.mean(),
        "rewards/rejected": rejected_d.mean(),
        "rewards/accuracies": (chosen_d > rejected_d).float().mean(),
        "rewards/margins": (chosen_d - rejected_d).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), stats


class PretrainTask:
    """Next-token loss on packed windows ``(x, y)`` from ``PretokDatasetWithIndex``."""

    name = "pretrain"

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        x = torch.stack([torch.as_tensor(s[0]) for s in samples]).long()  # (B, L)
        y = torch.stack([torch.as_tensor(s[1]) for s in samples]).long()  # (B, L): y[:, t] follows x[:, t]
        return {"input_ids": x, "targets": y}

    def micro_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ref_model=None) -> MicroResult:
        out = model(batch["input_ids"], targets=batch["targets"], return_logits=False)
        return MicroResult(out.loss, {}, batch["input_ids"].numel())


class SFTTask:
    """Loss only on assistant tokens: samples are ``(input_ids, labels)`` with -100 outside replies.

    ``labels`` are aligned with ``input_ids`` (Hugging Face convention); the collate shifts them once.
    Every SFTDataset sample has at least one trainable token, so no micro-batch mean is empty.
    """

    name = "sft"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        # Right padding: real tokens never attend to the pads after them, so no mask is needed.
        input_ids, labels, _ = sft_collate(samples, self.pad_id)  # (B, T) each
        return inputs_and_targets(input_ids, labels)  # (B, T-1) each

    def micro_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ref_model=None) -> MicroResult:
        out = model(batch["input_ids"], targets=batch["targets"], return_logits=False)
        return MicroResult(out.loss, {}, batch["input_ids"].numel())


class DPOTask:
    """Sigmoid DPO against a frozen reference model.

    Samples are ``DPODataset`` items: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``
    and ``rejected_labels`` (labels -100 on the prompt, aligned with input_ids). Chosen and rejected go
    through the model in one forward of 2B rows so both see the same weights and kernels.
    """

    name = "dpo"

    def __init__(self, pad_id: int, beta: float):
        self.pad_id = pad_id
        self.beta = beta

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        b = dpo_collate(samples, self.pad_id)  # chosen and rejected padded to one T
        # rows 0..B-1 are chosen, B..2B-1 rejected
        input_ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])  # (2B, T)
        labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])  # (2B, T)
        return inputs_and_targets(input_ids, labels)  # (2B, T-1) each

    def micro_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ref_model=None) -> MicroResult:
        if ref_model is None:
            raise ValueError("DPO needs a reference model")
        n = batch["input_ids"].size(0) // 2
        logps = sequence_logps(model(batch["input_ids"]).logits, batch["targets"])  # (2B,)
        with torch.no_grad():
            ref_logps = sequence_logps(ref_model(batch["input_ids"]).logits, batch["targets"])
        loss, stats = dpo_sigmoid_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], self.beta)
        return MicroResult(loss, stats, batch["input_ids"].numel())


LN2 = math.log(2.0)
