"""Zigzag sequence sharding for context parallelism.

The sequence is cut into ``2 * cp`` equal chunks and rank ``r`` of the context-parallel
(cp) group holds chunks ``r`` and ``2*cp - 1 - r``, concatenated. With a causal mask an
early chunk attends to few keys and a late chunk to many; pairing the i-th earliest with
the i-th latest gives every rank the same amount of attention work. Tokens, labels and
RoPE positions are all sharded this way; nothing here communicates.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["zigzag_chunk_ids", "zigzag_shard", "zigzag_unshard", "zigzag_positions"]


def zigzag_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices (out of ``2 * cp_size``) that rank ``cp_rank`` holds."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_shard(x: Tensor, dim: int, cp_rank: int, cp_size: int) -> Tensor:
    """This rank's part of ``x`` along ``dim``: its two zigzag chunks, concatenated.

    Shape: ``x.shape`` with ``dim`` divided by ``cp_size``.
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

    ``parts[r]`` is rank r's local tensor (gather them first).
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
