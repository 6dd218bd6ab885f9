"""Context parallelism: zigzag sequence sharding and causal ring attention.

The sequence is cut into ``2 * cp`` equal chunks and rank ``r`` of the context-parallel
(cp) group holds chunks ``r`` and ``2*cp - 1 - r`` ("zigzag"). With a causal mask an
early chunk attends to few keys and a late chunk to many; pairing the i-th earliest with
the i-th latest gives every rank the same amount of attention work.

Ring attention: every rank keeps its queries and passes its key/value block around the
ring (rank r sends to r+1 and receives from r-1). After ``cp - 1`` hops every query has
seen every key. Each hop's partial result is merged with the running one by the
log-sum-exp rule, so the softmax over the global sequence is exact. The next block is
already in flight while the current one is being computed.

With zigzag sharding, at ring step ``i > 0`` rank ``r`` holds the K/V of rank
``src = (r - i) mod cp``; its two chunks are ``src`` and ``2cp-1-src``:

* ``src < r``: chunk ``src`` lies before both local chunks, chunk ``2cp-1-src`` after
  both. All local queries attend to the *first half* of the remote K/V, unmasked.
* ``src > r``: both remote chunks lie after local chunk ``r`` and before local chunk
  ``2cp-1-r``. Only the *second half* of the local queries attends, to all remote K/V.

Either way a step costs half a full block and needs no mask; only step 0 (the local
block) is causal. The backward pass is a ring too: K/V travel again, and the gradient
accumulators for K/V travel with them, collecting each rank's contribution, and after a
last hop arrive back at the rank that owns that K/V.

Everything here works on plain local tensors and any ProcessGroup (gloo or NCCL).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "zigzag_chunk_ids", "zigzag_shard", "zigzag_unshard", "zigzag_positions",
    "ring_attention", "RingStats", "STATS",
]

KV_TAG, DKV_TAG = 0, 1  # gloo matches P2P messages by tag: keep the two rings apart


# --------------------------------------------------------------------------- zigzag layout

def zigzag_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices (out of ``2 * cp_size``) that rank ``cp_rank`` holds."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_shard(x: Tensor, dim: int, cp_rank: int, cp_size: int) -> Tensor:
    """This rank's part of ``x`` along ``dim``: its two zigzag chunks, concatenated.

    Shape: ``x.shape`` with ``dim`` divided by ``cp_size``. No communication.
    """
    seq_len = x.size(dim)
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp_size}: zigzag "
            f"context parallelism cuts the sequence into 2*cp equal chunks; pad or change the length")
    first, second = zigzag_chunk_ids(cp_rank, cp_size)
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def zigzag_unshard(parts: list[Tensor], dim: int) -> Tensor:
    """Inverse of :func:`zigzag_shard`: rebuild the global tensor from all ranks' parts.

    ``parts[r]`` is rank r's local tensor (gather them first). No communication.
    """
    cp_size = len(parts)
    chunks: list[Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        if part.size(dim) % 2:
            raise ValueError(f"rank {rank}'s part has odd length {part.size(dim)} along dim {dim}; "
                             f"a zigzag part is two equal chunks")
        first, second = zigzag_chunk_ids(rank, cp_size)
        chunks[first], chunks[second] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def zigzag_positions(global_seq_len: int, cp_rank: int, cp_size: int, device=None) -> Tensor:
    """Global positions (for RoPE) of this rank's tokens: LongTensor ``[global_seq_len // cp_size]``."""
    positions = torch.arange(global_seq_len, device=device)
    return zigzag_shard(positions, 0, cp_rank, cp_size)


# --------------------------------------------------------------------------- optional timing

@dataclass
class RingStats:
    """Opt-in counters for benchmarks: set ``STATS.enabled = True``, run, read, ``reset()``.

    ``compute_s``: time in attention math; ``wait_s``: time blocked in P2P ``wait()``;
    ``score_elems``: query-key pairs computed per head (the work; equal on all ranks when
    zigzag balances). On CUDA the timers synchronize the device, which perturbs overlap.
    """

    enabled: bool = False
    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    score_elems: int = 0

    def reset(self) -> None:
        self.compute_s = self.wait_s = 0.0
        self.bytes_sent = self.score_elems = 0


STATS = RingStats()


@contextmanager
def _timed(field: str, device: torch.device):
    if not STATS.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setattr(STATS, field, getattr(STATS, field) + time.perf_counter() - start)


