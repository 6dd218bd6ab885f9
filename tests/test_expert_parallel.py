"""Expert-parallel token dispatch/combine and the MoE layer's mesh-invariant load balancing.

The reference for every multi-rank check is the same computation done in one process
with no exchange: y = sum over the k choices of weight * expert(x).
"""

import pytest
import torch
from rank_harness import run_on_ranks

from core.expert_parallel import combine, dispatch, permute_by_expert

DIM, N_EXPERTS = 4, 8


def scaled_experts(rank: int, local_experts: int):
    """A fake expert bank: global expert g multiplies its rows by (g + 1), so a row sent to the wrong expert shows."""
    def run(rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        first = rank * local_experts
        scale = torch.repeat_interleave(torch.arange(first, first + local_experts, dtype=rows.dtype) + 1,
                                        tokens_per_expert)
        return rows * scale[:, None]
    return run


def reference(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * (expert_ids[t, k] + 1) * x[t], no permutation, no exchange."""
    return ((expert_ids + 1).to(x.dtype) * weights).sum(1, keepdim=True) * x


def make_tokens(rank: int, n_tokens: int, top_k: int, routing: str):
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n_tokens, DIM, generator=generator)
    if routing == "random":
        expert_ids = torch.rand(n_tokens, N_EXPERTS, generator=generator).argsort(-1)[:, :top_k]  # k distinct
    elif routing == "all-to-expert-0":   # one expert gets everything; every other expert (and ep rank) gets nothing
        expert_ids = torch.zeros(n_tokens, top_k, dtype=torch.long)
    else:
        raise ValueError(routing)
    weights = torch.rand(n_tokens, top_k, generator=generator)
    return x.reshape(n_tokens, DIM), expert_ids.reshape(n_tokens, top_k), weights


def round_trip(n_tokens_per_rank: list[int], top_k: int, routing: str) -> dict:
    """On each rank: dispatch, run the fake experts, combine, backward; compare with the local reference."""
    import torch.distributed as dist

    rank, ep = dist.get_rank(), dist.get_world_size()
    x, expert_ids, weights = make_tokens(rank, n_tokens_per_rank[rank], top_k, routing)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    rows, plan = dispatch(x, expert_ids, N_EXPERTS, dist.group.WORLD)
    out = combine(scaled_experts(rank, N_EXPERTS // ep)(rows, plan.tokens_per_local_expert), plan, weights,
                  dist.group.WORLD)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank))
    (out * upstream).sum().backward()

    ref_x, ref_w = x.detach().clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
    ref = reference(ref_x, expert_ids, ref_w)
    (ref * upstream).sum().backward()
    return {"out": (out.detach(), ref.detach()), "x_grad": (x.grad, ref_x.grad), "w_grad": (weights.grad, ref_w.grad),
            "received": plan.tokens_per_local_expert}


def test_permute_sorts_by_expert_and_counts():
    x = torch.arange(6.0).view(3, 2)
    expert_ids = torch.tensor([[2, 0], [0, 1], [2, 2]])
    rows, order, counts = permute_by_expert(x, expert_ids, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    # (token, choice) pairs sorted by expert, stable: expert 0 <- tokens 0, 1; 1 <- token 1; 2 <- tokens 0, 2, 2
    assert (order // 2).tolist() == [0, 1, 1, 0, 2, 2]
    torch.testing.assert_close(rows, x[[0, 1, 1, 0, 2, 2]])


def test_single_process_dispatch_combine_is_exact():
    x, expert_ids, weights = make_tokens(0, 10, 2, "random")
    rows, plan = dispatch(x, expert_ids, N_EXPERTS, None)
    out = combine(scaled_experts(0, N_EXPERTS)(rows, plan.tokens_per_local_expert), plan, weights, None)
    torch.testing.assert_close(out, reference(x, expert_ids, weights))


@pytest.mark.parametrize("ep, tokens, top_k, routing", [
    (2, [7, 5], 2, "random"),                # uneven tokens per rank
    (4, [6, 3, 5, 4], 3, "random"),
    (2, [6, 0], 2, "random"),                # a rank with no tokens at all
    (2, [5, 4], 2, "all-to-expert-0"),      # skew: rank 1 and experts 1..7 receive nothing
])
def test_dispatch_combine_round_trip_and_gradients(ep, tokens, top_k, routing):
    results = run_on_ranks(round_trip, ep, tokens, top_k, routing)
    for rank, result in enumerate(results):
        for key in ("out", "x_grad", "w_grad"):
            got, want = result[key]
            torch.testing.assert_close(got, want, msg=lambda m, k=key, r=rank: f"rank {r} {k}: {m}")
    # Each rank's experts received exactly the pairs routed to them from all ranks: dropless.
    received = torch.cat([r["received"] for r in results])
    routed = sum(torch.bincount(make_tokens(r, n, top_k, routing)[1].reshape(-1), minlength=N_EXPERTS)
                 for r, n in enumerate(tokens))
    assert received.tolist() == routed.tolist()


def moe_layer_step(split: str = "batch", share_sequence_counts: bool = True) -> dict:
    """One forward/backward of a debug-moe layer on this rank's part of a fixed [4, 16] batch.

    ep = world size. ``split="batch"``: each rank holds whole sequences (dp/ep-like);
    ``"sequence"``: each rank holds a slice of every sequence (cp-like), and the sequence's
    expert counts are summed over the ranks unless ``share_sequence_counts`` is False
    (the bug the negative control plants).
    """
    import functools

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from core.expert_parallel import expert_parallel_ffn
    from models.init import init_weights
    from models.moe import MoE
    from models.moe.load import StepLoad
    from models.registry import get_config

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_config("debug-moe", aux_loss_coef=0.1)
    layer = MoE(cfg)
    group = dist.group.WORLD if world > 1 else None
    sequence_group = group if split == "sequence" and share_sequence_counts else None
    load = StepLoad([layer], cfg.n_experts, sequence_group, group, sequences_per_step=4, device=torch.device("cpu"))
    if world > 1:
        layer.experts.shard(init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
        layer.routed_ffn = functools.partial(expert_parallel_ffn, group=group)
    init_weights(layer, cfg.n_layers, seed=0)
    generator = torch.Generator().manual_seed(3)
    x, upstream = torch.randn(2, 4, 16, cfg.dim, generator=generator)
    part = (slice(rank * 4 // world, (rank + 1) * 4 // world), slice(None)) if split == "batch" else \
        (slice(None), slice(rank * 16 // world, (rank + 1) * 16 // world))
    (layer(x[part]) * upstream[part]).sum().backward()
    load.sum_over_ranks()
    return {"grads": {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                      for n, p in layer.named_parameters()},
            "load": load.totals[0, :-1].clone(), "aux": load.totals[0, -1].clone()}


def summed_dense_grads(results: list[dict]) -> dict:
    """Dense (non-expert) grads summed over ranks, as the trainer's data parallel would."""
    return {n: sum(r["grads"][n] for r in results) for n in results[0]["grads"] if not n.startswith("experts.")}


@pytest.mark.parametrize("split", ["batch", "sequence"])
def test_moe_layer_expert_parallel_matches_one_process(split):
    (single,) = run_on_ranks(moe_layer_step, 1)
    two = run_on_ranks(moe_layer_step, 2, split)
    assert single["aux"] > 0
    for r in two:  # the global load and aux loss are known to every rank
        torch.testing.assert_close(r["load"], single["load"])
        torch.testing.assert_close(r["aux"], single["aux"])
    for name, grad in summed_dense_grads(two).items():
        torch.testing.assert_close(grad, single["grads"][name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("experts.w1", "experts.w2", "experts.w3"):  # complete on the rank that owns each expert
        torch.testing.assert_close(two[0]["grads"][name], single["grads"][name], rtol=1e-4, atol=1e-6)


def test_unshared_sequence_statistics_are_detected():
    """Negative control: under a cp-like split, per-rank (not per-sequence) counts give other router gradients."""
    (single,) = run_on_ranks(moe_layer_step, 1)
    wrong = summed_dense_grads(run_on_ranks(moe_layer_step, 2, "sequence", False))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong["router.gate.weight"], single["grads"]["router.gate.weight"],
                                   rtol=1e-4, atol=1e-6)
