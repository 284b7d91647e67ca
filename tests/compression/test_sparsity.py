"""The magnitude-pruning schedule (cubic sparsity, pruning points) and the masks it computes."""

import pytest
import torch

from project.compression.sparsity import compute_masks, cubic_sparsity, schedule_points

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cubic_schedule_values():
    assert schedule_points(2, 8, 2) == [2, 4, 6, 8]
    assert schedule_points(0, 5, 2) == [0, 2, 4, 5]
    assert schedule_points(3, 3, 1) == [3]
    assert cubic_sparsity(2, 2, 8, 0.8, 0.1) == pytest.approx(0.1)
    assert cubic_sparsity(5, 2, 8, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(8, 2, 8, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(20, 2, 8, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(1, 2, 8, 0.8) == 0.0
    assert cubic_sparsity(4, 4, 4, 0.9) == 0.9  # one-shot
    values = [cubic_sparsity(t, 0, 10, 0.9) for t in range(11)]
    assert values == sorted(values)


def test_global_masks_rank_all_layers_together_and_only_grow():
    big = torch.linspace(1, 2, 100)  # large weights
    small = torch.linspace(0.01, 0.1, 10)  # all smaller than any of big
    masks = compute_masks({"a": big, "b": small}, 0.1, "global")
    # One threshold: the 11 smallest of the 110 are all 10 of b and the smallest of a.
    assert not masks["b"].any() and int((~masks["a"]).sum()) == 1 and not masks["a"][0]
    masks = compute_masks({"a": big, "b": small}, 0.1, "layer")
    assert int((~masks["a"]).sum()) == 10 and int((~masks["b"]).sum()) == 1
    # A weight pruned before stays pruned even if it has grown since (ranked below everything).
    prev = {"a": torch.ones(100, dtype=torch.bool), "b": torch.ones(10, dtype=torch.bool)}
    prev["a"][-1] = False
    again = compute_masks({"a": big, "b": small}, 0.05, "global", prev)
    assert not again["a"][-1]