# --------------------------------------------------------------------------- ring communication

class _RingShift:
    """One in-flight ring hop: send ``tensor`` to rank+1, receive rank-1's into a new buffer.

    Issues one ``dist.batch_isend_irecv`` with an isend and an irecv. Every rank of the
    group must create the same sequence of shifts (same tags, shapes, dtypes), else it hangs.
    The sent tensor must not be modified until :meth:`wait` returns.
    """

    def __init__(self, tensor: Tensor, group, tag: int):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if size == 1:  # the ring is this rank alone: the "next" block is our own
            self.works, self.received = [], tensor
            return
        self.received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, group=group, group_peer=(rank + 1) % size, tag=tag),
               dist.P2POp(dist.irecv, self.received, group=group, group_peer=(rank - 1) % size, tag=tag)]
        self.works = dist.batch_isend_irecv(ops)
        if STATS.enabled:
            STATS.bytes_sent += tensor.numel() * tensor.element_size()

    def wait(self) -> Tensor:
        with _timed("wait_s", self.received.device):
            for work in self.works:
                work.wait()
        return self.received


def _block_plan(step: int, rank: int, size: int, chunk: int) -> tuple[slice, slice, bool]:
    """Which local queries attend which rows of the K/V held at ``step``, and whether causally.

    Returns (query slice, key slice, causal) over local sequence positions (module docstring).
    """
    if step == 0:
        return slice(None), slice(None), True
    src = (rank - step) % size
    if src < rank:
        return slice(None), slice(0, chunk), False
    return slice(chunk, None), slice(None), False


# --------------------------------------------------------------------------- block math

def _group_heads(x: Tensor, n_kv_heads: int) -> Tensor:
    """[b, h, s, d] -> [b, h_kv, h/h_kv, s, d]: query heads that share one K/V head side by side.

    Heads ``j*g .. j*g+g-1`` use K/V head ``j`` (the repeat_interleave convention of
    SDPA's enable_gqa and HF's repeat_kv). K/V get a size-1 group axis and broadcast,
    so they are never copied per query head.
    """
    b, h, s, d = x.shape
    return x.reshape(b, n_kv_heads, h // n_kv_heads, s, d)


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool) -> Tensor:
    """Scaled q @ k^T, [b, hkv, g, sq, sk], -inf above the diagonal when causal (sq == sk)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if STATS.enabled:
        STATS.score_elems += q.size(-2) * k.size(-2)
    return scores


def _block_forward(q, k, v, scale, causal) -> tuple[Tensor, Tensor]:
    """Attention of one block: (out [b,hkv,g,sq,d], lse [b,hkv,g,sq]), in q's dtype."""
    scores = _scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, v), lse


