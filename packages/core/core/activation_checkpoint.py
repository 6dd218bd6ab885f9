"""Activation checkpointing, applied to transformer blocks from outside.

It wraps a block's ``forward`` on the instance, so parameter names (``layers.3.attention.wq.weight``),
FSDP units, TP plans and pipeline splitting see the same modules as before.

``--activation-checkpoint``:
  * ``none``: autograd keeps every intermediate of every block until its backward.
  * ``full``: keep only each block's input; its backward first reruns the block's forward.
    The least memory (one [b, s, dim] tensor per block plus one block's intermediates),
    at the price of a second forward: about +1/3 of the step's compute.
  * ``selective``: op-level. Keep the outputs of the expensive ops (matmuls, attention, and
    collectives, so the recompute issues no second all-gather/reduce-scatter of TP or
    all-to-all of EP) and recompute the cheap element-wise ones: RMSNorm's float32 copies,
    rotary's float32 cos/sin products, SiLU and the SwiGLU product. These are a large share
    of a block's activation bytes (several float32 [b, s, dim] and [b, s, ffn] tensors) but a
    negligible share of its FLOPs, so memory drops at a few percent of throughput.
    Chosen over "every other block" because its cost does not depend on the layer count
    and it composes with pipeline stages of any depth.

The block's forward runs inside ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``:
it works with DTensor parameters (TP, FSDP2), any number of keyword arguments (document
masking) and with torch.compile (``models.parallelize.checkpoint_and_compile``). Recompute
replays the random state, and the model has no dropout, so losses are bitwise those of
``none``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")


def _expensive_ops() -> set:
    """Ops whose outputs ``selective`` keeps: matmuls, the fused attention kernels and collectives."""
    aten, funcol = torch.ops.aten, torch.ops._c10d_functional
    return {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_cudnn_attention.default,
            funcol.all_gather_into_tensor.default, funcol.reduce_scatter_tensor.default,
            funcol.all_reduce.default, funcol.all_to_all_single.default, funcol.wait_tensor.default}


def _keep_expensive(expensive: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in expensive else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable, mode: str, policy: Callable) -> Callable:
    """``forward`` run under activation checkpointing of ``mode`` ("full" or "selective", which
    keeps the outputs ``policy`` says; its context pair is made fresh per call, as the API requires)."""
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)} \
        if mode == "selective" else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def is_recomputing() -> bool:
    """Whether this code runs as a recompute (a checkpointed forward replayed during backward).

    Forwards with side effects (the MoE load statistics) must skip them then, or they would
    count twice. Recompute is the only forward that runs inside an autograd graph task.
    """
    return torch._C._current_graph_task_id() != -1


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> None:
    """Checkpoint each block of ``blocks`` as ``mode`` says (see module docstring). No communication."""
    check_mode(mode)
    if mode == "none":
        return
    policy = functools.partial(_keep_expensive, _expensive_ops())
    for block in blocks:
        block.forward = _checkpointed(block.forward, mode, policy)


def check_mode(mode: str) -> None:
    """ValueError naming the choices unless ``mode`` is one of ``AC_MODES``."""
    if mode not in AC_MODES:
        raise ValueError(f"--activation-checkpoint {mode!r}: use one of {', '.join(AC_MODES)}")
