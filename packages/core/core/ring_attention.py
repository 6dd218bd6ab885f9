"""Context parallelism: causal ring attention over zigzag shards, on fused kernels.

Every rank of the cp group keeps its queries (its two zigzag chunks, ``core.zigzag``)
and passes its key/value block around the ring (rank r sends to r+1, receives from
r-1). After ``cp - 1`` hops every query has seen every key. Each hop's block is one
fused attention call (``core.attention_kernels``) that returns its output and the
log-sum-exp (lse) of its scores; ``merge_block`` folds it into the running result, so
the softmax over the global sequence is exact. The next block is already in flight
while the current one is computed.

Which block a step computes. At step ``i > 0`` rank ``r`` holds the K/V of rank
``src = (r - i) mod cp``, whose chunks are ``src`` and ``2cp-1-src``:

* ``src < r``: chunk ``src`` lies before both local chunks, chunk ``2cp-1-src`` after
  both. All local queries attend to the *first half* of the remote K/V, unmasked.
* ``src > r``: both remote chunks lie after local chunk ``r`` and before local chunk
  ``2cp-1-r``. Only the *second half* of the local queries attends, to all remote K/V.

Either way a step costs half a block and needs no mask; only step 0 (the local block)
is causal, and there the local causal mask is the global one (chunk r precedes chunk
2cp-1-r). No ``[s, s]`` score tensor exists anywhere: per-rank memory is O(S / cp).

The backward pass is a ring too. Each block's fused backward gets the *final* output
and lse, so its dQ/dK/dV are exactly that block's share of the full gradient. dQ is
summed locally. The dK/dV accumulator of each K/V block travels one hop behind the
block, collects every rank's share, and a last hop brings it home to the owner.

Works on plain local tensors and any ProcessGroup (gloo or NCCL).
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
from .zigzag import zigzag_shard

__all__ = ["ring_attention"]

# gloo matches P2P messages by tag: K, V and their gradient accumulators each get their own
KV_TAGS, DKV_TAGS = (0, 1), (2, 3)


class _RingShift:
    """One in-flight ring hop: send ``tensors`` to rank+1, receive rank-1's into new buffers.

    Issues one ``dist.batch_isend_irecv`` with an isend and an irecv per tensor (K and V
    travel as they are: no copy into a joint buffer). Every rank of the group must create
    the same sequence of shifts (same tags, shapes, dtypes), else it hangs. The sent
    tensors must not be modified until :meth:`wait` returns.
    """

    def __init__(self, tensors: tuple[Tensor, ...], group, tags: tuple[int, ...], stats: AttentionStats | None):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.stats, self.device = stats, tensors[0].device
        if size == 1:  # the ring is this rank alone: the "next" block is our own
            self.works, self.received = [], tensors
            return
        self.received = tuple(torch.empty_like(t) for t in tensors)
        ops = []
        for sent, received, tag in zip(tensors, self.received, tags):
            ops += [dist.P2POp(dist.isend, sent, group=group, group_peer=(rank + 1) % size, tag=tag),
                    dist.P2POp(dist.irecv, received, group=group, group_peer=(rank - 1) % size, tag=tag)]
        self.works = dist.batch_isend_irecv(ops)
        if stats is not None:
            stats.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)

    def wait(self) -> tuple[Tensor, ...]:
        with maybe_timed(self.stats, "wait_s", self.device):
            for work in self.works:
                work.wait()
        return self.received


def _block_plan(step: int, rank: int, size: int, chunk: int) -> tuple[slice, slice, bool]:
    """(local query rows, rows of the held K/V, causal) for ring step ``step`` (module docstring)."""
    if step == 0:
        return slice(None), slice(None), True
    src = (rank - step) % size
    if src < rank:
        return slice(None), slice(0, chunk), False
    return slice(chunk, None), slice(None), False


def _block_ids(setup: AttentionSetup, step: int, rank: int, size: int, q_rows: slice,
               kv_rows: slice) -> tuple[Tensor, Tensor] | None:
    """Document ids of a step's queries and keys (document masking), or None.

    The keys at step ``i`` are rank ``(rank - i) mod size``'s zigzag part; every rank has the
    whole sequence's ids, so none travel with the K/V.
    """
    if setup.document_ids is None:
        return None
    src = (rank - step) % size
    q_ids = zigzag_shard(setup.document_ids, 1, rank, size)[:, q_rows]
    return q_ids, zigzag_shard(setup.document_ids, 1, src, size)[:, kv_rows]


class _RingAttention(torch.autograd.Function):
    """Causal ring attention over zigzag shards. Forward and backward both walk the ring."""

    @staticmethod
    def forward(ctx, q, k, v, setup: AttentionSetup):
        group, stats = setup.group, setup.stats
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        chunk = q.size(2) // 2
        kv = (k, v)
        out = lse = None
        for step in range(size):
            pending = _RingShift(kv, group, KV_TAGS, stats) if step + 1 < size else None  # prefetch
            q_rows, kv_rows, causal = _block_plan(step, rank, size, chunk)
            with maybe_timed(stats, "compute_s", q.device):
                k_blk, v_blk = seq_rows(kv[0], kv_rows), seq_rows(kv[1], kv_rows)
                block_out, block_lse = block_forward(setup, seq_rows(q, q_rows), k_blk, v_blk, causal,
                                                     _block_ids(setup, step, rank, size, q_rows, kv_rows))
                count_work(stats, seq_rows(q, q_rows).size(2), k_blk.size(2))
                if step == 0:  # the causal local block covers every query: a copy of it becomes the accumulator
                    # (a copy even in fp32: selective activation checkpointing keeps the kernel's own
                    # outputs for the recompute, so they must not be merged into in place)
                    dtype = merge_dtype(q.dtype)
                    out, lse = block_out.to(dtype, copy=True), block_lse.to(dtype, copy=True)
                else:
                    merge_block(seq_rows(out, q_rows), seq_rows(lse, q_rows), block_out, block_lse)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, stats = ctx.setup.group, ctx.setup.stats
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = merge_dtype(q.dtype)
        chunk = q.size(2) // 2
        dout = dout.contiguous()
        kv, dq, dkv_pending = (k, v), None, None
        for step in range(size):
            kv_pending = _RingShift(kv, group, KV_TAGS, stats) if step + 1 < size else None
            q_rows, kv_rows, causal = _block_plan(step, rank, size, chunk)
            with maybe_timed(stats, "compute_s", q.device):
                k_blk, v_blk = seq_rows(kv[0], kv_rows), seq_rows(kv[1], kv_rows)
                dq_blk, dk_blk, dv_blk = block_backward(
                    ctx.setup, seq_rows(dout, q_rows), seq_rows(q, q_rows), k_blk, v_blk,
                    seq_rows(out, q_rows), seq_rows(lse, q_rows), causal,
                    _block_ids(ctx.setup, step, rank, size, q_rows, kv_rows))
                count_work(stats, seq_rows(q, q_rows).size(2), k_blk.size(2))
            # The dK/dV accumulators of the block we hold arrive from rank-1 (which added its
            # share one step earlier); add ours and pass them on, one hop behind their K/V.
            if step == 0:  # the local block's gradients cover every row: they become the accumulators
                # (contiguous: P2P sends dense buffers, and kernels may return another memory layout)
                dq, dkv = dq_blk.to(acc), (dk_blk.to(acc).contiguous(), dv_blk.to(acc).contiguous())
            else:
                seq_rows(dq, q_rows).add_(dq_blk)
                dkv = dkv_pending.wait()
                seq_rows(dkv[0], kv_rows).add_(dk_blk)
                seq_rows(dkv[1], kv_rows).add_(dv_blk)
            dkv_pending = _RingShift(dkv, group, DKV_TAGS, stats)  # the last hop brings them home
            del dq_blk, dk_blk, dv_blk  # free before the next block's backward allocates its own
            if kv_pending is not None:
                kv = kv_pending.wait()
        dk, dv = dkv_pending.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None,
                   scale: float | None = None, stats: AttentionStats | None = None,
                   document_ids: Tensor | None = None) -> Tensor:
    """Causal attention over the global sequence; each rank of ``group`` holds its zigzag part.

    Shapes (local): q ``[batch, n_heads, s_local, head_dim]``, k and v
    ``[batch, n_kv_heads, s_local, head_dim]`` with ``n_heads % n_kv_heads == 0``; returns
    ``[batch, n_heads, s_local, head_dim]`` in q's dtype. ``s_local = global_seq / cp`` and
    the local tokens are ``zigzag_shard(x, seq_dim, cp_rank, cp)`` with ``cp_rank =
    dist.get_rank(group)``. ``scale`` defaults to ``head_dim ** -0.5``. ``group=None`` means
    the default (world) group; a group of size 1 is plain causal attention, no communication.

    Blocks run on the device's fused kernel in the input dtype; partial outputs, lse and
    the dQ/dK/dV accumulators are kept in fp32 (fp64 for fp64 inputs). ``stats``, if
    given, accumulates timings, bytes sent and work (``core.attention_stats``).

    Collectives: forward issues ``cp - 1`` ring hops, backward ``cp - 1`` K/V hops plus
    ``cp`` dK/dV hops; each hop is one ``dist.batch_isend_irecv`` (isend to group rank+1,
    irecv from rank-1). All ranks of ``group`` must call this with equal shapes and dtypes.

    ``document_ids`` ``[batch, global_seq]`` (the whole sequence's, on every rank) turns on
    document masking: queries attend only within their document (``core.documents``).
    """
    return _RingAttention.apply(q, k, v, prepare_attention(q, k, v, group, scale, stats, document_ids))
