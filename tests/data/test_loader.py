"""InMemoryLoader: DDP shards, per-epoch seeded shuffles, mid-epoch resume state."""


import pytest
import torch

from project.data import (
    InMemoryLoader,
)
from project.errors import UserError


def shards(n: int, world: int, batch: int, **kwargs) -> list[list[torch.Tensor]]:
    """The label batches each rank sees; labels are the sample indices."""
    images, labels = torch.arange(n).view(n, 1), torch.arange(n)
    return [
        [b[1] for b in InMemoryLoader(images, labels, batch, rank=r, world_size=world, **kwargs)] for r in range(world)
    ]


@pytest.mark.parametrize(("n", "world", "batch"), [(20, 2, 4), (21, 2, 4), (9, 2, 4), (23, 3, 5), (7, 2, 3), (5, 4, 2)])
def test_ddp_training_shards_are_disjoint_complete_and_equally_long(n: int, world: int, batch: int) -> None:
    per_rank = shards(n, world, batch, shuffle=True, seed=1)
    seen = torch.cat([torch.cat(r) for r in per_rank]).tolist()
    assert sorted(seen) == list(range(n))  # nothing duplicated, nothing dropped
    assert len({len(r) for r in per_rank}) == 1  # equal batch counts: no rank waits in an all-reduce
    assert all(0 < len(b) <= batch for r in per_rank for b in r)


def test_ddp_short_rank_splits_its_last_batch_instead_of_an_empty_one() -> None:
    rank0, rank1 = shards(9, 2, 4)  # shards of 5 and 4: [4, 1] and [2, 2]
    assert [len(b) for b in rank0] == [4, 1] and [len(b) for b in rank1] == [2, 2]
    with pytest.raises(UserError, match="batch_size 1"):
        shards(3, 2, 1)


def test_ddp_drop_last_gives_full_equal_batches() -> None:
    per_rank = shards(23, 3, 3, shuffle=True, drop_last=True)
    assert [len(r) for r in per_rank] == [2, 2, 2] and all(len(b) == 3 for r in per_rank for b in r)
    seen = torch.cat([torch.cat(r) for r in per_rank]).tolist()
    assert len(set(seen)) == 18


def test_ddp_eval_shards_are_interleaved_without_padding() -> None:
    per_rank = shards(11, 2, 4, even_batches=False)
    assert torch.cat(per_rank[0]).tolist() == [0, 2, 4, 6, 8, 10]
    assert torch.cat(per_rank[1]).tolist() == [1, 3, 5, 7, 9]


def test_set_epoch_reshuffles_deterministically() -> None:
    def order(epoch: int, seed: int = 0) -> list[int]:
        loader = InMemoryLoader(torch.zeros(50, 1), torch.arange(50), 8, shuffle=True, seed=seed)
        it = iter(loader)  # Lightning calls iter() before set_epoch(): the order must follow set_epoch
        loader.sampler.set_epoch(epoch)
        return torch.cat([b[1] for b in it]).tolist()

    assert order(3) == order(3) and sorted(order(3)) == list(range(50))
    assert order(3) != order(4) and order(3) != order(3, seed=1)


def test_loader_state_dict_resumes_mid_epoch() -> None:
    def loader() -> InMemoryLoader:
        return InMemoryLoader(torch.zeros(40, 1), torch.arange(40), 6, shuffle=True, seed=5)

    first = loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it)[1] for _ in range(3)]
    state = first.state_dict()
    rest = [b[1] for b in it]
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [b[1].tolist() for b in resumed] == [b.tolist() for b in rest]
    assert len(seen) + len(rest) == len(first) == 7
    assert len(list(resumed)) == 7  # the skip applies to one epoch only
