"""config.json <-> MoEConfig for the MoE Hugging Face families Meshtron computes exactly.

    model_type   class                 what it adds to the Llama decoder
    mixtral      MixtralForCausalLM    MoE: softmax router, renormalized top-k, no shared expert
    qwen3_moe    Qwen3MoeForCausalLM   MoE like Mixtral with norm_topk_prob either way, dense first
                                       layers (mlp_only_layers), q/k norms

Attention, norms and RoPE map as in the dense families (``models.llama.hf_config``); this module
adds the router and experts' fields, and refuses what these classes do not compute (a shared
expert, sigmoid scores, an expert bias).
"""

from __future__ import annotations

import torch

from ..llama import hf_config as dense
from .config import MoEConfig

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def model_type_of(config: MoEConfig) -> str:
    """The HF model_type ``config`` exports as: its ``family`` field, else Qwen3-MoE with q/k norms,
    Mixtral without."""
    if config.family:
        return config.family
    return "qwen3_moe" if config.qk_norm else "mixtral"


# ---- reading config.json ----------------------------------------------------------------

def from_hf_config(hf: dict) -> MoEConfig:
    """The MoEConfig of a Mixtral or Qwen3-MoE config.json dict; ValueError naming the field we cannot
    honour and what would fix it."""
    family = hf["model_type"]
    routing = _mixtral_fields(hf) if family == "mixtral" else _qwen3_moe_fields(hf)
    config = MoEConfig(**dense.decoder_fields(hf, family), family=family, **routing)
    config.validate()
    return dense.keep_family_if_needed(config, model_type_of)


def _mixtral_fields(hf: dict) -> dict:
    dense.require(hf, "router_jitter_noise", 0.0, "routing is deterministic")
    width = hf["intermediate_size"]  # no layer is dense: ffn_dim is set to the experts' width
    return dict(ffn_dim=width, moe_ffn_dim=width, n_experts=hf.get("num_local_experts", 8),
                top_k=hf.get("num_experts_per_tok", 2), aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                norm_topk_prob=True, n_shared_experts=0, n_dense_layers=0, bias_update_rate=0.0)


def _qwen3_moe_fields(hf: dict) -> dict:
    layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense_listed = set(hf.get("mlp_only_layers") or [])
    sparse = [i for i in range(layers) if i not in dense_listed and (i + 1) % step == 0]
    n_dense = layers - len(sparse)
    if sparse != list(range(n_dense, layers)):
        raise ValueError(f"config.json's mlp_only_layers={sorted(dense_listed)} / decoder_sparse_step={step} make "
                         f"layers {[i for i in range(layers) if i not in sparse]} dense; Meshtron keeps dense only "
                         f"the first layers (mlp_only_layers=[0..k-1], decoder_sparse_step=1)")
    return dict(ffn_dim=hf["intermediate_size"], moe_ffn_dim=hf["moe_intermediate_size"],
                n_experts=hf.get("num_experts") or hf.get("num_local_experts", 128),
                top_k=hf.get("num_experts_per_tok", 8),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), n_dense_layers=n_dense,
                aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), n_shared_experts=0,
                bias_update_rate=0.0)


# ---- writing config.json ----------------------------------------------------------------

def export_mismatches(config: MoEConfig) -> list[str]:
    """Why transformers' class for ``model_type_of(config)`` would not compute what ``config`` does ([] if
    it would)."""
    family = model_type_of(config)
    checks = [
        (config.score_func == "softmax", f"score_func={config.score_func!r} (HF routers use softmax)"),
        (config.norm_topk_prob or family != "mixtral", "norm_topk_prob=False (Mixtral renormalizes the top-k)"),
        (config.n_shared_experts == 0, f"n_shared_experts={config.n_shared_experts} ({family} has none)"),
        (config.n_dense_layers == 0 or family == "qwen3_moe", f"n_dense_layers={config.n_dense_layers} "
                                                              f"(every Mixtral layer is MoE)"),
        (config.bias_update_rate == 0, f"bias_update_rate={config.bias_update_rate} (no expert bias in {family})"),
    ]
    return dense.decoder_mismatches(config, family) + [reason for ok, reason in checks if not ok]


def to_hf_config(config: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict with which transformers builds the same model as its family's own class
    (``config`` already checked by ``export_mismatches``)."""
    family = model_type_of(config)
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, **dense.decoder_json(config, dtype),
           **dense.window_json(config, family), "num_experts_per_tok": config.top_k,
           "router_aux_loss_coef": config.aux_loss_coef, "output_router_logits": False}
    if family == "mixtral":
        out.update(intermediate_size=config.moe_ffn_dim, num_local_experts=config.n_experts, router_jitter_noise=0.0)
    else:
        out.update(intermediate_size=config.ffn_dim, moe_intermediate_size=config.moe_ffn_dim,
                   num_experts=config.n_experts, norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=list(range(config.n_dense_layers)))
    return out
