"""The lean step, measured side by side in one run: data parallel, activation checkpointing,
compile and grouped-GEMM experts, each as a ratio to its honest baseline.

    python benchmarks/bench_step.py            # minutes: each row runs 3 rounds
    python benchmarks/bench_step.py --smoke    # every row once, tiny (the test suite runs this)

Every training row is the real CLI (``python -m train`` / ``torchrun -m train``) on synthetic
tokens, so thread counts are the trainer's own: one process uses every core, N ranks on one
machine share them. Throughput is the median tokens/s over the steps after the first few
(warm-up, and compile time on the first step); memory is the peak resident set of rank 0
(``mem_peak_mib``: weights, optimizer state, activations and the runtime itself). Rows
compared by throughput run in turn, round after round, and each ratio is the median over
rounds of the ratio within a round: the machine's speed drifts between minutes.

  1. data parallel: dp=2 (FSDP as configured and with a unit per block, HSDP, plain
     replication) vs 1 process using every core, and vs 1 process on one thread (a rank's share);
     beside them two one-thread processes on half the batch each, with no communication: the
     ceiling of dp=2 on this machine, where two busy processes slow each other down;
  2. activation checkpointing none / full / selective: peak memory and tokens/s, 8 layers at seq 1024;
  3. torch.compile per block vs eager: 1 process on the debug config and a wider model, tp=2
     and dp=2 FSDP (the compile time is the first step's time minus a steady step's);
  4. MoE experts: one grouped GEMM per projection vs a matmul per expert, forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]
sys.path[:0] = PACKAGES
INDEPENDENT = 0  # a config's ranks: two processes with no communication (see independent_pair)


def launch(args: list[str], ranks: int, steps: int, threads: int | None, out: str) -> subprocess.Popen:
    """Start one training run via the CLI (torchrun for ranks > 1), writing metrics under ``out``.
    ``threads`` per rank: None lets the trainer share the cores among the ranks."""
    launcher = [sys.executable, "-m", "train"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "train"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(PACKAGES)}
    env.pop("OMP_NUM_THREADS", None)  # the trainer picks cores / ranks (torchrun would force 1)
    if threads or ranks > 1:
        env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // ranks))
    command = launcher + ["--dataset", "synthetic", "--steps", str(steps), "--output-dir", out,
                          "--resume", "none", "--warmup-steps", "1", "--checkpoint-every", "0", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, out: str) -> dict:
    """Wait for a run; return median tokens/s (after warm-up), first-step seconds, peak MiB."""
    output, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{' '.join(process.args)} exited {process.returncode}:\n{output[-3000:]}")
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    steady = rows[min(3, len(rows) - 1):]
    return {"tps": statistics.median(r["tokens_per_sec"] for r in steady),
            "first_s": rows[0]["step_time_s"], "step_s": statistics.median(r["step_time_s"] for r in steady),
            "mem": max(r["mem_peak_mib"] for r in rows)}


def train_run(args: list[str], ranks: int, steps: int, threads: int | None = None) -> dict:
    """One training run via the CLI, measured (see ``finish``)."""
    with tempfile.TemporaryDirectory() as out:
        return finish(launch(args, ranks, steps, threads, out), out)


def independent_pair(args: list[str], steps: int) -> dict:
    """Two one-thread processes training at once with no communication between them, each on
    half the default global batch (16): the most a dp=2 run could reach on this machine's shared
    cores and memory. Tokens/s add up; the other figures are the first process's."""
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        half_batch = ["--global-batch-size", "8"]
        started = [(launch(args + half_batch, 1, steps, 1, out), out) for out in (first, second)]
        runs = [finish(process, out) for process, out in started]
    return {**runs[0], "tps": sum(run["tps"] for run in runs)}


def table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n{title}")
    print("".join(f"{h:>14}" if i else f"{h:<34}" for i, h in enumerate(header)))
    for row in rows:
        print("".join(f"{v:>14.2f}" if isinstance(v, float) else (f"{v:>14}" if i else f"{v:<34}")
                      for i, v in enumerate(row)))


