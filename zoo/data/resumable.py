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

    The DataModule calls ``mark_consumed()`` when a training batch is really used (``on_after_batch_transfer``).
    After ``load_state_dict``, iterators skip the batches already trained on, until training consumes a batch
    (Lightning may create and drop an iterator or two while it sets up).
    """

    consumed: int = 0
    _skip: int = 0

    def __iter__(self):
        it = super().__iter__()
        self.consumed = self._skip
        for _ in range(self._skip):
            next(it)
        return it

    def mark_consumed(self) -> None:
        self.consumed += 1
        self._skip = 0

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "epoch": getattr(self.sampler, "epoch", 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed, epoch = int(state.get("consumed", 0)), int(state.get("epoch", 0))
        if consumed >= len(self):  # saved after the epoch's last batch: resume at the start of the next epoch
            consumed, epoch = 0, epoch + 1
        self._skip = consumed
        # Lightning creates the resumed iterator before it calls set_epoch, so restore the epoch here.
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
