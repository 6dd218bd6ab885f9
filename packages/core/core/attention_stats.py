"""Opt-in counters for context-parallel attention, passed explicitly by benchmarks and tests."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionStats:
    """What one or more context-parallel attention calls did on this rank.

    ``compute_s``: seconds in the block kernels and merges; ``wait_s``: seconds blocked
    waiting for communication; ``bytes_sent``: bytes this rank sent; ``score_elems``:
    query-key pairs handed to the kernels per head (the work; equal on every rank when
    zigzag balances it). On CUDA the timers synchronize the device, which removes overlap.
    """

    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    score_elems: int = 0

    @contextmanager
    def timed(self, field: str, device: torch.device):
        """Add the wall time of the ``with`` body to ``field`` (``compute_s`` or ``wait_s``)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setattr(self, field, getattr(self, field) + time.perf_counter() - start)


@contextmanager
def maybe_timed(stats: AttentionStats | None, field: str, device: torch.device):
    """``stats.timed(field, device)`` when counting, else nothing (no device synchronization)."""
    if stats is None:
        yield
    else:
        with stats.timed(field, device):
            yield


def count_work(stats: AttentionStats | None, n_queries: int, n_keys: int) -> None:
    """Count a block of ``n_queries`` x ``n_keys`` query-key pairs handed to a kernel."""
    if stats is not None:
        stats.score_elems += n_queries * n_keys
