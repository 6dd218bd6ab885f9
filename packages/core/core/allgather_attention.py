"""Context parallelism, all-gather variant: gather K/V once per layer, attend local queries.

The ring (``core.ring_attention``) sends ``cp - 1`` K/V blocks one hop at a time,
overlapping each with a block of compute; its memory stays O(S / cp). This variant
issues a single all-gather of K/V over the cp group instead (the
approach of Llama 3's training), so latency is one collective rather than ``cp - 1``
dependent hops. It pays with memory: one layer's whole-sequence K/V (only
``n_kv_heads`` heads, so small under GQA) lives during that layer's forward and again
during its backward. Neither variant ever builds an ``[s, s]`` score tensor.

Each rank holds zigzag chunks ``r`` and ``2cp-1-r`` (``core.zigzag``). A local chunk
with global index ``c`` attends to

  * itself, causally: a square diagonal block that needs only the local K/V, so it is
    computed while the all-gather is still in flight, and
  * every key before it, unmasked: global rows ``[0, c * chunk)`` of the gathered K/V,

and the two partial results are merged by their log-sum-exp (``merge_block``). The
backward gathers K/V again (nothing O(S) is kept between forward and backward),
runs the same blocks' fused backward with the final output and lse, and returns each
rank's share of the gathered dK/dV with one reduce-scatter (a sum).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .attention_kernels import (
    AttentionSetup,
    block_backward,
    block_forward,
    merge_block,
    merge_dtype,
    prepare_attention,
    seq_rows,
)
from .attention_stats import AttentionStats, count_work, maybe_timed
from .zigzag import zigzag_chunk_ids

__all__ = ["allgather_attention"]

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases (CUDA wheels
# such as 2.11) only have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _chunk_owner(chunk_id: int, size: int) -> tuple[int, int]:
    """(rank, half) holding global chunk ``chunk_id``: rank r holds chunk r first, chunk 2cp-1-r second."""
    return (chunk_id, 0) if chunk_id < size else (2 * size - 1 - chunk_id, 1)


def _global_order(gathered: Tensor, size: int) -> Tensor:
    """[cp, 2, b, h_kv, 2c, d] gathered in rank order -> [2, b, h_kv, 2*cp*c, d] in sequence order."""
    halves = gathered.chunk(2, dim=-2)
    return torch.cat([halves[half][rank] for rank, half in (_chunk_owner(i, size) for i in range(2 * size))], dim=-2)


class _GatherKV:
    """All-gather of this rank's stacked K/V over the cp group, asynchronous until :meth:`wait`."""

    def __init__(self, k: Tensor, v: Tensor, group, stats: AttentionStats | None):
        self.size, self.stats, self.device = dist.get_world_size(group), stats, k.device
        local = torch.stack([k, v])  # [2, b, h_kv, s_local, d]
        if self.size == 1:  # one rank: its zigzag part is chunks 0 and 1, already in order
            self.work, self.gathered = None, local.unsqueeze(0)
            return
        # flat buffers: gloo wants the output to be the inputs concatenated along dim 0
        self.gathered = local.new_empty((self.size, *local.shape))
        self.work = _all_gather(self.gathered.view(-1), local.view(-1), group=group, async_op=True)
        if stats is not None:
            stats.bytes_sent += local.numel() * local.element_size() * (self.size - 1)

    def wait(self) -> Tensor:
        """The whole sequence's K/V: [2, b, h_kv, S, d] in sequence order (the rank-order buffer is let go)."""
        with maybe_timed(self.stats, "wait_s", self.device):
            if self.work is not None:
                self.work.wait()
        ordered, self.gathered = _global_order(self.gathered, self.size), None
        return ordered


def _add_past_grads(dkv_by_rank: Tensor, dk: Tensor, dv: Tensor, n_chunks: int, chunk: int) -> None:
    """Add dK/dV of the first ``n_chunks`` global chunks ([b, h_kv, n_chunks*c, d]) at their owners' rows.

    ``dkv_by_rank`` [cp, 2, b, h_kv, 2c, d] is laid out as the reduce-scatter hands it out.
    """
    size = dkv_by_rank.size(0)
    for chunk_id in range(n_chunks):
        rank, half = _chunk_owner(chunk_id, size)
        source, target = slice(chunk_id * chunk, (chunk_id + 1) * chunk), slice(half * chunk, (half + 1) * chunk)
        seq_rows(dkv_by_rank[rank, 0], target).add_(seq_rows(dk, source))
        seq_rows(dkv_by_rank[rank, 1], target).add_(seq_rows(dv, source))


def _reduce_scatter_dkv(dkv_by_rank: Tensor, group, stats: AttentionStats | None) -> Tensor:
    """Sum every rank's [cp, 2, b, h_kv, 2c, d] dK/dV contributions; return this rank's [2, b, h_kv, 2c, d]."""
    size = dist.get_world_size(group)
    if size == 1:
        return dkv_by_rank[0]
    mine = torch.empty_like(dkv_by_rank[0])
    with maybe_timed(stats, "wait_s", dkv_by_rank.device):
        _reduce_scatter(mine.view(-1), dkv_by_rank.view(-1), op=dist.ReduceOp.SUM, group=group)
    if stats is not None:
        stats.bytes_sent += mine.numel() * mine.element_size() * (size - 1)
    return mine


def _local_chunks(rank: int, size: int, chunk: int) -> list[tuple[slice, int]]:
    """(local rows, global chunk index) of this rank's two zigzag chunks."""
    return [(slice(i * chunk, (i + 1) * chunk), chunk_id) for i, chunk_id in enumerate(zigzag_chunk_ids(rank, size))]


