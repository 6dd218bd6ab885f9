"""Tensor parallel for an MoE layer: each tp rank routes its own sequence-parallel slice of the tokens."""

from __future__ import annotations

from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInputOutput


def token_split_plan(prefix: str) -> dict[str, ParallelStyle]:
    """Run the module at ``prefix`` on this tp rank's sequence slice, with plain local tensors (MoE).

    Sequence parallel already leaves each tp rank its own [b, s/tp, dim] slice of the
    residual stream; the module takes that slice as a plain tensor and returns its output
    for the same slice, as the residual stream holds it (a plain local tensor): no
    communication in or out. Its parameters stay plain and whole on
    every tp rank, so their gradients are per-rank partial sums, added up over tp by the
    trainer (``ModelFamily.tp_partial_parameters``). Every token is computed once,
    on one tp rank: no tp-fold redundant expert compute or all-to-all.
    """
    return {prefix: PrepareModuleInputOutput(
        input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_input=True,
        output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True)}
