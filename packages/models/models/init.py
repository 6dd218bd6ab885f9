"""Mesh-invariant weight initialization whose cost per rank follows its shard, not the model.

A parameter's initial value is cut into fixed *tiles*: blocks of ``TILE`` = 32 rows x 1024
columns over its last two dims (one index of every leading dim, e.g. one expert), clipped at
the edges. Each tile is drawn from its own generator, seeded by (run seed, parameter name,
tile index). The tile grid depends only on the parameter's global shape, so
``layers.3.attention.wq.weight`` gets the same values whatever the mesh, the pipeline cut or
the order parameters were created in (Meshtron's promise), and a rank draws only the tiles
its own shard touches:

    wq.weight [4096, 4096], FSDP over dp=8: rank r holds rows [512 r, 512 (r+1)):
    16 x 4 tiles of 32 x 1024, 1/8 of the draws (before: the whole 4096 x 4096, then cut).

Why tiles rather than one generator per parameter, skipped ahead to the shard: torch's CPU
generator (Mersenne Twister) cannot jump ahead, and a tensor-parallel shard of columns is not
one contiguous run of the parameter's values anyway. Why 32 x 1024: small enough that a shard
of a few dozen rows (FSDP over hundreds of ranks) wastes little of its tiles, big enough that
the per-tile cost (a generator and its seeding, ~20 us) is small next to drawing 32k values;
drawing tiles measured as fast as one big ``randn`` (both ~150-250M values/s on one core).

Nothing here communicates: which global rows and columns a rank holds follows from the
DTensor's placements alone (``held_indices``).
"""

from __future__ import annotations

import itertools
import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from core.tensor_parallel import local_tensor

INIT_STD = 0.02
TILE = (32, 1024)  # rows x columns of one tile over a parameter's last two dims


def parameter_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (``hash()`` is salted per process, crc32 is not)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def tile_seed(param_seed: int, tile: int) -> int:
    """The seed of tile number ``tile`` (row-major over the tile grid) of one parameter."""
    return (param_seed * 0x9E3779B1 + tile) % (2**63)


def tile_shape(ndim: int) -> tuple[int, ...]:
    """The tile of an ``ndim``-dimensional parameter: 32 x 1024 over the last two dims, one index of
    the others; a vector's tiles hold as many values as a matrix's."""
    if ndim == 1:
        return (TILE[0] * TILE[1],)
    return (1,) * (ndim - 2) + TILE


def init_std(name: str, n_layers: int) -> float | None:
    """The standard deviation of parameter ``name``'s normal draw; None for a constant (``constant_init``).

    Projections that write into the residual stream (``wo``, ``w2``, the experts' ``w2``) get
    0.02/sqrt(2*n_layers) so the residual's variance does not grow with depth (GPT-2's rule);
    every other weight N(0, 0.02). Experts ``[n_experts, ...]`` are one parameter: an
    expert-parallel rank holds some experts, and draws only their tiles.
    """
    if constant_init(name) is not None:
        return None
    return INIT_STD / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight", "w2")) else INIT_STD


def constant_init(name: str) -> float | None:
    """The constant parameter ``name`` starts at: 1 for norm weights (q/k norms too), 0 for biases;
    None for a random draw."""
    if name.endswith("norm.weight"):
        return 1.0
    return 0.0 if name.endswith(".bias") else None


def held_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """Per dim of the global tensor, the global indices this rank's local tensor holds, in local
    order (increasing): ``local[i, j] == full[rows[i], cols[j]]``. No communication.

    For a DTensor each dim is found by sharding a small probe the same way: a tensor of the
    global size along that dim holding its indices, and along every other dim just as many
    elements as ranks split it (so every rank keeps at least one). ``distribute_tensor`` with
    ``src_data_rank=None`` cuts it locally, by the same rules (``Shard``, FSDP-over-TP's
    ``_StridedShard``, uneven splits) that cut the parameter.
    """
    shape = param.shape
    if not isinstance(param, DTensor):
        return [torch.arange(size) for size in shape]
    mesh, placements = param.device_mesh, param.placements
    # Shard and _StridedShard have a ``dim`` (the latter is no Shard subclass: is_shard() says False).
    splits = [math.prod(mesh.size(m) for m, p in enumerate(placements) if getattr(p, "dim", None) == d)
              for d in range(len(shape))]
    indices = []
    for dim, size in enumerate(shape):
        if splits[dim] == 1:
            indices.append(torch.arange(size))
            continue
        view = [size if d == dim else 1 for d in range(len(shape))]
        probe = torch.arange(size).view(view).expand([size if d == dim else splits[d] for d in range(len(shape))])
        local = distribute_tensor(probe, mesh, placements, src_data_rank=None).to_local()
        indices.append(local[tuple(slice(None) if d == dim else 0 for d in range(len(shape)))].cpu())
    return indices


