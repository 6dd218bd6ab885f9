"""Data parallel over the dense-gradient mesh (dp x ep x cp): FSDP2, or replication by FSDP2's twin.

Both are torch's FSDP2 family (``fully_shard``; ``replicate`` keeps whole parameters and
all-reduces gradients), so both apply one mixed-precision recipe: float32 master weights
(and so float32 optimizer state), parameters cast to the compute dtype for the forward and
backward, gradients reduced in float32. On a mesh of one rank they still cast and reduce
nothing: a model that is not data parallel computes by the same recipe.

Gradients are SUMMED over the mesh, never averaged: the trainer already divides each
rank's loss by the number of tokens in the *global* batch, so the sum of the ranks'
gradients is exactly the gradient of the global mean loss, whatever the mesh. (FSDP's
default would divide by the mesh size, which is right only when every rank holds the
same number of tokens and every parameter is reduced over the same group; expert
parameters are reduced over a smaller group, so the mean would be off by ep.)
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# The interface set_custom_reduce_scatter takes, and FSDP's own plain-allocation half of it.
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin
from torch.distributed.tensor import Shard

from core.tensor_parallel import local_tensor


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, blocks: list[nn.Module], param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True, inner_units: list[tuple[nn.Module, DeviceMesh]] = (),
               min_unit_params: int = 0) -> None:
    """ZeRO-3: shard every parameter of ``model`` over ``mesh``: one FSDP unit per block, or per
    run of consecutive blocks that together reach ``min_unit_params`` parameters, + the root.

    A unit pays a fixed price per step whatever its size: a gather before its forward and
    its backward and a reduce-scatter after, each a collective with its latency, hooks and
    copies. Grouping small blocks pays it once per group; the blocks of real models
    (Llama 3 1B: 60M parameters each) are units on their own at any sensible threshold.
    Trailing blocks smaller than that together join the root unit, so a model smaller than
    ``min_unit_params`` is one unit: one all-gather and one reduce-scatter per step.

    Each unit all-gathers its parameters before its forward and reduce-scatters gradients
    after its backward. With ``reshard_after_forward`` a unit frees its gathered
    parameters after its forward and gathers them again for its backward, except where
    that buys nothing: the last unit and the root (embedding, final norm, output), whose
    backward starts right after their forward. Each unit's forward prefetches the next
    unit's all-gather, and each backward the previous one's, so the gathers overlap compute.
    ``param_dtype`` (e.g. bf16) is the compute dtype; gradients are reduced in float32, on gloo
    by ``AllToAllReduceScatter`` (faster there than gloo's own reduce-scatter).
    ``inner_units``: (module, mesh) pairs sharded first over their own mesh (MoE experts
    over the expert-gradient mesh, which may have one rank).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit, unit_mesh in inner_units:
        fully_shard(unit, mesh=unit_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=functools.partial(evenly_split_dim, shards=unit_mesh.size(unit_mesh.ndim - 1)))
    units = group_blocks(blocks, min_unit_params)
    for index, unit in enumerate(units):
        last = index == len(units) - 1
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    _sum_gradients(model, custom_reduce_scatter=_on_gloo(mesh))
    _prefetch_neighbours([unit[0] for unit in units])


def evenly_split_dim(param: nn.Parameter, shards: int) -> Shard | None:
    """FSDP's placement for ``param`` over ``shards`` ranks: its first dim whose local size they
    split evenly (None, FSDP's default Shard(0), when none does).

    For expert weights [E/ep, ., .]: with ep = n_experts each rank keeps one expert, and
    Shard(0) over 8 dp ranks would leave that whole expert on the first and padding on the
    others (all of its memory on one rank, 8x its bytes in every all-gather); Shard(1) splits it.
    """
    for dim, size in enumerate(local_tensor(param).shape):
        if size % shards == 0:
            return Shard(dim)
    return None


def apply_replicate(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
                    inner_units: list[tuple[nn.Module, DeviceMesh]] = ()) -> None:
    """Plain data parallel: every rank keeps whole parameters and the gradients are summed over
    ``mesh`` by one all-reduce per unit after the backward (DDP's algorithm, as torch's FSDP2-based
    ``replicate``), with ``apply_fsdp``'s mixed precision. ``inner_units``: (module, mesh) pairs
    replicated over their own mesh first (MoE experts over the expert-gradient mesh).
    """
    # A private torch module (FSDP2's replicate, checked on torch 2.13): imported where it is
    # used, so that other data-parallel modes do not depend on it.
    from torch.distributed._composable.replicate_with_fsdp import replicate

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit, unit_mesh in inner_units:
        replicate(unit, mesh=unit_mesh, mp_policy=policy)
    replicate(model, mesh=mesh, mp_policy=policy)
    _sum_gradients(model, custom_reduce_scatter=False)


def _on_gloo(mesh: DeviceMesh) -> bool:
    return dist.get_backend(mesh.get_group(mesh.ndim - 1)) == dist.Backend.GLOO


def _sum_gradients(model: nn.Module, custom_reduce_scatter: bool) -> None:
    """Make every FSDP-family unit in ``model`` sum gradients (see module docstring), on gloo
    with ``AllToAllReduceScatter`` where asked."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # gloo has no PREMUL_SUM; this setting is not recursive, hence every module.
            module.set_force_sum_reduction_for_comms(True)
            if custom_reduce_scatter:
                module.set_custom_reduce_scatter(AllToAllReduceScatter())


class AllToAllReduceScatter(DefaultAllocMixin, ReduceScatter):
    """FSDP's gradient reduce-scatter as one ``all_to_all_single`` and a local sum, for gloo.

    Rank r sends chunk j of its flat gradient buffer (``input_tensor``, world x shard
    elements) to rank j and receives every rank's chunk r; summing those gives its shard
    (``output_tensor``). Each rank sends (world-1)/world of the buffer, as a ring
    reduce-scatter does, but gloo's own reduce-scatter is several times slower than this on
    CPU (``benchmarks/bench_step.py`` shows what FSDP gains by it). NCCL keeps its native
    reduce-scatter, which needs no full-size receive buffer.
    """

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: dist.ReduceOp, async_op: bool = False) -> None:
        if op != dist.ReduceOp.SUM or async_op:  # apply_fsdp forces sum reductions; FSDP calls this synchronously
            raise ValueError(f"AllToAllReduceScatter supports a synchronous SUM only, got {op}, async_op={async_op}")
        received = torch.empty_like(input_tensor)
        dist.all_to_all_single(received, input_tensor, group=group)
        torch.sum(received.view(dist.get_world_size(group), -1), dim=0, out=output_tensor)


def group_blocks(blocks: list[nn.Module], min_params: int) -> list[list[nn.Module]]:
    """Consecutive ``blocks`` in groups of at least ``min_params`` parameters. Trailing blocks
    that do not add up to ``min_params`` are in no group: they stay in the root unit."""
    groups, current, size = [], [], 0
    for block in blocks:
        current.append(block)
        size += sum(p.numel() for p in block.parameters())
        if size >= min_params:
            groups.append(current)
            current, size = [], 0
    return groups


def _prefetch_neighbours(units: list[nn.Module]) -> None:
    """Issue unit i+1's all-gather when unit i's forward starts, and unit i-1's when its backward
    does (a unit of several blocks is named by its first: they share one FSDP state)."""
    for earlier, later in zip(units, units[1:]):
        earlier.set_modules_to_forward_prefetch([later])
        later.set_modules_to_backward_prefetch([earlier])


@torch.no_grad()
def all_reduce_gradients(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Plain data parallel: sum every gradient over ``group`` (one all-reduce on a flat buffer).

    Works for plain and DTensor (e.g. tensor-parallel) parameters: each rank reduces its
    local shard, which is replicated across ``group``.
    """
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
