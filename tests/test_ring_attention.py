"""Zigzag sharding, ring and all-gather attention against full causal attention on one process.

Every rank builds the same global tensors from a seed, keeps its zigzag part, runs the
context-parallel attention (both methods) forward and backward, and returns its local
output and grads. The test unshards them and compares with causal SDPA on the full
sequence (fp64 reference). Two spawns cover everything: 4 ranks (cp=4 on the world
group, cp=2 on strided subgroups, cp=1 on singleton groups) and 3 ranks (cp=3, bf16).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_harness import run_on_ranks

from core.attention_stats import AttentionStats
from core.context_parallel import CP_METHODS
from core.zigzag import zigzag_chunk_ids, zigzag_positions, zigzag_shard, zigzag_unshard

# (batch, n_heads, n_kv_heads, chunk length, head_dim): odd head counts, GQA 3/1 and 6/2, MHA
CASES = [(2, 3, 1, 3, 8), (1, 6, 2, 2, 4), (1, 5, 5, 1, 4), (2, 1, 1, 3, 6)]
# bf16: long enough (96 tokens at cp=3) that a wrong block or merge moves outputs by far more than bf16 noise
BF16_CASE = (1, 4, 2, 16, 16)
METHODS = list(CP_METHODS)


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


def _run_local(method, case, group, dtype, seed, stats=None):
    """On one rank: shard the global inputs, attend by ``method``, return (out, dq, dk, dv) local parts."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dout = (zigzag_shard(t, 2, rank, cp) for t in _global_inputs(case, cp, dtype, seed))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = CP_METHODS[method](q, k, v, group, stats=stats)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _ranks_four():
    """4 ranks: cp=4 on WORLD, cp=2 on groups {0,2},{1,3}, cp=1 on each rank alone."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    singles = [dist.new_group([r]) for r in range(4)]
    groups = {4: dist.group.WORLD, 2: pairs[rank % 2], 1: singles[rank]}
    results = {}
    for method in CP_METHODS:
        for cp, group in groups.items():
            for i, case in enumerate(CASES):
                for dtype in (torch.float64, torch.float32):
                    results[(method, cp, i, dtype)] = _run_local(method, case, group, dtype, seed=100 * cp + i)
    for method in CP_METHODS:  # work balance: count query-key pairs per rank for one cp=4 call
        stats = AttentionStats()
        _run_local(method, CASES[0], dist.group.WORLD, torch.float32, seed=0, stats=stats)
        results[(method, "score_elems")] = stats.score_elems
    return results


def _ranks_three():
    """3 ranks: cp=3 in fp64/fp32 for every case, and one bf16 forward+backward, by both methods."""
    results = {}
    for method in CP_METHODS:
        for i, case in enumerate(CASES):
            for dtype in (torch.float64, torch.float32):
                results[(method, 3, i, dtype)] = _run_local(method, case, dist.group.WORLD, dtype, seed=300 + i)
        results[(method, "bf16")] = _run_local(method, BF16_CASE, dist.group.WORLD, torch.bfloat16, seed=7)
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
@pytest.mark.parametrize("method", METHODS)
def test_matches_full_attention_even_cp(four_ranks, method, cp, case_index, dtype):
    # cp=2 ran on groups {0,2} and {1,3}: check both; cp=1 ran on every rank alone.
    members = {4: [[0, 1, 2, 3]], 2: [[0, 2], [1, 3]], 1: [[r] for r in range(4)]}[cp]
    for ranks in members:
        per_rank = [four_ranks[r][(method, cp, case_index, dtype)] for r in ranks]
        _check_against_reference(per_rank, cp, case_index, dtype, seed=100 * cp + case_index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_index", range(len(CASES)))
@pytest.mark.parametrize("method", METHODS)
def test_matches_full_attention_cp3(three_ranks, method, case_index, dtype):
    per_rank = [r[(method, 3, case_index, dtype)] for r in three_ranks]
    _check_against_reference(per_rank, 3, case_index, dtype, seed=300 + case_index)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_stays_bf16_and_close_to_fp64(three_ranks, method):
    """bf16 inputs run the kernel in bf16 (outputs are bf16) and merge in fp32: errors stay at bf16 rounding."""
    expected = _reference(*_global_inputs(BF16_CASE, 3, torch.bfloat16, seed=7))
    for j, name in enumerate(("out", "dq", "dk", "dv")):
        got = zigzag_unshard([r[(method, "bf16")][j] for r in three_ranks], dim=2)
        assert got.dtype == torch.bfloat16, name
        scale = expected[j].abs().max().item()
        # 2e-2 of the largest value: a few bf16 ulps (2^-8) of accumulated rounding, far below
        # the O(1) relative error of a dropped, doubled or unmerged block
        torch.testing.assert_close(got.double(), expected[j], atol=2e-2 * scale, rtol=0, msg=name)


def test_zigzag_balances_ring_work(four_ranks):
    # Zigzag balance: every rank hands the kernels the same number of query-key pairs
    # (forward plus backward), and the later ring steps really compute only half a block.
    counts = [r[("ring", "score_elems")] for r in four_ranks]
    assert len(set(counts)) == 1, counts
    b, h, hkv, chunk, d = CASES[0]
    cp = 4
    # step 0: (2c)^2 pairs; each later step: half a block, c * 2c pairs; twice (fwd + bwd).
    assert counts[0] == 2 * ((2 * chunk) ** 2 + (cp - 1) * chunk * 2 * chunk)


def test_zigzag_balances_allgather_work(four_ranks):
    # Chunk i attends to (i + 1) chunks; rank r holds chunks r and 2cp-1-r: 2cp + 1 chunks'
    # worth of keys on every rank (c^2 pairs each), forward plus backward.
    counts = [r[("allgather", "score_elems")] for r in four_ranks]
    assert len(set(counts)) == 1, counts
    chunk, cp = CASES[0][3], 4
    assert counts[0] == 2 * (2 * cp + 1) * chunk ** 2


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
@pytest.mark.parametrize("method", METHODS)
def test_rejects_bad_shapes_before_communicating(method, shapes, match):
    # No process group exists in this process: reaching any collective would raise a
    # different error, so a ValueError proves the check comes first.
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        CP_METHODS[method](q, k, v, group=None)
