"""What checksums cost a checkpoint: save and load seconds with and without them, side by side.

    python benchmarks/bench_checkpoint.py [--megabytes 400] [--rounds 3] [--smoke]

One process (the checksum work is per rank: each rank checksums the shards it wrote, and on
load each rank verifies 1/world of the files, so the ratio holds per rank). The state is float32
tensors of ``--megabytes`` in all, in 64 tensors, saved with ``core.checkpoint.Checkpointer``
as the trainer saves them. Rounds alternate with and without checksums; the table shows the
median seconds and the ratio. The save includes DCP's write and fsync; the load with checksums
reads every byte once more (the CRC-32 pass) before DCP reads the tensors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

import torch  # noqa: E402

from core.checkpoint import Checkpointer  # noqa: E402


def state(megabytes: float) -> dict[str, torch.Tensor]:
    per_tensor = int(megabytes * 2**20 / 4 / 64)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per_tensor, generator=generator) for i in range(64)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(tensors: dict[str, torch.Tensor], checksums: bool, folder: Path) -> tuple[float, float]:
    """(save seconds, load seconds) of one checkpoint in ``folder``."""
    saver = Checkpointer(checksums=checksums)
    save = timed(lambda: saver.save(folder, 1, tensors, {"step": 1}))
    targets = {name: torch.empty_like(t) for name, t in tensors.items()}
    load = timed(lambda: Checkpointer().load(folder / "step_00000001", targets))
    assert all(torch.equal(targets[name], t) for name, t in tensors.items())
    return save, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="8 MB, 1 round: checks that it runs")
    args = parser.parse_args()
    megabytes, rounds = (8, 1) if args.smoke else (args.megabytes, args.rounds)
    tensors = state(megabytes)
    times = {True: [], False: []}
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the point
    with tempfile.TemporaryDirectory() as scratch:
        measure(tensors, True, Path(scratch) / "warm-up")  # first-call costs (imports) count in neither column
        for round_ in range(rounds):
            for checksums in (False, True):
                times[checksums].append(measure(tensors, checksums, Path(scratch) / f"{round_}-{checksums}"))
    print(f"checkpoint of {megabytes:g} MB (float32, 64 tensors, one process), median of {rounds} round(s)")
    print(f"{'':<22}{'no checksums':>14}{'CRC-32':>10}{'ratio':>8}")
    for index, what in enumerate(("save s", "load s")):
        plain = statistics.median(t[index] for t in times[False])
        checked = statistics.median(t[index] for t in times[True])
        print(f"{what:<22}{plain:>14.3f}{checked:>10.3f}{checked / plain:>7.2f}x")


if __name__ == "__main__":
    main()
