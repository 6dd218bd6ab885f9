"""Meshtron parameter names <-> the tensor names Hugging Face checkpoints store them under.

Every supported family (``models.hf_families``) names attention, norms, embedding and output
as Llama does, so those map one to one (``layers.3.attention.wq.weight`` <->
``model.layers.3.self_attn.q_proj.weight``; biases and q/k norms too) and tensors are copied
unchanged: our ``rotary`` uses HF's "rotate half" convention, so q/k need no permutation.
A dense feed-forward is ``mlp.{gate,up,down}_proj``. The MoE families differ only in where
the router and experts live; one of our expert weights [E, a, b] is stored as E per-expert
tensors [b, a] (what ``save_pretrained`` writes; ``from_pretrained`` fuses them on load)::

    Mixtral    model.layers.i.block_sparse_moe.gate.weight, ...experts.j.{w1,w3,w2}.weight
    Qwen3-MoE  model.layers.i.mlp.gate.weight,              ...experts.j.{gate,up,down}_proj.weight

Ours are stored transposed (``x @ w1[e]``, [E, dim, hidden]) so expert parallel can cut them
on dim 0. A tied output has no name of its own (it is ``tok_embeddings.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

# Meshtron name -> HF name, for everything outside the layers ...
TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ... and, inside ``layers.{i}.`` / ``model.layers.{i}.``: attention and norms (every family) ...
ATTENTION_AND_NORMS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",        # Qwen2
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# ... and a dense feed-forward (every dense layer, also Qwen3-MoE's ``mlp_only_layers``).
DENSE_FFN = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: w2(silu(w1 x) * w3 x)
    "feed_forward.w3.weight": "mlp.up_proj.weight",    #   == down(silu(gate x) * up x)
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MoELayout:
    """Where an MoE family stores a layer's router and experts, under ``model.layers.{i}.{block}``."""

    block: str
    expert_weights: dict[str, str]  # our w1/w3/w2 -> its per-expert projection name


MOE_LAYOUTS = {
    "mixtral": MoELayout("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}),
    "qwen3_moe": MoELayout("mlp", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
}
_EXPERTS = "feed_forward.experts."


def hf_names(name: str, family: str, n_experts: int = 0) -> list[str]:
    """The HF names parameter ``name`` is stored under in ``family``'s checkpoints: one, or
    ``n_experts`` for an expert weight (``layers.0.feed_forward.experts.w1`` ->
    ``model.layers.0.block_sparse_moe.experts.{0..E-1}.w1.weight``). ValueError if it has none."""
    if name in TOP_LEVEL:
        return [TOP_LEVEL[name]]
    match = OUR_LAYER.match(name)
    if match:
        prefix, rest = f"model.layers.{match.group(1)}", match.group(2)
        if rest in ATTENTION_AND_NORMS:
            return [f"{prefix}.{ATTENTION_AND_NORMS[rest]}"]
        if rest in DENSE_FFN:
            return [f"{prefix}.{DENSE_FFN[rest]}"]
        layout = MOE_LAYOUTS.get(family)
        if layout and rest == "feed_forward.router.gate.weight":
            return [f"{prefix}.{layout.block}.gate.weight"]
        if layout and rest.removeprefix(_EXPERTS) in layout.expert_weights:
            weight = layout.expert_weights[rest.removeprefix(_EXPERTS)]
            return [f"{prefix}.{layout.block}.experts.{j}.{weight}.weight" for j in range(n_experts)]
    raise ValueError(f"parameter {name!r} has no Hugging Face {family} name")


def is_expert_weight(name: str) -> bool:
    return f".{_EXPERTS}" in name


def split_for_hf(name: str, tensor: Tensor) -> list[Tensor]:
    """Our full tensor -> the tensors stored under ``hf_names``: experts [E, a, b] -> E x [b, a] (views)."""
    if is_expert_weight(name):
        return [expert.T for expert in tensor.unbind(0)]
    return [tensor]


def join_from_hf(name: str, tensors: list[Tensor]) -> Tensor:
    """Inverse of ``split_for_hf``: E x [b, a] -> [E, a, b] for experts, else the one tensor."""
    if is_expert_weight(name):
        return torch.stack([t.T for t in tensors])
    return tensors[0]
