"""Context-parallel attention methods by name (``--cp-method``).

* ``ring`` (default): K/V blocks travel the ring, one hop per block, each overlapped with
  a block of compute; per-rank memory O(S / cp). The choice for long sequences, where a
  block's compute hides its hop and whole-sequence K/V would not fit.
* ``allgather``: one all-gather of K/V per layer, then local queries attend; one
  collective's latency instead of cp - 1 dependent hops, at the cost of holding one
  layer's whole-sequence K/V. The choice for short-to-mid sequences (blocks too small
  to hide a hop) and for GQA models, whose K/V are small.
"""

from __future__ import annotations

from collections.abc import Callable

from .allgather_attention import allgather_attention
from .ring_attention import ring_attention

CP_METHODS: dict[str, Callable] = {"ring": ring_attention, "allgather": allgather_attention}


def cp_attention(method: str) -> Callable:
    """The attention function for ``method``; ValueError naming the choices otherwise."""
    if method not in CP_METHODS:
        raise ValueError(f"--cp-method {method!r} is not known: use one of {', '.join(CP_METHODS)}")
    return CP_METHODS[method]
