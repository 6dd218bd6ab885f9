"""Throughput and per-rank memory of training state on several meshes, as ratios to one process.

    python benchmarks/bench_meshes.py [--model debug] [--steps 6] [--seq-len 128] [--meshes "dp=2;tp=2;dp=2,tp=2;dp=4"]

For each mesh the same global batch is trained for a few steps (synthetic tokens), and
the script reports tokens/s (median step, first step excluded: it includes warm-up) and
the bytes of parameters + optimizer state that one rank holds. All meshes run in one
invocation, so the ratios compare like with like. On a 2-core CPU the throughput of
several ranks is bound by the cores, not the algorithm; the memory ratios are the point
there (FSDP: ~1/dp; TP: ~1/tp plus the replicated norms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch  # noqa: E402

from core.mesh import MeshShape  # noqa: E402
from core.ranks import run_on_ranks  # noqa: E402
from core.tensor_parallel import local_tensor  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import build_trainer, train_step  # noqa: E402


def local_bytes(tensor: torch.Tensor) -> int:
    local = local_tensor(tensor)
    return local.numel() * local.element_size()


def measure(mesh: str, overrides: dict) -> dict:
    """Run on every rank; return step times and this rank's parameter + AdamW state bytes."""
    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(mesh=mesh, dataset="synthetic", output_dir=out, **overrides))
        times = []
        for _ in range(t.cfg.steps):
            start = time.perf_counter()
            train_step(t)
            times.append(time.perf_counter() - start)
        params = sum(local_bytes(p) for p in t.model.module.parameters())
        optim = sum(local_bytes(v) for state in t.optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.ndim > 0)
    return {"step_s": statistics.median(times[1:]), "state_bytes": params + optim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="debug")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--meshes", default="dp=2;tp=2;dp=2,tp=2;dp=4")
    args = parser.parse_args()
    overrides = dict(model=args.model, steps=args.steps, seq_len=args.seq_len, global_batch_size=args.global_batch_size)
    tokens = args.global_batch_size * args.seq_len
    rows = []
    for mesh in [""] + args.meshes.split(";"):
        results = run_on_ranks(measure, MeshShape.parse(mesh).world_size, mesh, overrides, timeout=1800)
        step_s = max(r["step_s"] for r in results)  # the step ends when the slowest rank is done
        rows.append((mesh or "1 process", len(results), tokens / step_s, max(r["state_bytes"] for r in results)))
    base_tps, base_bytes = rows[0][2], rows[0][3]
    print(f"model={args.model} seq_len={args.seq_len} global_batch={args.global_batch_size} (synthetic tokens)")
    print(f"{'mesh':<14}{'ranks':>6}{'tokens/s':>12}{'x 1 proc':>10}{'state MiB/rank':>16}{'x 1 proc':>10}")
    for mesh, ranks, tps, state in rows:
        print(f"{mesh:<14}{ranks:>6}{tps:>12.0f}{tps / base_tps:>10.2f}"
              f"{state / 2**20:>16.2f}{state / base_bytes:>10.2f}")


if __name__ == "__main__":
    main()
