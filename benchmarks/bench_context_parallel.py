"""Ring attention on CPU/gloo: per-rank activation memory and compute vs communication wait.

    python benchmarks/bench_context_parallel.py [--seqs 512,1024,2048] [--cps 1,2,4]

For each context-parallel size cp it spawns cp gloo ranks (one thread each); every rank
runs causal ring attention on its zigzag part of a ``seq``-token sequence, forward and
backward, and measures:

* saved:  bytes ring attention keeps for backward (sum of tensors packed through
          ``saved_tensors_hooks``), i.e. the activation memory attention adds per layer;
* peak:   peak bytes of tensors alive at once *inside* one forward (resp. backward) call,
          counted by a small ``TorchDispatchMode`` that tracks every storage an op creates
          (on CPU there is no allocator statistic; on CUDA use torch.cuda.max_memory_allocated);
* time:   median over iterations of forward+backward wall time, split with
          ``core.ring_attention.STATS`` into compute and time blocked in P2P ``wait()``.

Memory is the largest rank's; times come from the slowest rank (work is balanced by zigzag). Caveat: on a
machine with fewer cores than ranks the ranks share cores, so compute time per rank does
not shrink with cp and "wait" includes waiting for a descheduled peer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages" / "core"), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from core.ring_attention import STATS, ring_attention, zigzag_shard  # noqa: E402
from multiprocess import run_on_ranks  # noqa: E402

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 8, 2, 64


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the ``with`` block and still alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()
        self._refs: list[weakref.ref] = []

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen:  # views share a storage: count it once
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    self._refs.append(weakref.ref(
                        storage, lambda _, k=key, n=storage.nbytes(): self._freed(k, n)))
        return out


def _inputs(seq: int, cp: int, rank: int):
    gen = torch.Generator().manual_seed(0)
    shapes = [(BATCH, HEADS, seq, HEAD_DIM), (BATCH, KV_HEADS, seq, HEAD_DIM),
              (BATCH, KV_HEADS, seq, HEAD_DIM), (BATCH, HEADS, seq, HEAD_DIM)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    q, k, v, dout = (zigzag_shard(t, 2, rank, cp) for t in full)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def _measure_memory(seq: int, cp: int, rank: int) -> tuple[int, int, int]:
    """(saved-for-backward bytes, peak live bytes in forward, peak live bytes in backward)."""
    q, k, v, dout = _inputs(seq, cp, rank)
    saved = []

    def pack(t):  # q, k, v, out and lse: what stays alive between forward and backward
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), PeakLiveBytes() as fwd:
        out = ring_attention(q, k, v, dist.group.WORLD)
    with PeakLiveBytes() as bwd:
        out.backward(dout)
    return sum(saved), fwd.peak, bwd.peak


def _bench_rank(seqs: list[int], iters: int) -> dict:
    cp, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    for seq in seqs:
        saved, peak_fwd, peak_bwd = _measure_memory(seq, cp, rank)
        totals, computes, waits = [], [], []
        for it in range(iters + 1):  # the first iteration warms up
            q, k, v, dout = _inputs(seq, cp, rank)
            dist.barrier()
            STATS.reset()
            STATS.enabled = True
            start = time.perf_counter()
            ring_attention(q, k, v, dist.group.WORLD).backward(dout)
            elapsed = time.perf_counter() - start
            STATS.enabled = False
            if it:
                totals.append(elapsed)
                computes.append(STATS.compute_s)
                waits.append(STATS.wait_s)
        results[seq] = dict(saved=saved, peak_fwd=peak_fwd, peak_bwd=peak_bwd,
                            total=statistics.median(totals), compute=statistics.median(computes),
                            wait=statistics.median(waits), sent=STATS.bytes_sent)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="512,1024,2048", help="global sequence lengths")
    parser.add_argument("--cps", default="1,2,4", help="context-parallel sizes (ranks spawned)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    cps = [int(c) for c in args.cps.split(",")]

    print(f"ring attention fwd+bwd, fp32, batch={BATCH} heads={HEADS} kv_heads={KV_HEADS} "
          f"head_dim={HEAD_DIM}; per rank (memory: largest rank, time: slowest rank); MiB = 2^20 bytes")
    rows = {}
    for cp in cps:
        per_rank = run_on_ranks(_bench_rank, cp, seqs, args.iters, timeout=300)
        for seq in seqs:
            # memory: the largest rank; time: all columns from the slowest rank, so they add up
            slowest = max(per_rank, key=lambda r: r[seq]["total"])[seq]
            memory = {key: max(r[seq][key] for r in per_rank) for key in ("saved", "peak_fwd", "peak_bwd")}
            rows[(cp, seq)] = {**slowest, **memory}

    mib = 2 ** 20
    header = (f"{'seq':>6} {'cp':>3} | {'saved MiB':>9} {'x cp=1':>6} | {'peak fwd':>8} {'peak bwd':>8} "
              f"{'x cp=1':>6} | {'total ms':>8} {'compute':>8} {'wait':>8} {'wait %':>6} | {'sent MiB':>8}")
    print(header)
    print("-" * len(header))
    for seq in seqs:
        base = rows.get((cps[0], seq))
        for cp in cps:
            r = rows[(cp, seq)]
            print(f"{seq:>6} {cp:>3} | {r['saved'] / mib:>9.2f} {r['saved'] / base['saved']:>6.2f} | "
                  f"{r['peak_fwd'] / mib:>8.2f} {r['peak_bwd'] / mib:>8.2f} "
                  f"{r['peak_bwd'] / base['peak_bwd']:>6.2f} | {r['total'] * 1e3:>8.1f} "
                  f"{r['compute'] * 1e3:>8.1f} {r['wait'] * 1e3:>8.1f} "
                  f"{100 * r['wait'] / r['total']:>5.1f}% | {r['sent'] / mib:>8.2f}")
    print(f"ratios 'x cp=1' are against cp={cps[0]} in this run; 'sent' counts both fwd and bwd hops.")


if __name__ == "__main__":
    main()
