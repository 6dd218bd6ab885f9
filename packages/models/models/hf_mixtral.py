"""Hugging Face Mixtral names and config.json <-> Meshtron's MoE, for Mixtral-style routing only.

transformers' ``MixtralSparseMoeBlock`` routes like our ``Router`` with
``score_func="softmax"`` and ``norm_topk_prob=True``: softmax over all experts in float32,
top-k, the k weights renormalized to sum to 1. It has no shared expert, no dense layers
and no expert bias, so only MoE configs without those map to it (``mixtral_mismatches``).

On disk (what ``MixtralForCausalLM.save_pretrained`` writes and ``from_pretrained`` fuses
into ``mlp.experts.gate_up_proj`` / ``down_proj`` while loading), per layer i::

    model.layers.i.block_sparse_moe.gate.weight          [E, dim]     = our router.gate.weight
    model.layers.i.block_sparse_moe.experts.j.w1.weight  [hidden, dim] = our experts.w1[j].T  (gate)
    model.layers.i.block_sparse_moe.experts.j.w3.weight  [hidden, dim] = our experts.w3[j].T  (up)
    model.layers.i.block_sparse_moe.experts.j.w2.weight  [dim, hidden] = our experts.w2[j].T  (down)

Ours are stored transposed (``x @ w1[e]``, [E, dim, hidden]) so expert parallel can cut
them on dim 0; attention, norms, embedding and output are named as in Llama.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hf_llama import ATTENTION_AND_NORMS, OUR_LAYER, TOP_LEVEL, check_head_dim, decoder_fields, decoder_kwargs
from .moe import MoEConfig

_EXPERT_WEIGHTS = ("w1", "w2", "w3")  # same names on both sides; ours hold all experts, transposed


def mixtral_mismatches(config: MoEConfig) -> list[str]:
    """Why ``config`` routes or computes differently from transformers' Mixtral ([] if it does not)."""
    checks = [
        (config.score_func == "softmax", f"score_func={config.score_func!r} (Mixtral: softmax)"),
        (config.norm_topk_prob, "norm_topk_prob=False (Mixtral renormalizes the top-k weights)"),
        (config.n_shared_experts == 0, f"n_shared_experts={config.n_shared_experts} (Mixtral has none)"),
        (config.n_dense_layers == 0, f"n_dense_layers={config.n_dense_layers} (every Mixtral layer is MoE)"),
        (config.bias_update_rate == 0, f"bias_update_rate={config.bias_update_rate} (Mixtral has no expert bias)"),
    ]
    return [reason for ok, reason in checks if not ok]


def check_mixtral_compatible(config: MoEConfig) -> None:
    """ValueError naming every reason no transformers class computes what ``config``'s MoE computes."""
    reasons = mixtral_mismatches(config)
    if reasons:
        raise ValueError("no transformers class matches this MoE config: only Mixtral-style MoE (softmax router, "
                         "renormalized top-k, no shared expert, no dense layers, no expert bias) can be "
                         "exported or imported; this one has " + "; ".join(reasons))


# ---- names ------------------------------------------------------------------------------

def hf_names(name: str, n_experts: int) -> list[str]:
    """The HF names stored for the Meshtron parameter ``name``: one, or ``n_experts`` for an expert weight.

    ``layers.0.feed_forward.experts.w1`` -> ``model.layers.0.block_sparse_moe.experts.{0..E-1}.w1.weight``.
    ValueError if ``name`` is not a parameter of a Mixtral-compatible model.
    """
    if name in TOP_LEVEL:
        return [TOP_LEVEL[name]]
    match = OUR_LAYER.match(name)
    if match:
        prefix, rest = f"model.layers.{match.group(1)}", match.group(2)
        weight = rest.removeprefix("feed_forward.experts.")
        if rest in ATTENTION_AND_NORMS:
            return [f"{prefix}.{ATTENTION_AND_NORMS[rest]}"]
        if rest == "feed_forward.router.gate.weight":
            return [f"{prefix}.block_sparse_moe.gate.weight"]
        if weight in _EXPERT_WEIGHTS:
            return [f"{prefix}.block_sparse_moe.experts.{j}.{weight}.weight" for j in range(n_experts)]
    raise ValueError(f"parameter {name!r} has no Hugging Face Mixtral name")


def is_expert_weight(name: str) -> bool:
    return ".feed_forward.experts." in name


def split_for_hf(name: str, tensor: Tensor) -> list[Tensor]:
    """Our full tensor -> the tensors stored under ``hf_names(name)``: experts [E, a, b] -> E x [b, a]."""
    if is_expert_weight(name):
        return [expert.T for expert in tensor.unbind(0)]
    return [tensor]


def join_from_hf(name: str, tensors: list[Tensor]) -> Tensor:
    """Inverse of ``split_for_hf``: E x [b, a] -> [E, a, b] for experts, else the one tensor."""
    if is_expert_weight(name):
        return torch.stack([t.T for t in tensors])
    return tensors[0]


# ---- config.json ------------------------------------------------------------------------

def to_hf_config(config: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict ``transformers.MixtralForCausalLM`` needs; ValueError if it routes differently."""
    check_mixtral_compatible(config)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **decoder_fields(config, dtype),
        "intermediate_size": config.moe_ffn_dim,
        "num_local_experts": config.n_experts,
        "num_experts_per_tok": config.top_k,
        "router_aux_loss_coef": config.aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
    }


def from_hf_config(hf: dict) -> MoEConfig:
    """The MoEConfig of an HF Mixtral config.json dict; ValueError naming what we cannot represent.

    ``ffn_dim`` (the width of dense layers, of which Mixtral has none) is set to the experts' width.
    """
    if hf.get("sliding_window") is not None:
        raise ValueError(f"config.json has sliding_window={hf['sliding_window']}; Meshtron's attention "
                         f"is full causal attention only")
    width = hf["intermediate_size"]
    config = MoEConfig(**decoder_kwargs(hf, {}), ffn_dim=width, moe_ffn_dim=width,
                       n_experts=hf.get("num_local_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
                       aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                       score_func="softmax", norm_topk_prob=True, n_shared_experts=0, n_dense_layers=0,
                       bias_update_rate=0.0)
    check_head_dim(hf, config)
    config.validate()
    return config


# Fields that change a Mixtral-compatible MoE's weights or routing, beyond the decoder's
# (the routing flags are fixed by check_mixtral_compatible). ffn_dim is left out: no
# layer of it is dense. aux_loss_coef only steers training: a run may fine-tune with its own.
MATCHING_FIELDS = ("n_experts", "top_k", "moe_ffn_dim")
