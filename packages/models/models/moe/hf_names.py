"""Where the MoE families store a layer's router and experts in Hugging Face checkpoints.

Everything else maps as in the dense families (``models.llama.hf_names``). One of our expert
weights [E, a, b] is stored as E per-expert tensors [b, a] (what ``save_pretrained`` writes;
``from_pretrained`` fuses them on load)::

    Mixtral    model.layers.i.block_sparse_moe.gate.weight, ...experts.j.{w1,w3,w2}.weight
    Qwen3-MoE  model.layers.i.mlp.gate.weight,              ...experts.j.{gate,up,down}_proj.weight

Ours are stored transposed (``x @ w1[e]``, [E, dim, hidden]) so expert parallel can cut them on dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..llama import hf_names as dense
from .config import MoEConfig
from .hf_config import model_type_of


@dataclass(frozen=True)
class MoELayout:
    """Where an MoE family stores a layer's router and experts, under ``model.layers.{i}.{block}``."""

    block: str
    expert_weights: dict[str, str]  # our w1/w3/w2 -> its per-expert projection name


MOE_LAYOUTS = {
    "mixtral": MoELayout("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}),
    "qwen3_moe": MoELayout("mlp", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
}
EXPERTS = "feed_forward.experts."


def hf_names(name: str, config: MoEConfig) -> list[str]:
    """The HF names parameter ``name`` is stored under in the checkpoints of ``config``'s family: one, or
    ``n_experts`` for an expert weight (``layers.0.feed_forward.experts.w1`` ->
    ``model.layers.0.block_sparse_moe.experts.{0..E-1}.w1.weight``). ValueError if it has none."""
    model_type = model_type_of(config)
    in_layer, layout = dense.layer_name(name), MOE_LAYOUTS.get(model_type)
    if in_layer and layout:
        prefix, rest = in_layer
        if rest == "feed_forward.router.gate.weight":
            return [f"{prefix}.{layout.block}.gate.weight"]
        if rest.removeprefix(EXPERTS) in layout.expert_weights:
            weight = layout.expert_weights[rest.removeprefix(EXPERTS)]
            return [f"{prefix}.{layout.block}.experts.{j}.{weight}.weight" for j in range(config.n_experts)]
    return dense.shared_names(name, model_type)


def is_expert_weight(name: str) -> bool:
    return f".{EXPERTS}" in name


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
