"""Plan a mesh before renting GPUs: every layout of a model on N GPUs, ranked by tokens/s per GPU.

    python tools/plan.py --model llama3-70b --gpus 256 --gpu h100 --seq-len 8192 --global-batch-size 512
    python tools/plan.py --model llama3-8b --gpus 8 --gpu h100 --seq-len 8192 --global-batch-size 64 --json

Each layout (mesh, data-parallel mode, activation checkpointing, pipeline schedule and
microbatches, or gradient accumulation without pp) the trainer accepts is estimated in closed
form (``train.planner``: memory of the fullest rank, step time from FLOPs at ``--efficiency``
of the GPU's peak plus the communication each mesh dim exposes and the pipeline bubble).
The fastest that fit are printed, one row per mesh, with the flags that run them. ``--verify N``
then runs the dry run (``python -m train --dry-run``, its default ranks: one per
pipeline role) on the top N and prints them again with its peak: a layout the dry run finds
too big is dropped and the next one checked. The dry run takes seconds to many minutes (a
step of every microbatch on fake tensors), so it runs only when asked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]
sys.path[:0] = PACKAGES  # run from a checkout without installing

from models.registry import get_config, model_names, parse_model_args  # noqa: E402
from train.planner import HARDWARE, LINK_EFFICIENCY, USABLE_MEMORY, Estimate, as_json, plan  # noqa: E402

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"one of {', '.join(model_names())}")
    parser.add_argument("--model-args", default="", help="overrides, e.g. max_seq_len=131072")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(HARDWARE)}")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True, help="sequences per step")
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="share of the GPU's bf16 peak the matmuls reach (default 0.5)")
    parser.add_argument("--top", type=int, default=8, help="rows to print (one per mesh)")
    parser.add_argument("--verify", type=int, default=0,
                        help="dry-run the top N layouts and drop those that do not fit (0: skip; it takes minutes)")
    parser.add_argument("--json", action="store_true", help="print the ranked layouts as JSON instead")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace):
    """The model config, or one ``error:`` line naming the bad flag."""
    if args.model not in model_names():
        raise ValueError(f"unknown --model {args.model!r}: use one of {', '.join(model_names())}")
    if args.gpu not in HARDWARE:
        raise ValueError(f"unknown --gpu {args.gpu!r}: use one of {', '.join(HARDWARE)}")
    for flag, value in (("--gpus", args.gpus), ("--seq-len", args.seq_len),
                        ("--global-batch-size", args.global_batch_size)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if args.top < 1:
        raise ValueError(f"--top {args.top} must be >= 1 (the rows to print)")
    if args.verify < 0:
        raise ValueError(f"--verify {args.verify} must be >= 0 (0: no dry run)")
    if not 0 < args.efficiency <= 1:
        raise ValueError(f"--efficiency {args.efficiency} must lie in (0, 1]: the share of the peak reached")
    config = get_config(args.model, **parse_model_args(args.model, args.model_args))
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}: "
                         f"add --model-args max_seq_len={args.seq_len}")
    return config


def one_per_mesh(estimates: list[Estimate]) -> list[Estimate]:
    """The best layout of each mesh, in rank order (the rest differ only in secondary choices)."""
    seen, kept = set(), []
    for e in estimates:
        if e.fits and e.layout.mesh not in seen:
            seen.add(e.layout.mesh)
            kept.append(e)
    return kept


def dry_run_peak(args: argparse.Namespace, e: Estimate) -> float:
    """The largest peak the dry run finds over its simulated ranks (one per pipeline role), in bytes."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "train", "--dry-run", "--world-size", str(args.gpus), "--model", args.model,
                   "--seq-len", str(args.seq_len), "--global-batch-size", str(args.global_batch_size),
                   "--output-dir", out, *e.layout.flags()]
        if args.model_args:
            command += ["--model-args", args.model_args]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(PACKAGES)})
        if result.returncode != 0:
            raise RuntimeError(f"the dry run of {' '.join(e.layout.flags())} failed: "
                               f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        ranks = json.loads((Path(out) / "dry_run.json").read_text())["ranks"]
    return max(r["memory_bytes"]["peak"] for r in ranks)


def verified(args: argparse.Namespace, candidates: list[Estimate], budget: float) -> dict[str, float]:
    """Dry-run peaks (bytes, by mesh) of the first ``--verify`` candidates that fit; a candidate the
    dry run finds too big is removed from ``candidates`` and the next one is tried."""
    peaks: dict[str, float] = {}
    for e in list(candidates):
        if len(peaks) == args.verify:
            break
        peak = dry_run_peak(args, e)
        if peak > budget:
            print(f"{e.layout.mesh}: the dry run finds {peak / GIB:.1f} GiB > {budget / GIB:.1f} GiB; dropped",
                  file=sys.stderr)
            candidates.remove(e)
        else:
            peaks[e.layout.mesh] = peak
    return peaks


def why(e: Estimate) -> str:
    """The costs beyond compute, largest first, as shares of the step."""
    costs = [(name, seconds) for name, seconds in e.seconds_by_part.items() if name != "compute" and seconds > 0]
    costs.sort(key=lambda item: -item[1])
    return ", ".join(f"{name} {seconds / e.step_seconds:.0%}" for name, seconds in costs[:3]) or "compute only"


def table(candidates: list[Estimate], peaks: dict[str, float] | None = None) -> str:
    """One row per candidate; "dry run GiB": the largest peak of its dry run, where one ran."""
    peaks = peaks or {}
    lines = ["| # | mesh | dp mode | recompute | schedule | micro | peak GiB | dry run GiB | step s "
             "| tokens/s/GPU | MFU | beyond compute |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(candidates, 1):
        lay = e.layout
        checked = f"{peaks[lay.mesh] / GIB:.1f}" if lay.mesh in peaks else "-"
        lines.append(f"| {i} | {lay.mesh} | {lay.dp_mode} | {lay.activation_checkpoint} | {lay.schedule or '-'} "
                     f"| {lay.microbatches} | {e.memory_bytes / GIB:.1f} | {checked} | {e.step_seconds:.2f} "
                     f"| {e.tokens_per_second_per_gpu:,.0f} | {e.mfu:.1%} | {why(e)} |")
    return "\n".join(lines)


def header(args: argparse.Namespace, estimates: list[Estimate]) -> str:
    hw = HARDWARE[args.gpu]
    fitting = sum(e.fits for e in estimates)
    return (f"{args.model} on {args.gpus} x {hw.name}, seq {args.seq_len}, global batch {args.global_batch_size}: "
            f"{len(estimates)} layouts, {fitting} fit in {USABLE_MEMORY:.0%} of {hw.memory_bytes / GIB:.0f} GiB\n"
            f"assumed: bf16 peak {hw.bf16_flops / 1e12:.0f} TFLOP/s x {args.efficiency:.0%}; NVLink "
            f"{hw.nvlink_bytes_per_s / 1e9:.0f} GB/s and network {hw.network_bytes_per_s / 1e9:.0f} GB/s per GPU "
            f"x {LINK_EFFICIENCY:.0%}, {hw.gpus_per_node} GPUs per node ({hw.source})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hw = HARDWARE[args.gpu]
    estimates = plan(config, args.gpus, args.seq_len, args.global_batch_size, hw, args.efficiency)
    candidates = one_per_mesh(estimates)
    if not candidates:
        print(f"error: no layout of {args.model} fits {args.gpus} x {hw.name} at seq {args.seq_len} and global batch "
              f"{args.global_batch_size}: add GPUs, or lower --seq-len or --global-batch-size", file=sys.stderr)
        return 1
    shown = candidates[:args.top]
    if args.json:
        peaks = verified(args, candidates, USABLE_MEMORY * hw.memory_bytes) if args.verify > 0 else {}
        print(json.dumps([{**as_json(e), "dry_run_peak_bytes": peaks.get(e.layout.mesh)}
                          for e in candidates[:args.top]], indent=1))
        return 0
    print(header(args, estimates))
    print(table(shown))
    if args.verify > 0:
        print(f"\nchecking the first {args.verify} with the dry run (python -m train --dry-run, minutes):", flush=True)
        peaks = verified(args, candidates, USABLE_MEMORY * hw.memory_bytes)
        print(table([e for e in candidates if e.layout.mesh in peaks], peaks))
    print(f"\nrun the first: {launch_command(args, candidates[0])}")
    return 0


def launch_command(args: argparse.Namespace, e: Estimate) -> str:
    """The torchrun line (on every node) that trains ``e``'s layout."""
    per_node = min(args.gpus, HARDWARE[args.gpu].gpus_per_node)
    nodes = -(-args.gpus // per_node)
    rendezvous = f" --nnodes={nodes} --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500" if nodes > 1 else ""
    return (f"torchrun --nproc_per_node={per_node}{rendezvous} -m train --model {args.model} --seq-len {args.seq_len} "
            f"--global-batch-size {args.global_batch_size} {' '.join(e.layout.flags())}")


if __name__ == "__main__":
    sys.exit(main())
