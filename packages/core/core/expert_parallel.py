"""Expert parallelism: move each token to the rank that holds its expert, and back.

The experts of an MoE layer are split over the ``ep`` ranks: with E experts and ep
ranks, rank r holds experts ``[r*E/ep, (r+1)*E/ep)``. Every rank routes its own tokens
(for dense layers ep is just more data parallelism), so a token's chosen expert usually
lives elsewhere. One MoE layer then runs:

    route          each token picks top_k experts                      [T, k] expert ids
    permute        copy each (token, choice) pair, sort by expert id   [T*k, dim]
    count exchange all_to_all_single of per-expert counts             who sends how many to whom
    dispatch       all_to_all_single with uneven splits                rows for my experts, [N, dim]
    regroup        order received rows by local expert                (they arrive by source rank)
    experts        grouped-GEMM SwiGLU over the local experts           [N, dim]
    ungroup        back to source-rank order
    combine        the reverse all_to_all_single                       [T*k, dim] in permuted order
    unpermute      back to (token, choice) order, weight, sum over k   [T, dim]

Dropless: every routed pair is computed, however skewed the routing; buffers are sized
by the exchanged counts, never by a capacity factor. Both all-to-alls are differentiable
(PyTorch's functional ``all_to_all_single_autograd``: the backward is the same exchange
with the split sizes swapped), so gradients reach the router and the tokens' ranks.

Everything here works on plain local tensors and any ProcessGroup (gloo or NCCL); with
``group=None`` (one process, or ep=1) it runs the same permutation without communication
and without reading anything on the host. With ep > 1 the split sizes are read once per
layer (``dispatch``); the backward reuses them. ``assume_balanced=True`` takes them as an
even split instead, without reading the counts: for a dry run on fake tensors, which have no
values to read (what every rank would send if routing were perfectly balanced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

__all__ = ["Dispatch", "permute_by_expert", "exchange_counts", "even_splits", "dispatch", "combine",
           "expert_parallel_ffn"]


@dataclass
class Dispatch:
    """What ``combine`` needs to undo ``dispatch``.

    ``order``: [T*k] the (token, choice) pairs sorted by expert (``flat[order]`` is the sorted list).
    ``regroup``: [N] received rows ordered by local expert (None when nothing was exchanged).
    ``send_splits`` / ``recv_splits``: rows sent to / received from each ep rank.
    ``tokens_per_local_expert``: [E/ep] int64, rows each local expert gets.
    """

    order: Tensor
    regroup: Tensor | None
    send_splits: list[int]
    recv_splits: list[int]
    tokens_per_local_expert: Tensor


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def permute_by_expert(x: Tensor, expert_ids: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Copy each token once per chosen expert and sort the copies by expert id.

    x: [T, dim]; expert_ids: [T, k] int64 in [0, n_experts).
    Returns (rows [T*k, dim], order [T*k], counts [n_experts] int64): ``rows[i]`` is token
    ``order[i] // k``, and the rows for expert e are the ``counts[e]`` rows after those
    of experts < e. A stable sort keeps tokens in order within an expert, so the result
    does not depend on the sort implementation. No communication.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add_, not bincount: its output size does not depend on the values (fake tensors too)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return x[order // expert_ids.shape[1]], order, counts


def exchange_counts(counts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Tell every ep rank how many rows it will receive from us, per local expert.

    counts: [E] int64, our rows per (global) expert. Returns [ep, E/ep]: row s holds the
    counts that rank s sends to our local experts. Collective: one ``all_to_all_single``
    of E integers over ``group`` (each rank sends the E/ep counts of the destination's experts).
    """
    ep = _size(group)
    if ep == 1:
        return counts.view(1, -1)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    return received.view(ep, -1)


