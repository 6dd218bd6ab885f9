"""Tensor parallel helpers around ``parallelize_module`` and ``loss_parallel``.

The plans themselves live with the models (``models.plans``): which Linear is split by
columns or rows is a property of the architecture. What lives here is model-agnostic:
applying a plan only when tp > 1, and the loss that works on vocab-sharded logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
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


def to_local_scalar(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor scalar (the loss under ``loss_parallel``) as a plain tensor."""
    return value.to_local() if isinstance(value, DTensor) else value


@torch.no_grad()
def reduce_partial_gradients(params: list[nn.Parameter]) -> None:
    """Turn ``Partial`` gradients into the parameter's own layout.

    Under sequence parallel a replicated weight (the RMSNorm scales) sees only its rank's
    slice of the sequence, so autograd leaves its gradient as a ``Partial`` DTensor: a
    per-rank partial sum. Clipping and the optimizer need the real gradient, so each is
    all-reduced over tp here (one all-reduce per such parameter).
    """
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
            p.grad = grad.redistribute(grad.device_mesh, p.placements)
