"""GlobalBatchSampler: per-step sample sets independent of world size, epochs, resume, errors."""

from __future__ import annotations

import numpy as np
import pytest

from z2all.data.sampler import GlobalBatchSampler

N, B, G, SEED = 103, 4, 4, 11  # 25 full micro-batches per epoch: steps straddle epochs


def _step_sets(world_size: int, steps: int) -> list[list[list[int]]]:
    """For each step, the micro-batches of all ranks, in global micro-batch order j = k*W + r."""
    samplers = [GlobalBatchSampler(N, B, G, SEED, r, world_size) for r in range(world_size)]
    out = []
    for s in range(steps):
        by_j = {}
        for r, smp in enumerate(samplers):
            for k in range(G // world_size):
                by_j[k * world_size + r] = smp.indices(s, k)
        out.append([by_j[j] for j in range(G)])
    return out


def test_same_samples_per_step_for_world_sizes_1_2_4():
    ref = _step_sets(1, 20)
    assert _step_sets(2, 20) == ref
    assert _step_sets(4, 20) == ref


def test_rule_matches_independent_reference():
    """Global micro-batch m = s*G + j holds order_e[(m % M)*B : ...], order_e = permutation(seed + e)."""
    smp = GlobalBatchSampler(N, B, G, SEED, rank=1, world_size=2)
    m_per_epoch = N // B
    for s in range(15):
        for k in range(G // 2):
            m = s * G + k * 2 + 1
            e, w = divmod(m, m_per_epoch)
            order = np.random.default_rng(SEED + e).permutation(N)
            assert smp.indices(s, k) == order[w * B : (w + 1) * B].tolist()


def test_each_epoch_is_a_permutation_and_epochs_differ():
    smp = GlobalBatchSampler(N, B, G, SEED)
    m = N // B
    epochs = [sum((smp.global_micro_batch(e * m + i) for i in range(m)), []) for e in range(3)]
    for ep in epochs:
        assert len(ep) == len(set(ep)) == m * B and set(ep) <= set(range(N))
    assert epochs[0] != epochs[1] != epochs[2]


def test_deterministic_and_seed_dependent():
    a = GlobalBatchSampler(N, B, G, seed=1)
    b = GlobalBatchSampler(N, B, G, seed=1)
    c = GlobalBatchSampler(N, B, G, seed=2)
    assert a.step_indices(3) == b.step_indices(3) != c.step_indices(3)
    plain = GlobalBatchSampler(N, B, G, shuffle=False)
    assert plain.indices(0, 0) == [0, 1, 2, 3] and plain.indices(1, 0) == [16, 17, 18, 19]


def test_resume_on_another_world_size_continues_the_same_stream():
    """Train 5 steps on 4 ranks, 'checkpoint' the step, resume on 2 ranks: steps 5.. are unchanged."""
    ref = _step_sets(1, 12)
    resumed = [GlobalBatchSampler(N, B, G, SEED, r, 2) for r in range(2)]
    for s in range(5, 12):
        got = sorted(sum((smp.step_indices(s)[k] for smp in resumed for k in range(2)), []))
        assert got == sorted(sum(ref[s], []))


def test_errors():
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        GlobalBatchSampler(N, B, 4, world_size=3)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        GlobalBatchSampler(N, B, G, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        GlobalBatchSampler(3, B, G)
    with pytest.raises(ValueError, match="micro_step 2 out of range"):
        GlobalBatchSampler(N, B, G, rank=0, world_size=2).indices(0, 2)
