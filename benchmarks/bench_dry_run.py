"""The dry run: how close its memory is to a real run's, and what it says about real sizes.

    python benchmarks/bench_dry_run.py            # accuracy at 1-2 ranks, then 8B/70B/405B/Mixtral meshes (~40 min)
    python benchmarks/bench_dry_run.py --smoke    # one accuracy row and one small simulation

1. Accuracy: a real run on gloo (1 or 2 CPU processes, a dim-512 model) against its dry run.
   "measured" is the peak of every tensor storage alive during the real run's second step, as
   torch's MemTracker counts it on rank 0; "predicted" is ``python -m train --dry-run`` of the
   same flags. Collective bytes per mesh dim are compared too (equal, except expert parallel's
   all-to-all: the dry run routes evenly, the real run as its router decides).
2. Real sizes, one simulated rank per pipeline role (bf16 compute, as on CUDA): parameters,
   gradients, optimizer state, activations and peak, collective bytes per step by mesh dim, and
   how long the simulation took here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]
sys.path[:0] = PACKAGES

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WIDE = ["--model", "debug", "--model-args", "dim=512,n_heads=8,n_kv_heads=4,ffn_dim=1536,n_layers=2,vocab_size=4096",
        "--dataset", "synthetic", "--seq-len", "256", "--global-batch-size", "4"]
FOUR_LAYERS = ["--model-args", "dim=512,n_heads=8,n_kv_heads=4,ffn_dim=1536,n_layers=4,vocab_size=4096"]
MOE = ["--model", "debug-moe", "--dtype", "bfloat16", "--model-args",
       "dim=512,n_heads=8,n_kv_heads=4,moe_ffn_dim=512,n_layers=2,vocab_size=4096"]
ACCURACY = [("1 rank", "", 1, []), ("dp=2 FSDP", "dp=2", 2, []),
            ("dp=2 replicate", "dp=2", 2, ["--dp-mode", "replicate"]), ("tp=2", "tp=2", 2, []),
            ("cp=2 ring", "cp=2", 2, []),
            ("tp=2 bf16 selective", "tp=2", 2, ["--dtype", "bfloat16", "--activation-checkpoint", "selective"]),
            ("pp=2 1F1B", "pp=2", 2, FOUR_LAYERS),
            ("pp=2 interleaved", "pp=2", 2, [*FOUR_LAYERS, "--pp-schedule", "interleaved-1f1b"]),
            ("ep=2 bf16 MoE", "ep=2", 2, MOE)]
INTERLEAVED = ["--pp-schedule", "interleaved-1f1b"]
FULL = ["--activation-checkpoint", "full"]
SIZES = [
    ("llama3-8b", 8, "dp=8", 8192, 8, []),
    ("llama3-8b", 64, "dp=8,tp=8", 8192, 64, []),
    ("llama3-70b", 256, "dp=4,tp=8,pp=8", 8192, 256, [*INTERLEAVED, *FULL]),
    ("llama3-70b", 512, "dp=8,tp=8,pp=8", 8192, 512, INTERLEAVED),
    ("llama3-70b", 512, "dp=8,tp=8,pp=8", 8192, 512, [*INTERLEAVED, *FULL]),
    ("llama3-8b", 64, "cp=8,tp=8", 131072, 1, ["--model-args", "max_seq_len=131072", *FULL]),
    ("mixtral-8x7b", 64, "dp=8,ep=8", 8192, 64, FULL),
    ("llama3-405b", 2048, "dp=16,tp=8,pp=16", 8192, 2048, [*INTERLEAVED, *FULL]),
]
GIB = 2**30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_rank(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    """One rank of the real run: two steps, the second tracked; rank 0 writes peak and collectives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    from train.config import parse_config
    from train.dry_run import measure_real_step
    from train.loop import build_trainer

    with tempfile.TemporaryDirectory() as run_dir:
        t = build_trainer(parse_config([*argv, "--output-dir", run_dir, "--checkpoint-every", "0"]))
        measured = measure_real_step(t)
        t.batches.close()
    if rank == 0:
        Path(out).write_text(json.dumps(measured))
    dist.destroy_process_group()


def measured(mesh: str, world: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "measured.json")
        argv = [*WIDE, "--mesh", mesh, "--device", "cpu", *extra]
        mp.start_processes(_measure_rank, args=(world, free_port(), argv, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def dry_run(world: int, argv: list[str]) -> tuple[list[dict], float]:
    """The reports of ``python -m train --dry-run`` (one per pipeline role) and the seconds it took."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "train", "--dry-run", "--world-size", str(world),
                                 "--output-dir", out, *argv], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(PACKAGES)})
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"dry run failed: {result.stderr.strip()[-2000:]}")
        return json.loads((Path(out) / "dry_run.json").read_text())["ranks"], seconds


def accuracy(cases) -> None:
    print("| mesh | measured MiB | predicted MiB | predicted / measured | collective bytes |")
    print("|---|---|---|---|---|")
    for name, mesh, world, extra in cases:
        real = measured(mesh, world, extra)
        report = dry_run(world, [*WIDE, "--mesh", mesh, "--device", "cpu", *extra, "--dry-run-ranks", "0"])[0][0]
        peak = report["memory_bytes"]["peak"]
        same = "equal" if report["collectives"] == real["collectives"] else \
            ", ".join(f"{dim} {report['collectives'][dim] / nbytes - 1:+.2%}" for dim, nbytes in
                      real["collectives"].items() if dim in report["collectives"])
        print(f"| {name} | {real['peak'] / 2**20:.1f} | {peak / 2**20:.1f} | {peak / real['peak']:.3f} | {same} |",
              flush=True)


def sizes(cases) -> None:
    print("| model | ranks | mesh | seq | batch | rank (stages) | params GiB | grads GiB | optimizer GiB "
          "| activations GiB | peak GiB | collectives per step | simulated in s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, world, mesh, seq, batch, extra in cases:
        argv = ["--model", model, "--mesh", mesh, "--seq-len", str(seq), "--global-batch-size", str(batch), *extra]
        reports, seconds = dry_run(world, argv)
        for r in reports:  # one per pipeline role
            m = r["memory_bytes"]
            comms = ", ".join(f"{dim} {b / GIB:.1f}" for dim, b in r["collectives"].items())
            print(f"| {model} | {world} | {mesh} {' '.join(extra)} | {seq} | {batch} "
                  f"| {r['rank']} ({','.join(map(str, r['stages']))}) | {m['params'] / GIB:.2f} "
                  f"| {m['grads'] / GIB:.2f} | {m['optimizer'] / GIB:.2f} | {m['activations'] / GIB:.2f} "
                  f"| {m['peak'] / GIB:.2f} | {comms} GiB | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one accuracy row and the debug model at dp=8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accuracy(ACCURACY[1:2] if args.smoke else ACCURACY)
    print()
    sizes([("debug", 8, "dp=8", 128, 8, [])] if args.smoke else SIZES)


if __name__ == "__main__":
    main()
