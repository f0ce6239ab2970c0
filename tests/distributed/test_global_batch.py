"""GlobalBatch and Shard in one process, and the checks of their options at the public
boundary. (Their collectives are exercised by test_natural_gradient_ddp.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature import fisher, get_likelihood
from natgrad.distributed import GlobalBatch, Shard, mean_over_processes, true_everywhere
from natgrad.optim import NaturalGradient


@given(st.lists(st.integers(0, 50), min_size=1, max_size=6).filter(lambda s: sum(s) > 0))
def test_the_rows_of_the_shards_tile_the_global_batch_in_rank_order(shares: list[int]) -> None:
    covered = []
    for index in range(len(shares)):
        shard = Shard(None, tuple(shares), index)
        assert shard.count == shares[index]
        assert shard.total == sum(shares)
        covered.extend(range(shard.total)[shard.rows])
    assert covered == list(range(sum(shares)))


def test_in_one_process_a_shard_is_the_whole_batch_and_changes_nothing() -> None:
    shard = GlobalBatch().shard(5)
    assert shard == Shard.whole(5)
    assert not shard.sharded
    tensor = torch.randn(5, 3)
    kept = tensor.clone()
    shard.sum_([tensor])
    shard.mean_([tensor])
    assert torch.equal(tensor, kept)
    assert shard.gather(tensor) is tensor
    assert shard.all(False) is False and shard.all(True) is True
    likelihood = get_likelihood("poisson")
    assert shard.sampling(likelihood) is likelihood
    loss = torch.tensor(2.5)
    assert mean_over_processes([loss])[0] is loss
    assert true_everywhere(False) is False


def test_a_negative_or_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        GlobalBatch().shard(-1)
    with pytest.raises(ValueError, match="no samples"):
        GlobalBatch().shard(0)


def test_fisher_refuses_a_global_batch_of_another_type() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"global_batch must be .* got str"):
        fisher(model, torch.randn(4, 3), global_batch="world")


def test_natural_gradient_refuses_a_process_group_of_another_type() -> None:
    with pytest.raises(TypeError, match=r"process_group must be .* got int"):
        NaturalGradient(nn.Linear(3, 2), "categorical", process_group=0)
