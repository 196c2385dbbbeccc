"""Data loading that resumes exactly mid-epoch.

Lightning saves the state of any train dataloader that has ``state_dict`` / ``load_state_dict`` and restores it
when resuming. With an epoch-seeded shuffle (the permutation depends only on seed and epoch, not on the global RNG)
and a count of the batches the training loop actually consumed (Lightning prefetches one batch ahead, so batches
yielded is not batches trained on), a resumed run sees exactly the batches the interrupted one had left.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """Random permutation drawn from ``seed + epoch``; Lightning calls ``set_epoch`` each epoch."""

    def __init__(self, data_source, seed: int = 0):
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the epoch is checkpointed.

    ``consumed`` is advanced by the DataModule when a training batch is really used (``on_after_batch_transfer``);
    after ``load_state_dict`` the next iteration skips that many batches.
    """

    consumed: int = 0
    _skip: int = 0

    def __iter__(self):
        it = super().__iter__()
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for _ in range(skip):
            next(it)
        return it

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skip = int(state.get("consumed", 0))
