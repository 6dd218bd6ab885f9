"""Document masking for packed sequences: which document each token is in, where in it, and
the attention bias that keeps every query inside its own document.

A packed sequence holds several documents back to back, each ended by an end-of-text
token (EOS), as the data pipeline builds them. With document masking a token attends only
to earlier tokens of its own document, and its rotary position counts from the start of
that document, so each document is computed as if it stood alone.

  tokens     a  b  EOS  c  d  e  EOS  f
  ids        0  0  0    1  1  1  1    2     (the EOS ends, and belongs to, its document)
  positions  0  1  2    0  1  2  3    0

Shapes: tokens, ids, positions ``[b, S]`` (int64) for the whole sequence. Every context
parallel rank builds them from the whole sequence (it has all tokens before taking its
zigzag slice), so blocks of other ranks' keys need no document ids sent along. No
function here communicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Documents:
    """What attention needs to keep to documents: ``ids`` of the whole sequence ``[b, S]``
    and the rotary ``positions`` of this rank's tokens ``[b, s_local]`` (its zigzag slice under cp)."""

    ids: Tensor
    positions: Tensor


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """[b, S] -> [b, S]: the number of EOS tokens strictly before each position."""
    ends = (tokens == eos_id).long()
    return ends.cumsum(dim=1) - ends


def document_positions(ids: Tensor) -> Tensor:
    """[b, S] document ids -> [b, S] positions counted from each document's first token."""
    index = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def document_bias(q_ids: Tensor, k_ids: Tensor, causal: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Additive attention bias for a block of queries and keys, and its rows that see no key.

    q_ids ``[b, s_q]``, k_ids ``[b, s_k]`` -> bias ``[b, 1, s_q, s_k]`` in ``dtype`` (0 where the
    query may attend, -inf elsewhere; broadcast over heads) and ``empty [b, 1, s_q]``, True for
    queries with no key of their document in the block. ``causal`` (square blocks on the
    diagonal only) also hides later keys.
    """
    allowed = q_ids[:, None, :, None] == k_ids[:, None, None, :]
    if causal:
        allowed &= torch.ones(q_ids.size(1), k_ids.size(1), dtype=torch.bool, device=q_ids.device).tril()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_ids.device).masked_fill_(~allowed, float("-inf"))
    return bias, ~allowed.any(dim=-1)