def _exchange(rows: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all: send ``in_splits[r]`` rows to rank r, receive ``out_splits[r]``."""
    out = funcol.all_to_all_single_autograd(rows, out_splits, in_splits, group)
    return funcol.wait_tensor(out)


def even_splits(rows: int, ranks: int) -> list[int]:
    """``rows`` cut into ``ranks`` near-equal parts (the first ``rows % ranks`` one larger)."""
    return [rows // ranks + (r < rows % ranks) for r in range(ranks)]


def dispatch(x: Tensor, expert_ids: Tensor, n_experts: int, group: dist.ProcessGroup | None,
             assume_balanced: bool = False) -> tuple[Tensor, Dispatch]:
    """Send every (token, choice) pair to the rank holding its expert.

    x: [T, dim]; expert_ids: [T, k]. Returns (rows [N, dim], plan): the N rows this rank's
    E/ep local experts must process, grouped by local expert (``plan.tokens_per_local_expert``
    rows each, in expert order). Collectives over ``group`` (the ep group): one
    ``all_to_all_single`` of counts, one of the rows (backward: the reverse exchange).
    ``assume_balanced``: send and receive an even share with every rank (see the module docstring).
    """
    ep = _size(group)
    if n_experts % ep:
        raise ValueError(f"{n_experts} experts cannot be split evenly over ep={ep} ranks")
    rows, order, counts = permute_by_expert(x, expert_ids, n_experts)
    if ep == 1:
        return rows, Dispatch(order, None, [rows.shape[0]], [rows.shape[0]], counts)
    received_counts = exchange_counts(counts, group)                  # [ep, E/ep]
    # The one host sync of an MoE layer: all_to_all_single takes its split sizes as Python
    # ints (the receive buffer is allocated by them). Both lists come back in one read.
    if assume_balanced:
        send_splits = recv_splits = even_splits(rows.shape[0], ep)
    else:
        splits = torch.cat([counts.view(ep, -1).sum(1), received_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]           # rows to / from each rank
    received = _exchange(rows, recv_splits, send_splits, group)
    # Received rows are ordered (source rank, local expert); the experts want them
    # contiguous per expert: a stable sort by local expert id, keeping source order inside.
    local_experts = received_counts.shape[1]
    segment_expert = torch.arange(received_counts.numel(), device=x.device) % local_experts
    row_expert = torch.repeat_interleave(segment_expert, received_counts.reshape(-1),
                                         output_size=sum(recv_splits))  # sized on the host: no second sync
    regroup = torch.argsort(row_expert, stable=True)
    plan = Dispatch(order, regroup, send_splits, recv_splits, received_counts.sum(0))
    return received[regroup], plan


def combine(expert_out: Tensor, plan: Dispatch, weights: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Return expert outputs to their tokens' ranks and mix them: the inverse of ``dispatch``.

    expert_out: [N, dim] in the order ``dispatch`` returned; weights: [T, k] routing weights.
    Returns [T, dim] = sum over the k choices of weight * expert output. Collective: one
    ``all_to_all_single`` over ``group`` (none when ep == 1); backward: the reverse exchange.
    """
    if plan.regroup is not None:
        rows = expert_out[torch.argsort(plan.regroup)]                # back to (source rank, expert) order
        rows = _exchange(rows, plan.send_splits, plan.recv_splits, group)
    else:
        rows = expert_out
    pairs = rows[torch.argsort(plan.order)]                           # back to (token, choice) order
    t, k = weights.shape
    mixed = pairs.view(t, k, pairs.shape[-1]) * weights.unsqueeze(-1).to(pairs.dtype)
    return mixed.sum(dim=1)


def expert_parallel_ffn(x: Tensor, expert_ids: Tensor, weights: Tensor, n_experts: int,
                        local_experts: Callable[[Tensor, Tensor], Tensor],
                        group: dist.ProcessGroup | None, assume_balanced: bool = False) -> tuple[Tensor, Tensor]:
    """dispatch -> ``local_experts(rows, tokens_per_local_expert)`` -> combine.

    x: [T, dim]; expert_ids, weights: [T, k]. Returns ([T, dim] output,
    [E/ep] tokens each local expert processed). Collectives: those of dispatch and combine.
    """
    rows, plan = dispatch(x, expert_ids, n_experts, group, assume_balanced)
    out = local_experts(rows, plan.tokens_per_local_expert)
    return combine(out, plan, weights, group), plan.tokens_per_local_expert
