"""``GlobalBatchSampler``: which samples each rank reads at each step, independent of the world size.

The rule (docs/architecture.md, docs/data.md):

* Epoch ``e`` orders the ``N`` samples by ``order_e = permutation(N, seed + e)``.
* Global micro-batch ``m`` (counting from the start of training, over epochs) is epoch ``e = m // M``,
  samples ``order_e[(m % M) * B : (m % M + 1) * B]`` where ``M = N // B`` (the last ``N % B`` samples of
  an epoch's order are dropped, so every micro-batch is full).
* Step ``s`` consumes global micro-batches ``s*G .. s*G + G - 1`` (G = global gradient-accumulation
  micro-batches per step); rank ``r`` of ``W`` takes those with ``j % W == r``, i.e. its local
  micro-step ``k`` is ``j = k*W + r``.

So a step's set of samples depends only on (seed, N, B, G, step): the training loop saves just ``step``,
and resuming on another world size continues with exactly the samples it would have seen.
Memory: the permutations of at most two epochs (4 bytes per sample when N < 2**32).
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    """Sample indices for (step, local micro-step) of one rank.

    Args:
        num_samples: N, samples in the dataset split.
        micro_batch_size: B, samples per micro-batch on one rank.
        grad_accum_global: G, micro-batches per optimizer step summed over all ranks; divisible by W.
        seed: base seed; epoch e shuffles with ``seed + e``.
        rank, world_size: this rank and the number of data-parallel ranks.
        shuffle: False keeps the natural order (``order_e = arange(N)``) in every epoch.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        grad_accum_global: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if micro_batch_size < 1 or grad_accum_global < 1 or world_size < 1:
            raise ValueError("micro_batch_size, grad_accum_global and world_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if grad_accum_global % world_size:
            raise ValueError(
                f"global gradient accumulation {grad_accum_global} is not divisible by world size "
                f"{world_size}: every rank must run the same number of micro-steps"
            )
        if num_samples < micro_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one micro-batch of {micro_batch_size}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_global = grad_accum_global
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.micro_steps_per_rank = grad_accum_global // world_size
        self.micro_batches_per_epoch = num_samples // micro_batch_size  # M
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs: a step may straddle two

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``: (N,) permutation, a pure function of (seed + epoch, N)."""
        order = self._orders.get(epoch)
        if order is None:
            n = self.num_samples
            dtype = np.uint32 if n < 2**32 else np.uint64
            if self.shuffle:
                order = np.random.default_rng(self.seed + epoch).permutation(n).astype(dtype)
            else:
                order = np.arange(n, dtype=dtype)
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order

    def global_micro_batch(self, m: int) -> list[int]:
        """Samples of global micro-batch ``m`` (counted from the start of training)."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {m}")
        epoch, within = divmod(m, self.micro_batches_per_epoch)
        b = self.micro_batch_size
        return self.order(epoch)[within * b : (within + 1) * b].tolist()

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Samples for this rank's local ``micro_step`` (0 .. G/W - 1) of optimizer ``step``."""
        if not 0 <= micro_step < self.micro_steps_per_rank:
            raise ValueError(f"micro_step {micro_step} out of range 0..{self.micro_steps_per_rank - 1}")
        j = micro_step * self.world_size + self.rank  # global micro-batch within the step
        return self.global_micro_batch(step * self.grad_accum_global + j)

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of ``step``, in micro-step order."""
        return [self.indices(step, k) for k in range(self.micro_steps_per_rank)]
