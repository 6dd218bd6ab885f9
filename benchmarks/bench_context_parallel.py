"""Context parallel: per-rank memory and time of the attention op and of a training step, vs one process.

    python benchmarks/bench_context_parallel.py [--seqs 2048,8192,16384] [--cps 1,2,4] [--parts op,block,step]
    python benchmarks/bench_context_parallel.py --device cuda [--seqs 4096,16384,32768]   # one GPU, cp=1
    python benchmarks/bench_context_parallel.py --smoke                                   # seconds: does it run

The honest baseline is one process running PyTorch's fused causal SDPA on the whole
sequence (``F.scaled_dot_product_attention``, the flash kernel on CPU). Every row is a
ratio against it, measured in this run. Parts (CPU, gloo, one thread per rank):

* op:    causal attention fwd+bwd on one sequence. Each cp rank holds its zigzag part
         and runs ring or all-gather attention; memory is the peak of tensors alive at
         once inside the call (``core.live_memory.PeakLiveBytes``; largest rank), time is
         the slowest rank's median (a call ends when its last rank is done).
* block: one off-diagonal ring step (half a block: 2c queries x c keys, or c x 2c) on our
         kernel wrapper + lse merge + fused backward, vs one SDPA fwd+bwd of that shape.
* step:  a whole training step of the debug model (``--model-args``, batch 1) on mesh
         cp=N: tokens/s and the peak of tensors alive during one step, per rank.

With ``--device cuda`` the op part runs on one GPU at cp=1 (a one-rank group: the ring
is one fused causal call, all-gather three block calls and a merge) next to SDPA and to
the explicit-score attention the ring used before (naive; OOM is reported as such), and
SDPA also on K/V repeated per head (for fp32, where SDPA's GQA falls back to explicit
scores); the faster SDPA is the reference;
memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the call.

On a CPU with fewer cores than ranks the ranks share cores: cp=4 on 2 cores cannot beat
2x, and its "wait" includes waiting for a descheduled peer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.attention_kernels import merge_block, select_block_kernel  # noqa: E402
from core.attention_reference import reference_block_forward  # noqa: E402
from core.attention_stats import AttentionStats  # noqa: E402
from core.context_parallel import CP_METHODS  # noqa: E402
from core.live_memory import PeakLiveBytes  # noqa: E402
from core.ranks import free_port, run_on_ranks  # noqa: E402
from core.zigzag import zigzag_shard  # noqa: E402

MIB = 2 ** 20


def sdpa(q, k, v, group=None, stats=None):
    """The baseline: one fused causal SDPA call over the whole (unsharded) sequence."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


def sdpa_repeat_kv(q, k, v, group=None, stats=None):
    """SDPA on K/V repeated per query head: the fused path for kernels without GQA (fp32 on CUDA,
    where SDPA with ``enable_gqa`` falls back to the explicit-score math path)."""
    group_size = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group_size, 1), v.repeat_interleave(group_size, 1),
                                          is_causal=True)


def naive(q, k, v, group=None, stats=None):
    """Explicit-score attention (what the ring computed per block before the fused kernels)."""
    return reference_block_forward(q, k, v, True, q.size(-1) ** -0.5)[0]


OP_FUNCTIONS = {**CP_METHODS, "sdpa": sdpa, "sdpa-repeat": sdpa_repeat_kv, "naive": naive}
BASELINES = ("sdpa", "sdpa-repeat")


def _inputs(shape: dict, seq: int, cp: int, rank: int, device, dtype):
    gen = torch.Generator().manual_seed(0)
    sizes = [(1, shape["heads"], seq, shape["head_dim"]), (1, shape["kv_heads"], seq, shape["head_dim"])]
    full = [torch.randn(sizes[i], generator=gen) for i in (0, 1, 1, 0)]
    q, k, v, dout = (zigzag_shard(t, 2, rank, cp).to(device=device, dtype=dtype) for t in full)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def _peak_bytes(device: torch.device, run) -> int:
    """Peak bytes of tensors alive at once while ``run()`` executes, above what existed before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakLiveBytes() as probe:
        run()
    return probe.peak


def _time_op(fn, inputs, iters: int, device) -> tuple[float, AttentionStats]:
    """Median seconds of fwd+bwd over ``iters`` calls after one warm-up, and the last call's stats."""
    q, k, v, dout = inputs
    times = []
    for it in range(iters + 1):
        stats = AttentionStats()
        if dist.get_world_size() > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(q, k, v, dist.group.WORLD, stats=stats).backward(dout)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - start)
    return statistics.median(times), stats


