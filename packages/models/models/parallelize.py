"""Apply the parallelisms to a model (or one pipeline stage of it) on a ParallelMesh.

Order matters and follows what each API expects:
  1. tensor parallel (``parallelize_module``) turns Linear weights into tp-sharded DTensors,
  2. FSDP2 (``fully_shard``) then shards those again over the dense-gradient mesh, making
     2-D DTensors (FSDP dim outer, tp inner).
The model may still be on the meta device: nothing is allocated until ``to_empty``.
"""

from __future__ import annotations

import torch
from torch import nn

from core.data_parallel import apply_fsdp
from core.mesh import ParallelMesh
from core.tensor_parallel import apply_tensor_parallel

from .llama import Transformer
from .plans import tensor_parallel_plan


def parallelize(model: Transformer, pm: ParallelMesh, dp_mode: str = "fsdp", param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> None:
    """Shard ``model`` in place over ``pm``: TP/SP on ``pm["tp"]``, then FSDP on ``pm["dense_grad"]``.

    ``reshard_after_forward=False`` keeps FSDP parameters gathered from the forward to the
    backward (a pipeline stage runs many microbatches per step; see ``train.pipelined``).
    With ``dp_mode="replicate"`` parameters stay whole on every data-parallel rank and the
    trainer sums gradients itself (``core.data_parallel.all_reduce_gradients``).
    """
    apply_tensor_parallel(model, pm["tp"], tensor_parallel_plan(model))
    if dp_mode == "fsdp" and pm.size("dense_grad") > 1:
        apply_fsdp(model, pm["dense_grad"], list(model.layers.values()), param_dtype=param_dtype,
                   reshard_after_forward=reshard_after_forward)
    elif dp_mode not in ("fsdp", "replicate"):
        raise ValueError(f"unknown dp_mode {dp_mode!r}: use 'fsdp' or 'replicate'")


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device (sharded) model's storage on ``device``; values come from models.init."""
    model.to_empty(device=device)
