"""What Meshtron does on one GPU, in one command (at most ~8 minutes on an H100):

    python benchmarks/gpu_acceptance.py              # on a machine with one CUDA GPU
    python benchmarks/gpu_acceptance.py --smoke      # on the CPU in about a minute (the test suite runs this)

1. the CUDA tests (every test whose name says cuda: the attention kernels against their
   reference, float8 on float8 tensor cores against bf16), then the sync-free check on its
   own: steps between reports run under ``torch.cuda.set_sync_debug_mode("error")``
   (``tests/test_prefetch.py``); with ``--smoke``, the CPU twin of that check (no tensor read
   on the host between reports) and no CUDA tests;
2. a 1B-class Llama (``llama3-1b``: Llama 3.2 1B's shape, 16 layers, dim 2048, 128k vocab) on
   synthetic tokens, each run the real CLI (``python -m train``) on one process:
     - bf16 (``--dtype auto``), ``--compile``, ``--activation-checkpoint selective``;
     - the same with ``--float8`` (torchao, rowwise scales);
   each with tokens/s (median of the reports after the first two, so compile time is out),
   MFU (model FLOPs over the GPU's dense bf16 peak, ``train.flops``; float8 runs are rated
   against the same bf16 peak, as torchtitan does, so the two are comparable) and peak memory
   (``torch.cuda.max_memory_allocated``).

A markdown table goes to stdout and to ``--out`` (default ``outputs/gpu_acceptance.md``).
With ``--smoke`` the runs use the debug model at toy size, eager, on the CPU: the table then
shows that every piece runs, not how fast a GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]
SYNC_CHECK = "tests/test_prefetch.py::test_cuda_steady_state_steps_never_wait_for_the_host"
SYNC_CHECK_CPU_TWIN = "tests/test_lean_step.py::test_steps_between_reports_read_nothing_on_the_host"
# Reports whose tokens/s is left out of the median: the first includes compile time, the second warm-up.
WARMUP_REPORTS = 2


def environment() -> str:
    """One line naming the machine: GPU (or CPU), torch and CUDA versions."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}"


def pytest_summary(selection: list[str]) -> str:
    """Run pytest on ``selection``; return its summary line (e.g. "12 passed, 3 skipped in 40.1s")."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(PACKAGES)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed|error|deselected)", line)]
    summary = lines[-1].strip("= ") if lines else f"pytest exited with {result.returncode}"
    if result.returncode != 0:
        print(result.stdout[-4000:], file=sys.stderr)
    return summary


def run_checks(smoke: bool) -> dict[str, str]:
    """The CUDA tests and the sync-free check (its CPU twin with ``--smoke``): name -> pytest's summary."""
    if smoke:
        return {"CUDA tests": "not run (--smoke)", "no host sync between reports (CPU twin)":
                pytest_summary([SYNC_CHECK_CPU_TWIN])}
    return {"CUDA tests": pytest_summary(["tests", "-k", "cuda", "--deselect", SYNC_CHECK]),
            "no host sync between reports": pytest_summary([SYNC_CHECK])}


def training_flags(args: argparse.Namespace) -> list[str]:
    """The CLI flags shared by both runs: model, shape, speed options."""
    if args.smoke:
        return ["--model", "debug", "--dtype", "bfloat16", "--seq-len", "64", "--global-batch-size", "4",
                "--activation-checkpoint", "selective", "--device", "cpu"]
    return ["--model", args.model, "--seq-len", str(args.seq_len), "--global-batch-size", str(args.batch_size),
            "--activation-checkpoint", "selective", "--compile"]


def train_run(flags: list[str], steps: int, log_every: int) -> dict:
    """One ``python -m train`` run on synthetic tokens; returns its steady-state figures."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "train", "--dataset", "synthetic", "--steps", str(steps), "--log-every",
                   str(log_every), "--warmup-steps", "1", "--checkpoint-every", "0", "--output-dir", out, *flags]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(PACKAGES)}
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0]}
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[WARMUP_REPORTS:] or rows[-1:]
    tokens_per_sec = statistics.median(r["tokens_per_sec"] for r in steady)
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    return {"tokens_per_sec": tokens_per_sec, "mfu": statistics.median(mfu) if mfu else None,
            "peak_gib": max(r["mem_peak_mib"] for r in rows) / 1024, "loss": rows[-1]["loss"], "seconds": seconds}


def table(env_line: str, checks: dict[str, str], runs: dict[str, dict], smoke: bool) -> str:
    """The markdown report."""
    lines = [f"# Meshtron GPU acceptance{' (smoke, CPU)' if smoke else ''}", "", f"Machine: {env_line}", "",
             "| check | pytest |", "|---|---|", *(f"| {name} | {summary} |" for name, summary in checks.items()),
             "", "| run | tokens/s | MFU | peak memory GiB | last loss | wall s |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak known)"
        lines.append(f"| {name} | {r['tokens_per_sec']:,.0f} | {mfu} | {r['peak_gib']:.2f} | {r['loss']:.3f} "
                     f"| {r['seconds']:.0f} |")
    bf16, fp8 = runs.get("bf16"), runs.get("float8")
    if bf16 and fp8 and "error" not in bf16 and "error" not in fp8:
        lines += ["", f"float8 / bf16 tokens/s: {fp8['tokens_per_sec'] / bf16['tokens_per_sec']:.2f}x"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, toy model, eager: check that every piece runs")
    parser.add_argument("--model", default="llama3-1b", help="registry model of the training runs")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--steps", type=int, default=30, help="steps per training run")
    parser.add_argument("--out", default="outputs/gpu_acceptance.md", help="where the markdown table is written")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device is visible: run this on a GPU machine, or pass --smoke for the CPU check",
              file=sys.stderr)
        return 2
    steps, log_every = (6, 1) if args.smoke else (args.steps, 5)
    checks = run_checks(args.smoke)
    flags = training_flags(args)
    runs = {"bf16": train_run(flags, steps, log_every), "float8": train_run([*flags, "--float8"], steps, log_every)}
    report = table(environment(), checks, runs, args.smoke)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(f"written to {args.out}")
    failed = any("failed" in c or "error" in c for c in checks.values()) or any("error" in r for r in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