def _op_rank(shape: dict, seqs: list[int], methods: list[str], iters: int, device: str, dtype: str) -> dict:
    """On each rank: every method's peak bytes and time at every sequence length."""
    device, dtype = torch.device(device), getattr(torch, dtype)
    cp, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    for seq in seqs:
        for method in methods:
            inputs = _inputs(shape, seq, cp, rank, device, dtype)
            fn = OP_FUNCTIONS[method]
            try:
                peak = _peak_bytes(device, lambda: fn(*inputs[:3], dist.group.WORLD).backward(inputs[3]))
                seconds, stats = _time_op(fn, inputs, iters, device)
            except torch.OutOfMemoryError:
                results[(seq, method)] = None
                torch.cuda.empty_cache()
                continue
            results[(seq, method)] = dict(peak=peak, time=seconds, wait=stats.wait_s, compute=stats.compute_s)
    return results


def _block_timings(shape: dict, seq: int, cp: int, iters: int) -> dict:
    """Our off-diagonal ring step (kernel + merge + fused backward) vs one SDPA of that shape (ms)."""
    chunk = seq // (2 * cp)
    kernel = select_block_kernel(torch.device("cpu"), torch.float32, shape["head_dim"])
    rows = {}
    for q_rows, k_rows in ((2 * chunk, chunk), (chunk, 2 * chunk)):
        gen = torch.Generator().manual_seed(1)
        q, dout = (torch.randn(1, shape["heads"], q_rows, shape["head_dim"], generator=gen) for _ in range(2))
        k, v = (torch.randn(1, shape["kv_heads"], k_rows, shape["head_dim"], generator=gen) for _ in range(2))
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], -1e4)

        def ours():
            block_out, block_lse = kernel.forward(q, k, v, False, shape["head_dim"] ** -0.5)
            merge_block(out, lse, block_out, block_lse)
            kernel.backward(dout, q, k, v, block_out, block_lse, False, shape["head_dim"] ** -0.5)

        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def reference():
            F.scaled_dot_product_attention(*leaves, enable_gqa=True).backward(dout)

        rows[f"{q_rows}x{k_rows}"] = tuple(_median_seconds(fn, iters) * 1e3 for fn in (ours, reference))
    return rows


def _median_seconds(fn, iters: int) -> float:
    times = []
    for it in range(iters + 1):
        start = time.perf_counter()
        fn()
        if it:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_rank(seq: int, method: str, steps: int, model_args: str) -> dict:
    """On each rank: median training-step seconds and the peak of tensors alive during one step."""
    from train.config import TrainConfig
    from train.loop import build_trainer, train_step

    cp = dist.get_world_size()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(mesh=f"cp={cp}" if cp > 1 else "", cp_method=method, dataset="synthetic", seq_len=seq,
                          global_batch_size=1, steps=steps + 2, model_args=model_args, output_dir=out)
        t = build_trainer(cfg)
        train_step(t)  # warm-up: optimizer state, first-call costs
        peak = _peak_bytes(t.device, lambda: train_step(t))
        times = [train_step(t)["step_time_s"] for _ in range(steps)]
    return {"step_s": statistics.median(times), "peak": peak}


def _print_op_table(rows: dict, seqs, cps, methods, title: str) -> None:
    """One row per (seq, method, cp); ratios against the fastest SDPA baseline of that seq (marked *)."""
    print(f"\n{title}")
    header = (f"{'seq':>6} {'method':>11} {'cp':>3} | {'peak MiB':>9} {'x SDPA':>7} | {'fwd+bwd ms':>10} "
              f"{'speedup':>8} {'wait %':>7}")
    print(header + "\n" + "-" * len(header))
    for seq in seqs:
        measured = [m for m in BASELINES if m in methods and rows.get((1, seq, m)) is not None]
        best = min(measured, key=lambda m: rows[(1, seq, m)]["time"], default=None)
        for method in methods:
            for cp in (cps if method in CP_METHODS else [1]):
                r = rows.get((cp, seq, method))
                name = method + ("*" if method == best else "")
                if r is None:
                    print(f"{seq:>6} {name:>11} {cp:>3} | {'out of memory':>17} |")
                    continue
                base = rows[(1, seq, best)] if best else None
                ratios = (f"{r['peak'] / base['peak']:>7.2f}", f"{base['time'] / r['time']:>7.2f}x") if base \
                    else (f"{'n/a':>7}", f"{'n/a':>8}")
                wait = f"{100 * r['wait'] / r['time']:>6.1f}%" if method in CP_METHODS and cp > 1 else f"{'':>7}"
                print(f"{seq:>6} {name:>11} {cp:>3} | {r['peak'] / MIB:>9.1f} {ratios[0]} | "
                      f"{r['time'] * 1e3:>10.1f} {ratios[1]} {wait}")


