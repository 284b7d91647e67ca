"""``InMemoryLoader``: batches sliced from tensors that already hold a whole split.

It replaces ``DataLoader`` for datasets that fit in memory (or in GPU memory): no workers, no
collation, one indexing op per batch. It shards itself for DDP, so Lightning does not (and
cannot) inject a ``DistributedSampler``.
"""

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from project.errors import UserError


class EpochSampler:
    """Holds the epoch that seeds the shuffle; Lightning's loops call ``loader.sampler.set_epoch(epoch)``."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class InMemoryLoader:
    """Iterates ``(images[idx], labels[idx])`` batches over one split held in two tensors.

    Shuffling uses ``torch.Generator().manual_seed(seed + epoch)``, so the order depends only on
    the seed and the epoch: a run resumed at epoch ``e`` sees the same batches as an
    uninterrupted one. ``state_dict`` also records how many batches of the current epoch were
    served, so Lightning can resume mid-epoch.

    Under DDP each rank takes ``perm[rank::world_size]``: disjoint shards covering the split.
    With ``even_batches`` (training) every rank yields ``ceil(max_shard / batch_size)`` batches
    (a rank one sample short gets a last batch one smaller) so no rank waits forever in an
    all-reduce; with ``drop_last`` every rank yields ``min_shard // batch_size`` full batches.
    Without ``even_batches`` (evaluation) each rank simply batches its own shard.

    Args:
        images: ``[N, ...]`` tensor (uint8 images in this project).
        labels: ``[N]`` int64 tensor.
        batch_size: Samples per batch.
        shuffle: Reshuffle every epoch.
        drop_last: Drop incomplete batches (training).
        seed: Shuffle seed; the epoch is added to it.
        rank: This process's rank.
        world_size: Number of processes.
        even_batches: Give every rank the same number of batches.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_batches: bool = True,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.even_batches = seed, rank, world_size, even_batches
        self.sampler = EpochSampler()
        self.batch_sampler = None  # Lightning inspects both, like on a DataLoader
        self._served = 0  # batches of the current epoch handed out (for state_dict)
        self._resume: dict[str, int] | None = None
        self._sizes = self._batch_sizes()

    def _batch_sizes(self) -> list[int]:
        """Sizes of this rank's batches, the same list every epoch."""
        n, w, b = len(self.labels), self.world_size, self.batch_size
        own = len(range(self.rank, n, w))
        if not self.even_batches:
            return [b] * (own // b) + ([] if self.drop_last or own % b == 0 else [own % b])
        if n < w:
            raise UserError(f"{n} samples cannot be split over {w} processes: use more data or fewer devices")
        if self.drop_last:
            return [b] * ((n // w) // b)
        count = math.ceil(math.ceil(n / w) / b)
        sizes = [b] * (count - 1) + [own - (count - 1) * b]
        if sizes[-1] == 0:  # this rank's shard is one short and the longest shard's last batch had 1 sample
            if b < 2:
                raise UserError(
                    f"batch_size 1 cannot give {w} processes the same number of batches over {n} samples:"
                    " use batch_size >= 2 or drop_last=True"
                )
            sizes[-2:] = [b - b // 2, b // 2]
        return sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def _permutation(self) -> Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed + self.sampler.epoch)
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: nothing runs until the first next(), so a set_epoch() that Lightning calls
        # after iter() still decides this epoch's order.
        shard = self._permutation()[self.rank :: self.world_size].to(self.images.device)
        skip, self._resume = self._skip_on_resume(), None
        start = sum(self._sizes[:skip])
        self._served = skip
        for size in self._sizes[skip:]:
            index = shard[start : start + size]
            start += size
            self._served += 1
            yield self.images[index], self.labels[index]

    def _skip_on_resume(self) -> int:
        """Batches to skip because a checkpoint taken mid-epoch already consumed them."""
        if self._resume is None or self._resume["epoch"] != self.sampler.epoch:
            return 0
        served = self._resume["served"]
        return served if 0 < served < len(self) else 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "served": int(state["served"])}
        self.sampler.set_epoch(int(state["epoch"]))
