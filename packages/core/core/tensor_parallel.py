"""Tensor parallel helpers around ``parallelize_module`` and ``loss_parallel``.

The plans themselves live with the model families (``models.llama.plan``): which Linear is split by
columns or rows is a property of the architecture. What lives here is model-agnostic:
applying a plan only when tp > 1, and the loss that works on vocab-sharded logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel, parallelize_module


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """Shard ``module``'s submodules over ``tp_mesh`` as ``plan`` says (no-op when tp == 1).

    Collective: none at setup beyond what ``distribute_tensor`` does for each parameter
    (parameters may still be on the meta device; they are materialized later).
    """
    if tp_mesh.size() > 1:
        parallelize_module(module, tp_mesh, plan)


def wait_for_output(module: nn.Module) -> None:
    """Make ``module`` return a plain tensor where TP would hand on an in-flight collective.

    A TP output hook with ``use_local_output`` returns the reduce-scatter's result as an
    ``AsyncCollectiveTensor`` (waited on by its first use). A ``torch.compile``d block must
    not take one as input: in torch 2.13 the compiled backward then hands DTensor's
    ``Redistribute.backward`` a plain gradient and fails. ``wait_tensor`` waits here, outside
    the compiled region, and keeps the gradient flowing (``AsyncCollectiveTensor.wait()``
    does not: it returns the inner tensor, detached from autograd). No extra communication.
    """
    module.register_forward_hook(
        lambda _module, _args, output: wait_tensor(output) if isinstance(output, AsyncCollectiveTensor) else output)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross entropy, in float32. logits: [b, s, vocab]; labels: [b, s] -> scalar.

    Under tensor parallel the logits are a DTensor sharded on the vocab (``Shard(-1)``)
    and this must run inside ``loss_context(True)``: ``loss_parallel`` then computes the
    softmax across shards with small all-reduces (max and sum-exp over the vocab) instead
    of all-gathering [b, s, vocab] logits. The result is then a replicated DTensor scalar.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def loss_context(tensor_parallel: bool) -> contextlib.AbstractContextManager:
    """``loss_parallel()`` when the logits are vocab-sharded, else a no-op.

    It must enclose the forward *and* the backward of the loss, so the trainer wraps the
    whole step in it.
    """
    return loss_parallel() if tensor_parallel else contextlib.nullcontext()


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor as a plain tensor (a replicated loss under ``loss_parallel``,
    a weight's or gradient's shard); a plain tensor is returned as it is."""
    return value.to_local() if isinstance(value, DTensor) else value


@torch.no_grad()
def reduce_partial_gradients(params: list[nn.Parameter]) -> None:
    """Turn ``Partial`` gradients into the parameter's own layout, with one all-reduce per layout.

    Under sequence parallel a replicated weight (the RMSNorm scales) sees only its rank's
    slice of the sequence, so autograd leaves its gradient as a ``Partial`` DTensor: a
    per-rank partial sum. Clipping and the optimizer need the real gradient. Gradients
    with the same mesh and placements are summed together in one flat buffer (one
    all-reduce per partial mesh dim) instead of one collective per parameter.
    """
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        if _summed_into_replicate(p):
            groups.setdefault((p.grad.device_mesh, p.grad.placements), []).append(p)
        elif isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements):
            p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)  # a rarer layout: DTensor's own way
    for (mesh, placements), group in groups.items():
        locals_ = [p.grad.to_local() for p in group]
        flat = torch.cat([g.reshape(-1) for g in locals_])
        for dim, placement in enumerate(placements):
            if placement.is_partial():
                dist.all_reduce(flat, group=mesh.get_group(dim))
        for p, local, summed in zip(group, locals_, flat.split([g.numel() for g in locals_])):
            p.grad = DTensor.from_local(summed.view_as(local), mesh, p.placements, run_check=False,
                                        shape=p.grad.shape, stride=p.grad.stride())


def _summed_into_replicate(p: nn.Parameter) -> bool:
    """The gradient is a partial sum (Partial("sum")) on mesh dims where the parameter is Replicate,
    and matches the parameter's placements elsewhere: a plain all-reduce of the local tensor fixes it."""
    grad = p.grad
    if not isinstance(grad, DTensor) or not isinstance(p, DTensor):
        return False
    if not any(pl.is_partial() for pl in grad.placements):
        return False
    return all((g.is_partial() and g.reduce_op == "sum" and t.is_replicate()) or (not g.is_partial() and g == t)
               for g, t in zip(grad.placements, p.placements))
