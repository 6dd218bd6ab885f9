"""Zigzag sharding and ring attention against full causal attention on one process.

Every rank builds the same global tensors from a seed, keeps its zigzag part, runs
ring_attention forward and backward, and returns its local output and grads. The test
unshards them and compares with causal SDPA on the full sequence (fp64 reference).
Two spawns cover everything: 4 ranks (cp=4 on the world group, cp=2 on strided
subgroups, cp=1 on singleton groups) and 3 ranks (cp=3, bf16).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.ring_attention import (
    STATS, ring_attention, zigzag_chunk_ids, zigzag_positions, zigzag_shard, zigzag_unshard,
)
from rank_harness import run_on_ranks

# (batch, n_heads, n_kv_heads, chunk length, head_dim): odd head counts, GQA 3/1 and 6/2, MHA
CASES = [(2, 3, 1, 3, 8), (1, 6, 2, 2, 4), (1, 5, 5, 1, 4), (2, 1, 1, 3, 6)]


def _global_inputs(case, cp, dtype, seed):
    """Full-sequence q, k, v and an upstream gradient, identical on every rank."""
    b, h, hkv, chunk, d = case
    seq = 2 * cp * chunk
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, h, seq, d), (b, hkv, seq, d), (b, hkv, seq, d), (b, h, seq, d)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _reference(q, k, v, dout):
    """Causal SDPA on the full sequence in fp64: output and grads of q, k, v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.size(1) // k.size(1)
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), is_causal=True)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _run_local(case, group, dtype, seed, backward=True):
    """On one rank: shard the global inputs, ring-attend, return (out, dq, dk, dv) local parts."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dout = (zigzag_shard(t, 2, rank, cp) for t in _global_inputs(case, cp, dtype, seed))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, group)
    if not backward:
        return (out.detach(),)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _ranks_four():
    """4 ranks: cp=4 on WORLD, cp=2 on groups {0,2},{1,3}, cp=1 on each rank alone."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    singles = [dist.new_group([r]) for r in range(4)]
    groups = {4: dist.group.WORLD, 2: pairs[rank % 2], 1: singles[rank]}
    results = {}
    for cp, group in groups.items():
        for i, case in enumerate(CASES):
            for dtype in (torch.float64, torch.float32):
                results[(cp, i, dtype)] = _run_local(case, group, dtype, seed=100 * cp + i)
    STATS.enabled = True  # work balance: count query-key pairs per rank for one cp=4 call
    _run_local(CASES[0], dist.group.WORLD, torch.float32, seed=0)
    STATS.enabled = False
    results["score_elems"] = STATS.score_elems
    return results


def _ranks_three():
    """3 ranks: cp=3 in fp64/fp32 for every case, and one bf16 forward+backward."""
    results = {}
    for i, case in enumerate(CASES):
        for dtype in (torch.float64, torch.float32):
            results[(3, i, dtype)] = _run_local(case, dist.group.WORLD, dtype, seed=300 + i)
    results["bf16"] = _run_local(CASES[1], dist.group.WORLD, torch.bfloat16, seed=7)
    return results


@pytest.fixture(scope="module")
def four_ranks():
    return run_on_ranks(_ranks_four, 4, timeout=120)


