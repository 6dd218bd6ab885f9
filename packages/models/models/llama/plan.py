"""Tensor/sequence-parallel plan for the Llama decoder (and the dense parts of the MoE one).

Layouts along a block, tp ranks holding [b, s/tp, dim] slices of the residual stream (SP):

    x [b, s/tp, dim]  --attention_norm (SequenceParallel: norm each slice)-->
      PrepareModuleInput: all-gather the sequence -> Replicate [b, s, dim]
      wq/wk/wv ColwiseParallel -> local heads [b, s, dim/tp]     (no communication)
      attention on local heads                                   (no communication)
      wo RowwiseParallel -> reduce-scatter over the sequence -> [b, s/tp, dim]
    same for the feed-forward: w1/w3 Colwise, w2 Rowwise.

Embedding: vocab-parallel (Rowwise on [vocab, dim]) with output reduce-scattered into
sequence slices. Output: Colwise -> logits sharded on vocab, consumed by loss_parallel.
Each block therefore costs one all-gather and one reduce-scatter per sublayer, the same
bytes as Megatron's all-reduce but with activations stored at 1/tp.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from .model import FeedForward, Transformer, attention_layers


def check_tensor_parallel(config, tp: int) -> None:
    """Raise ValueError (before any collective) when the model cannot be split over ``tp`` ranks."""
    for what, value in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                        ("ffn_dim", config.ffn_dim), ("vocab_size", config.vocab_size), ("dim", config.dim)):
        if tp > 1 and value % tp:
            raise ValueError(f"model {what}={value} is not divisible by tp={tp}: choose tp dividing {what} "
                             f"(e.g. tp=1, 2 or {_largest_divisor_up_to(value, tp)}) or a model whose {what} "
                             f"is a multiple of {tp}")


def _largest_divisor_up_to(value: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if value % d == 0)


def block_plan(prefix: str, block: nn.Module) -> dict[str, ParallelStyle]:
    """TP/SP styles for one TransformerBlock whose FQN is ``prefix``."""
    plan: dict[str, ParallelStyle] = {
        f"{prefix}.attention_norm": SequenceParallel(),
        f"{prefix}.attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        f"{prefix}.attention.wq": ColwiseParallel(),
        f"{prefix}.attention.wk": ColwiseParallel(),
        f"{prefix}.attention.wv": ColwiseParallel(),
        f"{prefix}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        f"{prefix}.ffn_norm": SequenceParallel(),
    }
    if isinstance(block.feed_forward, FeedForward):
        plan.update({
            f"{prefix}.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                          desired_input_layouts=(Replicate(),)),
            f"{prefix}.feed_forward.w1": ColwiseParallel(),
            f"{prefix}.feed_forward.w3": ColwiseParallel(),
            f"{prefix}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    else:  # an MoE layer brings its own plan (experts are split by ep, not tp)
        plan.update(block.feed_forward.tensor_parallel_plan(f"{prefix}.feed_forward"))
    return plan


def tensor_parallel_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """The full plan for a model or a pipeline stage of it (absent parts are skipped)."""
    plan: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    for name, block in model.layers.items():
        plan.update(block_plan(f"layers.{name}", block))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    return plan


def decoding_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """Tensor parallel for generation (Megatron's layout, no sequence parallel): activations stay
    whole on every rank, q/k/v and w1/w3 are split by columns (heads, hidden units), wo and w2 by
    rows with their outputs all-reduced, the vocabulary of the embedding split with its output
    all-reduced, and the logits all-gathered. Norms (q/k norms too) and MoE layers stay whole on
    every rank (an MoE layer then computes every token on every rank: correct, not split)."""
    plan: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    for name, block in model.layers.items():
        prefix = f"layers.{name}"
        plan.update({f"{prefix}.attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")})
        plan[f"{prefix}.attention.wo"] = RowwiseParallel()
        if isinstance(block.feed_forward, FeedForward):
            plan.update({f"{prefix}.feed_forward.w1": ColwiseParallel(), f"{prefix}.feed_forward.w3": ColwiseParallel(),
                         f"{prefix}.feed_forward.w2": RowwiseParallel()})
    return plan


def head_norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The q/k norms' weights (Qwen3): whole on every tp rank, each applying them to its own heads,
    so their gradients are partial sums over tp (``ModelFamily.tp_partial_parameters``)."""
    return [p for a in attention_layers(module) if a.q_norm is not None
            for p in (*a.q_norm.parameters(), *a.k_norm.parameters())]