def _merge_into(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Merge a block's partial softmax result into the running one (in place, views allowed).

    Each partial output is normalized by its own sum exp(lse); rescaling both to the
    combined sum exp(new_lse) and adding gives the softmax over the union of keys.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


def _block_backward(q, k, v, dout, lse, delta, scale, causal) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *final* lse and delta = rowsum(dout * out).

    Recomputes the probabilities instead of saving them (flash-attention style):
    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = dS K, dK = dS^T Q.
    dK/dV are summed over the query-head group axis (GQA). Returns (dq, dk, dv).
    """
    probs = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
    dv = torch.matmul(probs.transpose(-1, -2), dout).sum(dim=2, keepdim=True)
    dprobs = torch.matmul(dout, v.transpose(-1, -2))
    dscores = probs * (dprobs - delta.unsqueeze(-1)) * scale
    dq = torch.matmul(dscores, k)
    dk = torch.matmul(dscores.transpose(-1, -2), q).sum(dim=2, keepdim=True)
    return dq, dk, dv


# --------------------------------------------------------------------------- autograd

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (bf16, fp16, fp32) is computed and accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RingAttention(torch.autograd.Function):
    """Causal ring attention over zigzag shards. Forward and backward both walk the ring."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = _compute_dtype(q.dtype)
        qg = _group_heads(q, k.size(1)).to(acc)
        chunk = q.size(2) // 2
        kv = torch.stack([k, v])  # one contiguous buffer per hop, in the input dtype
        out = lse = None
        for step in range(size):
            pending = _RingShift(kv, group, KV_TAG) if step + 1 < size else None  # prefetch
            with _timed("compute_s", q.device):
                q_rows, kv_rows, causal = _block_plan(step, rank, size, chunk)
                k_blk, v_blk = (t.unsqueeze(2)[..., kv_rows, :].to(acc) for t in kv)
                block_out, block_lse = _block_forward(qg[..., q_rows, :], k_blk, v_blk, scale, causal)
                if step == 0:  # the causal local block covers every query: start from it
                    out, lse = block_out, block_lse
                else:
                    _merge_into(out[..., q_rows, :], lse[..., q_rows], block_out, block_lse)
            if pending is not None:
                kv = pending.wait()
        out = out.reshape(q.shape).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        acc, n_kv = _compute_dtype(q.dtype), k.size(1)
        chunk = q.size(2) // 2
        qg = _group_heads(q, n_kv).to(acc)
        dout_g = _group_heads(dout, n_kv).to(acc)
        delta = (dout_g * _group_heads(out, n_kv).to(acc)).sum(-1)
        dq = torch.zeros_like(qg)
        kv = torch.stack([k, v])
        dkv_pending = None
        for step in range(size):
            kv_pending = _RingShift(kv, group, KV_TAG) if step + 1 < size else None
            with _timed("compute_s", q.device):
                q_rows, kv_rows, causal = _block_plan(step, rank, size, chunk)
                k_blk, v_blk = (t.unsqueeze(2)[..., kv_rows, :].to(acc) for t in kv)
                dq_blk, dk_blk, dv_blk = _block_backward(
                    qg[..., q_rows, :], k_blk, v_blk, dout_g[..., q_rows, :],
                    lse[..., q_rows], delta[..., q_rows], scale, causal)
                dq[..., q_rows, :] += dq_blk
            # The dK/dV accumulator of the block we hold arrives from rank-1 (which added its
            # share one step earlier); add ours and pass it on, one hop behind its K/V.
            if step == 0:
                dkv = torch.stack([dk_blk, dv_blk]).squeeze(3)
            else:
                dkv = dkv_pending.wait()
                dkv[0][..., kv_rows, :] += dk_blk.squeeze(2)
                dkv[1][..., kv_rows, :] += dv_blk.squeeze(2)
            dkv_pending = _RingShift(dkv, group, DKV_TAG)  # the last hop brings it home
            if kv_pending is not None:
                kv = kv_pending.wait()
        dk, dv = dkv_pending.wait()
        return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# --------------------------------------------------------------------------- public entry

def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shape errors before any communication, so every rank fails the same way at once."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, s, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"batch size mismatch: q has {b}, k/v have {bk}")
    if s != sk:
        raise ValueError(f"local sequence mismatch: q has {s} tokens, k/v have {sk}; "
                         f"shard q, k and v with the same zigzag_shard")
    if d != dk:
        raise ValueError(f"head_dim mismatch: q has {d}, k/v have {dk}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"n_heads {h} is not divisible by n_kv_heads {hkv} (GQA needs whole groups); "
                         f"with tensor parallelism both counts are per rank")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None,
                   scale: float | None = None) -> Tensor:
    """Causal attention over the global sequence; each rank of ``group`` holds its zigzag part.

    Shapes (local): q ``[batch, n_heads, s_local, head_dim]``, k and v
    ``[batch, n_kv_heads, s_local, head_dim]`` with ``n_heads % n_kv_heads == 0``; returns
    ``[batch, n_heads, s_local, head_dim]`` in q's dtype. ``s_local = global_seq / cp`` and
    the local tokens are ``zigzag_shard(x, seq_dim, cp_rank, cp)`` with ``cp_rank =
    dist.get_rank(group)``. ``scale`` defaults to ``head_dim ** -0.5``. ``group=None`` means
    the default (world) group; a group of size 1 is plain causal attention, no communication.

    Math runs in fp32 (fp64 for fp64 inputs), whatever the input dtype.

    Collectives: forward issues ``cp - 1`` ring hops, backward ``cp - 1`` K/V hops plus
    ``cp`` dK/dV hops; each hop is one ``dist.batch_isend_irecv`` (isend to group rank+1,
    irecv from rank-1). All ranks of ``group`` must call this with equal shapes and dtypes.
    """
    _check_inputs(q, k, v)
    size = dist.get_world_size(group)
    if size > 1 and q.size(2) % 2:
        raise ValueError(f"local sequence length {q.size(2)} is odd: a zigzag part is two equal "
                         f"chunks (global length must be divisible by 2*cp = {2 * size})")
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    return _RingAttention.apply(q, k, v, group, scale)
