"""Weight initialization per rank: tiles of the rank's own shards vs drawing every full parameter.

    python benchmarks/bench_init.py            # llama3-1b and llama3-8b at dp=8, llama3-70b at dp=8,tp=8
    python benchmarks/bench_init.py --smoke    # debug model at dp=4: checks that it runs

One process plays rank 0 of the whole world with torch's fake process-group backend (no peer
exists; the collectives return at once, and initialization issues none): it builds the model
on the meta device, shards it as training would (FSDP over dp, Colwise/Rowwise over tp),
allocates only rank 0's shards on the CPU and fills them

  - tiled: ``models.init.init_weights``, which draws only the 32 x 1024 tiles the shards touch;
  - full draw (what every rank did before): each whole parameter drawn with one generator,
    then cut to the shard (``distribute_tensor`` with ``src_data_rank=None``, no collective).

Both on one thread (``torch.set_num_threads(1)``), as a rank's share of a busy host. The full
draw of a big model takes minutes, so it is timed on the model's parameters in order until
``--baseline-values`` values have been drawn, and the rest extrapolated at the measured rate
(the "measured" column says how much of the model it timed).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from core.mesh import MeshShape, build_mesh  # noqa: E402
from core.tensor_parallel import local_tensor  # noqa: E402
from models.init import constant_init, copy_full_value_, init_std, init_weights, parameter_seed  # noqa: E402
from models.parallelize import ParallelOptions, materialize, shard_module  # noqa: E402
from models.registry import build_model, get_config  # noqa: E402

CASES = [("llama3-1b", "dp=8", 8), ("llama3-8b", "dp=8", 8), ("llama3-70b", "dp=8,tp=8", 64)]
SMOKE_CASES = [("debug", "dp=4", 4), ("debug", "dp=2,tp=2", 4)]


def rank_zero_model(model_name: str, mesh: str, world: int) -> tuple[torch.nn.Module, int]:
    """Rank 0's shards of the model on ``mesh`` (allocated, not initialized) and the model's n_layers."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    config = get_config(model_name)
    with torch.device("meta"):
        model = build_model(config)
    shard_module(model, build_mesh(MeshShape.parse(mesh).resolve(world), "cpu", None), ParallelOptions())
    materialize(model, torch.device("cpu"))
    return model, config.n_layers


def full_draw_seconds(model: torch.nn.Module, n_layers: int, budget: int) -> tuple[float, float]:
    """(seconds to fill the shards by drawing whole parameters, share of the model's values timed);
    past ``budget`` values the time is extrapolated at the rate measured so far."""
    total = sum(p.shape.numel() for p in model.parameters())
    seconds, timed = 0.0, 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if timed >= budget:
                break
            std = init_std(name, n_layers)
            start = time.perf_counter()
            if std is None:
                full = torch.full(param.shape, constant_init(name))
            else:
                generator = torch.Generator().manual_seed(parameter_seed(0, name))
                full = torch.randn(param.shape, generator=generator).mul_(std)
            copy_full_value_(param, full)  # cut to the shard (distribute_tensor, no collective)
            seconds += time.perf_counter() - start
            timed += param.shape.numel()
            del full
    return seconds * total / timed, timed / total


def measure(model_name: str, mesh: str, world: int, budget: int) -> dict:
    model, n_layers = rank_zero_model(model_name, mesh, world)
    try:
        local = sum(local_tensor(p).numel() for p in model.parameters())
        start = time.perf_counter()
        init_weights(model, n_layers, seed=0)
        tiled = time.perf_counter() - start
        full, share = full_draw_seconds(model, n_layers, budget)
    finally:
        dist.destroy_process_group()
    return {"model": model_name, "mesh": mesh, "local": local, "tiled": tiled, "full": full, "share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the debug model on 4 ranks: checks that it runs")
    parser.add_argument("--baseline-values", type=float, default=3e9,
                        help="values the full-draw baseline draws before it extrapolates")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cases = SMOKE_CASES if args.smoke else CASES
    print("| model | mesh | rank 0 holds | tiled init s | full draw s | measured | full / tiled |")
    print("|---|---|---|---|---|---|---|")
    for model_name, mesh, world in cases:
        r = measure(model_name, mesh, world, int(args.baseline_values))
        print(f"| {r['model']} | {mesh} | {r['local'] / 1e6:,.1f}M | {r['tiled']:.2f} | {r['full']:.2f} | "
              f"{100 * r['share']:.0f}% | {r['full'] / r['tiled']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