def rounds_of(configs: dict[str, tuple[list[str], int, int | None]], steps: int, rounds: int) -> dict[str, list[dict]]:
    """Train every config (CLI args, ranks, threads) once per round, in turn: {name: [run per round]}.
    Ranks given as ``INDEPENDENT`` run ``independent_pair`` instead.

    This machine's speed drifts by several percent over minutes, so a ratio is taken between
    runs of the same round (``ratio``) and the median over rounds reported, rather than
    comparing runs minutes apart."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (args, ranks, threads) in configs.items():
            runs[name].append(independent_pair(args, steps) if ranks == INDEPENDENT
                              else train_run(args, ranks, steps, threads))
    return runs


def ratio(runs: dict[str, list[dict]], name: str, base: str) -> float:
    """The median over rounds of run ``name``'s tokens/s over run ``base``'s in the same round."""
    return statistics.median(a["tps"] / b["tps"] for a, b in zip(runs[name], runs[base]))


def median_tps(runs: list[dict]) -> float:
    return statistics.median(run["tps"] for run in runs)


def rounds_note(rounds: int) -> str:
    return f"median of {rounds} rounds" if rounds > 1 else "one round"


def data_parallel(steps: int, rounds: int) -> None:
    configs = {"1 process (all cores)": ([], 1, None), "1 process, 1 thread": ([], 1, 1),
               "2 processes, no communication": ([], INDEPENDENT, 1),
               "dp=2 fsdp": (["--mesh", "dp=2"], 2, None),
               "dp=2 fsdp, a unit per block": (["--mesh", "dp=2", "--fsdp-unit-params", "0"], 2, None),
               "dp=2 hsdp (--dp-shard 1)": (["--mesh", "dp=2", "--dp-mode", "hsdp", "--dp-shard", "1"], 2, None),
               "dp=2 replicate": (["--mesh", "dp=2", "--dp-mode", "replicate"], 2, None)}
    runs = rounds_of(configs, steps, rounds)
    base, single = "1 process (all cores)", "1 process, 1 thread"
    rows = [(name, median_tps(runs[name]), ratio(runs, name, base), ratio(runs, name, single)) for name in configs]
    table(f"1. data parallel (debug model, global batch 16, seq 128; {rounds_note(rounds)})",
          ("run", "tokens/s", "x 1 proc", "x 1 thread"), rows)


def checkpointing(steps: int, model_args: str, seq_len: int, batch: int) -> None:
    common = ["--model-args", model_args, "--seq-len", str(seq_len), "--global-batch-size", str(batch)]
    runs = {mode: train_run(common + ["--activation-checkpoint", mode], 1, steps)
            for mode in ("none", "full", "selective")}
    none = runs["none"]
    rows = [(mode, r["mem"], r["mem"] / none["mem"], r["tps"], r["tps"] / none["tps"]) for mode, r in runs.items()]
    table(f"2. activation checkpointing ({model_args}, seq {seq_len}, batch {batch})",
          ("mode", "peak MiB", "x none", "tokens/s", "x none"), rows)


def compiling(steps: int, rounds: int, configs: list[tuple[str, list[str], int]]) -> None:
    """Each config (name, CLI args, ranks) eager and with --compile, in turn for ``rounds`` rounds."""
    rows = []
    for name, args, ranks in configs:
        runs = rounds_of({"eager": (args, ranks, None), "compiled": (args + ["--compile"], ranks, None)},
                         steps, rounds)
        compile_s = statistics.median(run["first_s"] - run["step_s"] for run in runs["compiled"])
        rows.append((name, median_tps(runs["eager"]), median_tps(runs["compiled"]), ratio(runs, "compiled", "eager"),
                     compile_s))
    table(f"3. torch.compile per block ({rounds_note(rounds)})",
          ("config", "eager tok/s", "compiled", "x eager", "compile s"), rows)


def experts(repeats: int, sizes: list[tuple[int, int, int, int]]) -> None:
    from models.moe.layer import grouped_matmul, looped_matmul

    rows = []
    for n_experts, dim, hidden, tokens in sizes:
        generator = torch.Generator().manual_seed(0)
        counts = torch.bincount(torch.randint(0, n_experts, (tokens,), generator=generator), minlength=n_experts)
        ends = counts.cumsum(0).to(torch.int32)
        x = torch.randn(tokens, dim, generator=generator, requires_grad=True)
        w1, w3 = (torch.randn(n_experts, dim, hidden, generator=generator, requires_grad=True) for _ in range(2))
        w2 = torch.randn(n_experts, hidden, dim, generator=generator, requires_grad=True)
        times = {}
        for name, matmul in (("loop", looped_matmul), ("grouped", grouped_matmul)):
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = matmul(torch.nn.functional.silu(matmul(x, w1, ends)) * matmul(x, w3, ends), w2, ends)
                out.backward(torch.ones_like(out))
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples) * 1e3
        rows.append((f"E={n_experts} dim={dim} hidden={hidden} T={tokens}", times["loop"], times["grouped"],
                     times["loop"] / times["grouped"]))
    table("4. MoE experts forward+backward (SwiGLU, 3 projections)", ("size", "loop ms", "grouped ms", "speedup"),
          rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every row once with tiny sizes (seconds, not minutes)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    if args.smoke:
        data_parallel(steps=4, rounds=1)
        checkpointing(4, "n_layers=2,max_seq_len=128", 64, 4)
        compiling(4, 1, [("debug", [], 1)])  # the tp=2 row's compiled blocks: test_lean_step
        experts(2, [(4, 32, 32, 64)])
        return
    data_parallel(steps=30, rounds=3)
    checkpointing(8, "dim=256,n_layers=8,ffn_dim=768,max_seq_len=1024", 1024, 4)
    compiling(20, 3, [("debug (dim 128, seq 128, batch 16)", [], 1),
                      ("dim 256, 8 layers, seq 512, batch 8",
                       ["--model-args", "dim=256,n_layers=8,ffn_dim=768,max_seq_len=512", "--seq-len", "512",
                        "--global-batch-size", "8"], 1),
                      ("debug, tp=2 (2 ranks)", ["--mesh", "tp=2"], 2),
                      ("debug, dp=2 fsdp (2 ranks)", ["--mesh", "dp=2"], 2)])
    experts(20, [(8, 128, 128, 4096), (8, 512, 1024, 8192), (64, 512, 256, 8192)])


if __name__ == "__main__":
    main()
