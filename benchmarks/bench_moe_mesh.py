"""The MoE model on a big mesh vs one process: same run? how fast? how balanced?

    python benchmarks/bench_moe_mesh.py                                   # the full 5-D mesh, 32 ranks
    python benchmarks/bench_moe_mesh.py --mesh dp=2,cp=2,tp=2,ep=2        # 16 ranks, no pipeline

Trains ``debug-moe`` for a few steps (parity settings of tests/test_parity_moe.py) on one
process and on ``--mesh``, checks that losses, first-step gradients and final weights
match (the same assertion as the parity tests), and prints per-step losses and wall times. Too heavy
for the test suite on a 2-core CPU (32 ranks take ~230 MiB each and minutes to start), hence a script.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

from core.mesh import MeshShape  # noqa: E402
from core.ranks import run_on_ranks  # noqa: E402
from train.parity import MOE, assert_same_run, merge_ranks, run_steps  # noqa: E402


def timed(world: int, mesh: str, overrides: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    result = merge_ranks(run_on_ranks(run_steps, world, mesh, overrides, timeout=1800))
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="dp=2,pp=2,cp=2,tp=2,ep=2")
    parser.add_argument("--model", default="debug-moe")
    args = parser.parse_args()
    shape = MeshShape.parse(args.mesh)
    if shape.pp > 1 and importlib.util.find_spec("core.pipeline") is None:
        sys.exit(f"--mesh {args.mesh} needs pipeline parallel (core.pipeline), which this checkout does not have yet")
    overrides = {**MOE, "model": args.model}
    reference, single_s = timed(1, "", overrides)
    other, mesh_s = timed(shape.world_size, args.mesh, overrides)
    print(f"one process: {single_s:.1f}s wall (incl. start)  |  {args.mesh} ({shape.world_size} ranks): {mesh_s:.1f}s")
    for step, (a, b) in enumerate(zip(reference["losses"], other["losses"]), 1):
        print(f"step {step}: loss {a:.6f} vs {b:.6f} (rel diff {abs(a - b) / abs(a):.1e})")
    assert_same_run(reference, other)
    print("same run: losses, first-step gradients and final weights match")


if __name__ == "__main__":
    main()
