"""Tiled initialization (``models.init``): every rank's shards are cuts of one full value, the
same on every mesh, and a rank draws only the tiles its shards touch."""

import pytest
import torch
from rank_harness import run_on_ranks


def shards_against_the_full_values(mesh: str, model_name: str) -> dict:
    """On this rank: parameters whose local shard differs from the cut of the full initial value,
    and the tiles drawn by ``init_weights`` against the tiles of the whole model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    import models.init as init
    from core.mesh import MeshShape, build_mesh
    from models.parallelize import ParallelOptions, materialize, shard_module
    from models.registry import build_model, get_config

    world = torch.distributed.get_world_size()
    config = get_config(model_name)
    with torch.device("meta"):
        model = build_model(config)
    shard_module(model, build_mesh(MeshShape.parse(mesh).resolve(world), "cpu", None), ParallelOptions())
    materialize(model, torch.device("cpu"))
    drawn = []
    original = init.tile_seed
    init.tile_seed = lambda param_seed, tile: drawn.append(tile) or original(param_seed, tile)
    try:
        init.init_weights(model, config.n_layers, seed=5)
    finally:
        init.tile_seed = original
    differ, all_tiles = [], 0
    for name, param in model.named_parameters():
        full = init.initial_value(name, param.shape, config.n_layers, seed=5)
        if isinstance(param, DTensor):
            expected = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local = param.to_local()
        else:
            expected, local = full, param
        if not torch.equal(local, expected):
            differ.append(name)
        if init.init_std(name, config.n_layers) is not None:
            tile = init.tile_shape(param.dim())
            all_tiles += torch.Size(-(-s // t) for s, t in zip(param.shape, tile)).numel()
    return {"differ": differ, "drawn": len(drawn), "all": all_tiles}


@pytest.mark.parametrize("mesh, world, model", [
    ("dp=2,tp=2", 4, "debug"),      # FSDP over tensor parallel: _StridedShard rows, Shard(1) columns
    ("dp=3", 3, "debug"),           # uneven shards (512 rows over 3 ranks: 171, 171, 170)
    ("ep=2,dp=2", 4, "debug-moe"),  # experts split over ep, then FSDP inside each expert group
])
def test_every_shard_is_a_cut_of_the_full_value_and_draws_only_its_tiles(mesh, world, model):
    results = run_on_ranks(shards_against_the_full_values, world, mesh, model)
    for rank, result in enumerate(results):
        assert result["differ"] == [], f"rank {rank}: shards differ from the full value: {result['differ']}"
    # Every tile is drawn by some rank; a rank draws about 1/world of them (a tile on a shard
    # boundary by both neighbours; the debug model's 128 columns make tp's column split 1 tile).
    assert sum(r["drawn"] for r in results) >= results[0]["all"]
    assert max(r["drawn"] for r in results) <= 0.6 * results[0]["all"], [r["drawn"] for r in results]


def test_the_full_value_is_its_tiles_and_has_the_right_scale():
    import models.init as init

    shape = torch.Size([70, 2100])  # 3 x 3 tiles, the last row and column of tiles clipped
    full = init.initial_value("layers.0.attention.wq.weight", shape, n_layers=4, seed=1)
    rows, cols = torch.arange(32, 64), torch.arange(2048, 2100)  # tile (1, 2) alone
    part = init.draw_held_values("layers.0.attention.wq.weight", shape, [rows, cols], init.INIT_STD, seed=1)
    assert torch.equal(part, full[32:64, 2048:2100])
    assert abs(full.std().item() - init.INIT_STD) < 1e-3
    assert not torch.equal(full, init.initial_value("layers.0.attention.wq.weight", shape, 4, seed=2))
    assert not torch.equal(full[:32, :1024], full[32:64, :1024]), "two tiles drew the same values"
    assert torch.equal(init.initial_value("layers.0.ffn_norm.weight", torch.Size([8]), 4, 1), torch.ones(8))
