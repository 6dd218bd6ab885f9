"""Gradient norm and clipping over the whole mesh.

Every rank holds a different piece of the gradient: a tensor-parallel shard, an FSDP
shard, an expert shard, a pipeline stage's layers. The global norm is
sqrt(sum of squares of every element once), so each piece's sum of squares is added up
over exactly the mesh dims it is *sharded* on (summing over dims it is replicated on
would count it several times), then over pipeline stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.tensor import DTensor

from core.tensor_parallel import local_tensor


def _layout_order(layout: tuple) -> str:
    """A (mesh, placements) layout as a string that sorts the same on every rank ("" for plain tensors)."""
    mesh, placements = layout
    if mesh is None:
        return ""
    with unset_fake_temporarily():  # the rank map is a real tensor, also inside a dry run's fake-tensor mode
        ranks = mesh.mesh.flatten().tolist()
    return f"{mesh.mesh_dim_names}|{ranks}|{placements}"


def _reduced_square_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements of ``grads`` (same layout), summed over their sharded mesh dims.

    Collective: one all-reduce per sharded mesh dim; none for plain tensors.
    """
    local = [local_tensor(g) for g in grads]
    square_sum = torch.nn.utils.get_total_norm([t.float() for t in local], foreach=True).pow(2)
    first = grads[0]
    if not isinstance(first, DTensor):
        return square_sum
    if any(p.is_partial() for p in first.placements):
        raise RuntimeError("gradient still Partial (unreduced) when computing its norm")
    # Sum over every dim the gradient is split on: Shard and FSDP+TP's _StridedShard
    # (which is not a Shard subclass), i.e. anything that is not Replicate.
    # One all-reduce per dim rather than DTensor's Partial -> Replicate: FSDP over dp x cp of
    # expert-parallel weights gives a ("dp_cp", "ep") mesh whose dims are not in the root
    # mesh's order, and DTensor refuses to merge such dims into one reduction.
    mesh = first.device_mesh
    for dim, placement in enumerate(first.placements):
        if not placement.is_replicate() and mesh.size(dim) > 1:
            dist.all_reduce(square_sum, group=mesh.get_group(dim))
    return square_sum


def global_grad_norm(params: list[nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (a float32 scalar, equal on every rank).

    Collective: one all-reduce per distinct gradient layout, then one over ``pp_group``.
    """
    # Grads with the same mesh and placements share one reduction. DeviceMesh hashes cheaply
    # (cached); the string that orders the groups alike on every rank is built once per group,
    # not per gradient (it reads the whole mesh's rank list, too slow to do per parameter).
    by_layout: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            layout = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else (None, ())
            by_layout.setdefault(layout, []).append(p.grad)
    device = next((p.device for p in params), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device)
    for layout in sorted(by_layout, key=_layout_order):
        total = total + _reduced_square_sum(by_layout[layout]).to(device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None,
                    replicas: list[nn.Parameter] = ()) -> torch.Tensor:
    """Scale all gradients (of ``params`` and ``replicas``) so their global norm is at most ``max_norm``;
    return the norm before clipping. ``replicas``: copies of a parameter held and counted on another
    pipeline stage (a tied output), scaled like it but not counted twice."""
    norm = global_grad_norm(params, pp_group)
    params = [*params, *replicas]
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # stays on the device: no host sync
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
    return norm