@pytest.fixture(scope="module")
def three_ranks():
    return run_on_ranks(_ranks_three, 3, timeout=120)


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _check_against_reference(per_rank, cp, case_index, dtype, seed):
    """Unshard every rank's (out, dq, dk, dv) and compare with the fp64 full-sequence reference."""
    inputs = _global_inputs(CASES[case_index], cp, dtype, seed)
    expected = _reference(*inputs)
    names = ("out", "dq", "dk", "dv")
    for j, name in enumerate(names):
        got = zigzag_unshard([r[j] for r in per_rank], dim=2)
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), expected[j], **TOL[dtype],
                                   msg=lambda m: f"cp={cp} case={CASES[case_index]} {dtype} {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_index", range(len(CASES)))
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_ring_matches_full_attention_even_cp(four_ranks, cp, case_index, dtype):
    # cp=2 ran on groups {0,2} and {1,3}: check both; cp=1 ran on every rank alone.
    members = {4: [[0, 1, 2, 3]], 2: [[0, 2], [1, 3]], 1: [[r] for r in range(4)]}[cp]
    for ranks in members:
        per_rank = [four_ranks[r][(cp, case_index, dtype)] for r in ranks]
        _check_against_reference(per_rank, cp, case_index, dtype, seed=100 * cp + case_index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_ring_matches_full_attention_cp3(three_ranks, case_index, dtype):
    per_rank = [r[(3, case_index, dtype)] for r in three_ranks]
    _check_against_reference(per_rank, 3, case_index, dtype, seed=300 + case_index)


def test_ring_bf16_close_to_fp64(three_ranks):
    inputs = _global_inputs(CASES[1], 3, torch.bfloat16, seed=7)
    expected = _reference(*inputs)
    for j, name in enumerate(("out", "dq", "dk", "dv")):
        got = zigzag_unshard([r["bf16"][j] for r in three_ranks], dim=2)
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.double(), expected[j], atol=3e-2, rtol=3e-2, msg=name)


def test_zigzag_balances_work(four_ranks):
    # Zigzag balance: every rank computes the same number of query-key pairs (forward plus
    # the backward recompute), and the later steps really compute only half a block.
    counts = [r["score_elems"] for r in four_ranks]
    assert len(set(counts)) == 1, counts
    b, h, hkv, chunk, d = CASES[0]
    cp = 4
    # step 0: (2c)^2 pairs; each later step: half a block, c * 2c pairs; twice (fwd + bwd).
    assert counts[0] == 2 * ((2 * chunk) ** 2 + (cp - 1) * chunk * 2 * chunk)


# --------------------------------------------------------------------------- zigzag helpers

def test_zigzag_chunk_ids():
    assert [zigzag_chunk_ids(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    with pytest.raises(ValueError):
        zigzag_chunk_ids(4, 4)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_shard_unshard_round_trip(cp):
    x = torch.randn(2, 3, 2 * cp * 5, 4)
    parts = [zigzag_shard(x, 2, r, cp) for r in range(cp)]
    assert all(p.shape == (2, 3, 10, 4) for p in parts)
    assert torch.equal(zigzag_unshard(parts, 2), x)
    # dim given negatively, and the parts really are disjoint chunk pairs
    parts_neg = [zigzag_shard(x, -2, r, cp) for r in range(cp)]
    assert all(torch.equal(a, b) for a, b in zip(parts, parts_neg))


def test_zigzag_positions_match_sharded_arange():
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 3):
        for r in range(cp):
            pos = zigzag_positions(6 * cp, r, cp)
            assert pos.dtype == torch.long and pos.shape == (6,)
            assert torch.equal(pos, zigzag_shard(torch.arange(6 * cp), 0, r, cp))
    all_pos = torch.cat([zigzag_positions(12, r, 3) for r in range(3)])
    assert sorted(all_pos.tolist()) == list(range(12))


def test_zigzag_shard_rejects_indivisible_length():
    with pytest.raises(ValueError, match=r"sequence length 10 .* 2\*cp = 4"):
        zigzag_shard(torch.zeros(1, 10), 1, 0, 2)


@pytest.mark.parametrize("shapes, match", [
    (((1, 3, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), "not divisible by n_kv_heads"),
    (((2, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), "batch size mismatch"),
    (((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8)), "local sequence mismatch"),
    (((1, 2, 4, 8), (1, 2, 4, 8), (1, 1, 4, 8)), "same shape"),
    (((1, 2, 4, 8), (1, 2, 4, 4), (1, 2, 4, 4)), "head_dim mismatch"),
    (((2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)), r"q must be \[batch"),
])
def test_ring_attention_rejects_bad_shapes_before_communicating(shapes, match):
    # No process group exists in this process: reaching any collective would raise a
    # different error, so a ValueError proves the check comes first.
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, v, group=None)