def run_op_part(args, shape) -> None:
    methods = ["sdpa", *CP_METHODS]
    rows = {}
    for cp in args.cps:
        per_rank = run_on_ranks(_op_rank, cp, shape, args.seqs, methods if cp == 1 else list(CP_METHODS),
                                args.iters, "cpu", args.dtype, timeout=3600)
        for key in per_rank[0]:
            rows[(cp, *key)] = {"peak": max(r[key]["peak"] for r in per_rank),
                                **{f: max(per_rank, key=lambda r: r[key]["time"])[key][f]
                                   for f in ("time", "wait", "compute")}}
    _print_op_table(rows, args.seqs, args.cps, methods, f"attention op, fwd+bwd, {args.dtype}, {_shape_text(shape)}; "
                    f"per rank (peak: largest rank, time: slowest rank); x SDPA = 1 process on the fused kernel (*)")


def run_block_part(args, shape) -> None:
    print("\nring block (one off-diagonal step) vs one SDPA call of that shape, fwd+bwd, fp32, 1 thread")
    header = f"{'seq':>6} {'cp':>3} {'q x k':>12} | {'ours ms':>8} {'SDPA ms':>8} {'ratio':>6}"
    print(header + "\n" + "-" * len(header))
    for seq in args.seqs:
        for cp in [c for c in args.cps if c > 1]:
            for block, (ours, reference) in _block_timings(shape, seq, cp, args.iters).items():
                print(f"{seq:>6} {cp:>3} {block:>12} | {ours:>8.1f} {reference:>8.1f} {ours / reference:>6.2f}")


def run_step_part(args) -> None:
    print(f"\ntraining step, debug model --model-args {args.model_args}, batch 1, fp32; per rank vs 1 process")
    header = (f"{'seq':>6} {'method':>10} {'cp':>3} | {'step s':>7} {'tokens/s':>9} {'x 1 proc':>8} | "
              f"{'peak MiB':>9} {'x 1 proc':>8}")
    print(header + "\n" + "-" * len(header))
    for seq in args.seqs:
        base = None
        for cp in args.cps:
            for method in (["ring"] if cp == 1 else list(CP_METHODS)):
                per_rank = run_on_ranks(_step_rank, cp, seq, method, args.steps, args.model_args, timeout=3600)
                step_s, peak = max(r["step_s"] for r in per_rank), max(r["peak"] for r in per_rank)
                base = base or (step_s, peak)
                label = method if cp > 1 else "1 process"
                print(f"{seq:>6} {label:>10} {cp:>3} | {step_s:>7.2f} {seq / step_s:>9.0f} {base[0] / step_s:>8.2f} | "
                      f"{peak / MIB:>9.1f} {peak / base[1]:>8.2f}")


def run_cuda(args, shape) -> None:
    """One GPU: the block kernels and the all-gather path at cp=1 vs SDPA and the naive attention."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)  # a one-rank group: no communication happens
    try:
        methods = [*BASELINES, *CP_METHODS, "naive"]
        for dtype in args.cuda_dtypes:
            results = _op_rank(shape, args.seqs, methods, args.iters, "cuda", dtype)
            kernel = select_block_kernel(torch.device("cuda"), getattr(torch, dtype), shape["head_dim"]).name
            rows = {(1, *key): value for key, value in results.items()}
            _print_op_table(rows, args.seqs, [1], methods, f"{torch.cuda.get_device_name()}, fwd+bwd, {dtype} "
                            f"(block kernel: {kernel}), {_shape_text(shape)}; x SDPA = the faster SDPA (*)")
    finally:
        dist.destroy_process_group()


def _shape_text(shape: dict) -> str:
    return f"heads={shape['heads']} kv_heads={shape['kv_heads']} head_dim={shape['head_dim']}, batch 1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seqs", default="2048,8192,16384", help="global sequence lengths")
    parser.add_argument("--cps", default="1,2,4", help="context-parallel sizes (ranks spawned); 1 must come first")
    parser.add_argument("--parts", default="op,block,step", help="which of op, block, step to run (CPU)")
    parser.add_argument("--iters", type=int, default=2, help="timed repetitions after one warm-up")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps after two warm-up steps")
    parser.add_argument("--dtype", default="float32", help="attention-op dtype on CPU")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--model-args", default="n_layers=2,max_seq_len=16384", help="for the training step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cuda-dtypes", default="bfloat16,float32", help="with --device cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every part, a few seconds")
    args = parser.parse_args()
    if args.smoke:
        args.seqs, args.cps, args.iters, args.steps = "256", "1,2", 1, 1
        args.heads, args.kv_heads, args.head_dim = 4, 2, 16
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.cps = [int(c) for c in args.cps.split(",")]
    args.cuda_dtypes = args.cuda_dtypes.split(",")
    if args.cps[0] != 1:
        parser.error("--cps must start with 1: every ratio is against one process")
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    torch.set_num_threads(1)  # one core per rank, for the baseline too
    if args.device == "cuda":
        run_cuda(args, shape)
        return
    parts = args.parts.split(",")
    if "op" in parts:
        run_op_part(args, shape)
    if "block" in parts:
        run_block_part(args, shape)
    if "step" in parts:
        run_step_part(args)


if __name__ == "__main__":
    main()
