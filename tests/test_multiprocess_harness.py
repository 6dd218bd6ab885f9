"""The harness itself: results come back per rank, and a failing rank fails the test fast."""

import pytest
import torch
import torch.distributed as dist
from rank_harness import run_on_ranks


def _all_reduce_rank() -> torch.Tensor:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t


def _rank1_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the harness's kill


def test_results_come_back_in_rank_order():
    results = run_on_ranks(_all_reduce_rank, 3)
    assert [r.item() for r in results] == [3.0, 3.0, 3.0]


def test_one_failing_rank_fails_fast_without_hanging():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_on_ranks(_rank1_raises, 2, timeout=120)