def _tile_runs(held: torch.Tensor, tile: int) -> list[tuple[int, slice, torch.Tensor]]:
    """Group one dim's held indices (increasing) by tile: (tile index, slice of local positions,
    offsets inside the tile)."""
    tile_ids, counts = torch.unique_consecutive(held // tile, return_counts=True)
    runs, start = [], 0
    for tile_index, count in zip(tile_ids.tolist(), counts.tolist()):
        runs.append((tile_index, slice(start, start + count), held[start:start + count] - tile_index * tile))
        start += count
    return runs


def draw_held_values(name: str, shape: torch.Size, held: list[torch.Tensor], std: float, seed: int) -> torch.Tensor:
    """The float32 CPU values of the part of parameter ``name`` (global ``shape``) at ``held``
    (per dim, global indices in increasing order): each tile that part touches is drawn once."""
    tile = tile_shape(len(shape))
    grid = [-(-size // t) for size, t in zip(shape, tile)]
    out = torch.empty([len(h) for h in held])
    param_seed = parameter_seed(seed, name)
    for runs in itertools.product(*(_tile_runs(h, t) for h, t in zip(held, tile))):
        tile_index = [run[0] for run in runs]
        extent = [min(t, size - i * t) for i, t, size in zip(tile_index, tile, shape)]
        generator = torch.Generator().manual_seed(tile_seed(param_seed, _flat_index(tile_index, grid)))
        values = torch.randn(extent, generator=generator)
        for dim, (_, _, offsets) in enumerate(runs):
            if len(offsets) < extent[dim]:
                values = values.index_select(dim, offsets)
        out[tuple(run[1] for run in runs)] = values
    return out.mul_(std)


def _flat_index(index: list[int], grid: list[int]) -> int:
    flat = 0
    for i, size in zip(index, grid):
        flat = flat * size + i
    return flat


def initial_value(name: str, shape: torch.Size, n_layers: int, seed: int) -> torch.Tensor:
    """The whole float32 CPU initial value of parameter ``name`` (what every mesh's shards add up to)."""
    std = init_std(name, n_layers)
    if std is None:
        return torch.full(shape, constant_init(name))
    return draw_held_values(name, shape, [torch.arange(size) for size in shape], std, seed)


# Buffers that start at zero: the MoE router's expert bias.
ZERO_BUFFERS = ("expert_bias",)


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """Give every buffer its initial value (after ``to_empty`` they hold garbage). No communication."""
    for name, buffer in model.named_buffers():
        if not name.endswith(ZERO_BUFFERS):
            raise ValueError(f"no initial value for buffer {name!r}: add a rule in models.init")
        buffer.zero_()


@torch.no_grad()
def init_weights(model: nn.Module, n_layers: int, seed: int) -> None:
    """Fill every parameter of ``model`` (sharded or not, any device) with its initial value, and
    every buffer. A DTensor parameter gets its local shard, drawn tile by tile (module docstring).
    No communication."""
    init_buffers(model)
    for name, param in model.named_parameters():
        init_parameter_(param, name, n_layers, seed)


@torch.no_grad()
def init_parameter_(param: torch.Tensor, name: str, n_layers: int, seed: int) -> None:
    """Fill ``param`` (sharded or not) with the initial value of the parameter called ``name``
    (a pipeline's replica of a tied embedding takes the embedding's). No communication."""
    local = local_tensor(param)
    std = init_std(name, n_layers)
    if std is None:
        local.fill_(constant_init(name))
    else:
        local.copy_(draw_held_values(name, param.shape, held_indices(param), std, seed))


@torch.no_grad()
def copy_full_value_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a parameter's full (unsharded) value into it; a DTensor keeps only its local shard.

    ``src_data_rank=None``: every rank holds the same full tensor and cuts its own piece,
    so no scatter (no collective) is needed.
    """
    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)