def _block_ids(setup: AttentionSetup, chunk_id: int, chunk: int, keys: slice) -> tuple[Tensor, Tensor] | None:
    """Document ids of global chunk ``chunk_id``'s queries and of the keys at global rows ``keys``, or None."""
    if setup.document_ids is None:
        return None
    ids = setup.document_ids
    return ids[:, chunk_id * chunk:(chunk_id + 1) * chunk], ids[:, keys]


class _AllGatherAttention(torch.autograd.Function):
    """Causal attention of local zigzag queries over all-gathered K/V."""

    @staticmethod
    def forward(ctx, q, k, v, setup: AttentionSetup):
        group, stats = setup.group, setup.stats
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        chunk = q.size(2) // 2
        gather = _GatherKV(k, v, group, stats)
        acc = merge_dtype(q.dtype)
        out = torch.empty(q.shape, dtype=acc, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
        with maybe_timed(stats, "compute_s", q.device):  # overlaps the all-gather
            for rows, chunk_id in _local_chunks(rank, size, chunk):
                diagonal = slice(chunk_id * chunk, (chunk_id + 1) * chunk)
                block_out, block_lse = block_forward(setup, seq_rows(q, rows), seq_rows(k, rows), seq_rows(v, rows),
                                                     True, _block_ids(setup, chunk_id, chunk, diagonal))
                seq_rows(out, rows).copy_(block_out)
                seq_rows(lse, rows).copy_(block_lse)
                count_work(stats, chunk, chunk)
        k_all, v_all = gather.wait()
        with maybe_timed(stats, "compute_s", q.device):
            for rows, chunk_id in _local_chunks(rank, size, chunk):
                if chunk_id == 0:
                    continue  # the first chunk of the sequence has no past
                past = slice(0, chunk_id * chunk)
                block_out, block_lse = block_forward(setup, seq_rows(q, rows), seq_rows(k_all, past),
                                                     seq_rows(v_all, past), False,
                                                     _block_ids(setup, chunk_id, chunk, past))
                merge_block(seq_rows(out, rows), seq_rows(lse, rows), block_out, block_lse)
                count_work(stats, chunk, chunk_id * chunk)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, stats = ctx.setup.group, ctx.setup.stats
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        acc, chunk = merge_dtype(q.dtype), q.size(2) // 2
        dout = dout.contiguous()
        gather = _GatherKV(k, v, group, stats)  # again: the forward kept only the local K/V
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        # every rank's share of every rank's dK/dV, laid out for the reduce-scatter
        dkv_by_rank = torch.zeros((size, 2, *k.shape), dtype=acc, device=k.device)
        with maybe_timed(stats, "compute_s", q.device):  # diagonal blocks overlap the all-gather
            for rows, chunk_id in _local_chunks(rank, size, chunk):
                diagonal = slice(chunk_id * chunk, (chunk_id + 1) * chunk)
                dq_blk, dk_blk, dv_blk = block_backward(ctx.setup, seq_rows(dout, rows), seq_rows(q, rows),
                                                        seq_rows(k, rows), seq_rows(v, rows), seq_rows(out, rows),
                                                        seq_rows(lse, rows), True,
                                                        _block_ids(ctx.setup, chunk_id, chunk, diagonal))
                seq_rows(dq, rows).copy_(dq_blk)
                seq_rows(dkv_by_rank[rank, 0], rows).add_(dk_blk)
                seq_rows(dkv_by_rank[rank, 1], rows).add_(dv_blk)
                count_work(stats, chunk, chunk)
        k_all, v_all = gather.wait()
        with maybe_timed(stats, "compute_s", q.device):
            for rows, chunk_id in _local_chunks(rank, size, chunk):
                if chunk_id == 0:
                    continue
                past = slice(0, chunk_id * chunk)
                dq_blk, dk_blk, dv_blk = block_backward(ctx.setup, seq_rows(dout, rows), seq_rows(q, rows),
                                                        seq_rows(k_all, past), seq_rows(v_all, past),
                                                        seq_rows(out, rows), seq_rows(lse, rows), False,
                                                        _block_ids(ctx.setup, chunk_id, chunk, past))
                seq_rows(dq, rows).add_(dq_blk)
                _add_past_grads(dkv_by_rank, dk_blk, dv_blk, chunk_id, chunk)
                count_work(stats, chunk, chunk_id * chunk)
        del k_all, v_all, dq_blk, dk_blk, dv_blk
        dk, dv = _reduce_scatter_dkv(dkv_by_rank, group, stats)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None,
                        scale: float | None = None, stats: AttentionStats | None = None,
                        document_ids: Tensor | None = None) -> Tensor:
    """Causal attention over the global sequence from zigzag parts, by all-gathering K/V.

    Same contract as :func:`core.ring_attention.ring_attention`: q ``[b, h, s_local, d]``,
    k/v ``[b, h_kv, s_local, d]`` zigzag-sharded over ``group``; returns ``[b, h, s_local, d]``
    in q's dtype, merged in fp32 (fp64 for fp64).

    Collectives: forward one all-gather of K/V; backward one more, then one
    reduce-scatter (sum) of dK/dV in fp32. None for a group of one rank. ``document_ids`` as
    for ring attention.
    """
    return _AllGatherAttention.apply(q, k, v, prepare_attention(q, k, v, group, scale, stats, document_ids))
