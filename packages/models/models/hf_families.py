"""config.json <-> Meshtron configs for the Hugging Face families Meshtron computes exactly.

    model_type   class                 what it adds to the Llama decoder
    llama        LlamaForCausalLM      RoPE scaling (Llama 3.1+: "llama3"), tied output (3.2 1B/3B)
    mistral      MistralForCausalLM    a sliding window (only where it never binds: max_seq_len <= it)
    qwen2        Qwen2ForCausalLM      biases on q/k/v (Qwen2, Qwen2.5)
    qwen3        Qwen3ForCausalLM      RMSNorm of each q/k head, head_dim != hidden/heads, tied (<= 4B)
    mixtral      MixtralForCausalLM    MoE: softmax router, renormalized top-k, no shared expert
    qwen3_moe    Qwen3MoeForCausalLM   MoE like Mixtral with norm_topk_prob either way, dense first
                                       layers (mlp_only_layers), q/k norms

Every field of a config.json that changes the math is either mapped or refused by name
(``from_hf_config``); an exported config is the family's own (``to_hf_config``), so
``AutoModelForCausalLM`` builds the family's class. The family of a Meshtron config is
inferred from its features (``family_of``), or, where they do not tell (Mistral without a
window computes what Llama does), named by its ``family`` field.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .llama import LlamaConfig
from .moe import MoEConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
_QK_NORM = ("qwen3", "qwen3_moe")
_WINDOWED = ("mistral", "mixtral")  # sliding_window is live; the Qwen families gate it by use_sliding_window
_ROPE_KEYS = {  # rope_parameters keys we read, per scaling type (others are refused)
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "attention_factor", "truncate"},
}


def family_of(config: LlamaConfig) -> str:
    """The HF model_type ``config`` exports as: its ``family`` field, else the one its features need."""
    if config.family:
        return config.family
    if isinstance(config, MoEConfig):
        return "qwen3_moe" if config.qk_norm else "mixtral"
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window else "llama"


# ---- reading config.json ----------------------------------------------------------------

def from_hf_config(hf: dict) -> LlamaConfig:
    """The Meshtron config (an MoEConfig for the MoE families) of an HF config.json dict;
    ValueError naming the field we cannot honour and what would fix it."""
    family = hf.get("model_type", "llama")
    if family not in ARCHITECTURES:
        raise ValueError(f"config.json has model_type {family!r}; Meshtron supports {', '.join(ARCHITECTURES)}")
    fields = dict(_decoder_fields(hf, family), family=family)
    if family == "mixtral":
        config = MoEConfig(**fields, **_mixtral_fields(hf))
    elif family == "qwen3_moe":
        config = MoEConfig(**fields, **_qwen3_moe_fields(hf))
    else:
        config = LlamaConfig(**fields, ffn_dim=hf["intermediate_size"])
    config.validate()
    inferred = replace(config, family="")
    return inferred if family_of(inferred) == family else config  # family is kept only where features differ


def _require(hf: dict, field: str, needed, why: str) -> None:
    if field in hf and hf[field] is not None and hf[field] != needed:
        raise ValueError(f"config.json has {field}={hf[field]!r}; Meshtron needs {field}={needed!r} ({why})")


def _decoder_fields(hf: dict, family: str) -> dict:
    """LlamaConfig fields shared by every family (all but the feed-forward's)."""
    _require(hf, "hidden_act", "silu", "its feed-forward is SwiGLU")
    _require(hf, "mlp_bias", False, "its projections have no bias")
    _require(hf, "attention_bias", False, "only Qwen2's q/k/v biases are implemented")
    _require(hf, "partial_rotary_factor", 1.0, "RoPE rotates every channel of a head")
    if family not in _WINDOWED:
        _require(hf, "use_sliding_window", False, "attention is over the whole sequence")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    fields = dict(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
                  n_kv_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=hf.get("max_position_embeddings", 2048),
                  attention_head_dim=0 if head_dim * heads == dim else head_dim,
                  qkv_bias=family == "qwen2", qk_norm=family in _QK_NORM,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_fields(hf))
    window = hf.get("sliding_window") if family in _WINDOWED else None
    if window:
        fields.update(sliding_window=window, max_seq_len=min(fields["max_seq_len"], window))
    return fields


def _rope_fields(hf: dict) -> dict:
    """LlamaConfig's rope_* fields from ``rope_parameters`` (transformers 5) or ``rope_scaling`` +
    ``rope_theta`` (4.x)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise ValueError(f"config.json uses RoPE scaling {kind!r}; Meshtron implements "
                         f"{', '.join(_ROPE_KEYS)}")
    unknown = sorted(k for k, v in rope.items() if k not in _ROPE_KEYS[kind] and v is not None)
    if unknown:
        raise ValueError(f"config.json's {kind!r} RoPE has {unknown}, which Meshtron does not implement")
    if rope.get("truncate", True) is not True:
        raise ValueError("config.json's yarn RoPE has truncate=false; Meshtron implements truncate=true")
    fields = dict(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                  rope_scaling="none" if kind == "default" else kind)
    optional = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_seq_len",
                "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor",
                "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
                "attention_factor": "rope_attention_factor"}
    fields.update({ours: rope[theirs] for theirs, ours in optional.items() if rope.get(theirs) is not None})
    return fields


def _mixtral_fields(hf: dict) -> dict:
    _require(hf, "router_jitter_noise", 0.0, "routing is deterministic")
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

def export_mismatches(config: LlamaConfig) -> list[str]:
    """Why transformers' class for ``family_of(config)`` would not compute what ``config`` does ([] if it would)."""
    family = family_of(config)
    if family not in ARCHITECTURES:
        return [f"family={family!r} is none of {', '.join(ARCHITECTURES)}"]
    moe = isinstance(config, MoEConfig)
    checks = [
        (moe == (family in MOE_FAMILIES), f"{family} is {'an MoE' if family in MOE_FAMILIES else 'dense'}, "
                                          f"this model is {'an MoE' if moe else 'dense'}"),
        (config.qkv_bias == (family == "qwen2"), f"qkv_bias={config.qkv_bias} (only qwen2 has q/k/v biases)"),
        (config.qk_norm == (family in _QK_NORM), f"qk_norm={config.qk_norm} (only qwen3 and qwen3_moe have q/k norms)"),
        (not config.sliding_window or family in _WINDOWED, f"sliding_window={config.sliding_window} (only mistral "
                                                           f"and mixtral have one)"),
    ]
    if moe:
        checks += [
            (config.score_func == "softmax", f"score_func={config.score_func!r} (HF routers use softmax)"),
            (config.norm_topk_prob or family != "mixtral", "norm_topk_prob=False (Mixtral renormalizes the top-k)"),
            (config.n_shared_experts == 0, f"n_shared_experts={config.n_shared_experts} ({family} has none)"),
            (config.n_dense_layers == 0 or family == "qwen3_moe", f"n_dense_layers={config.n_dense_layers} "
                                                                  f"(every Mixtral layer is MoE)"),
            (config.bias_update_rate == 0, f"bias_update_rate={config.bias_update_rate} (no expert bias in {family})"),
        ]
    return [reason for ok, reason in checks if not ok]


def check_hf_compatible(config: LlamaConfig) -> None:
    """ValueError naming every reason no transformers class computes what ``config``'s model computes."""
    reasons = export_mismatches(config)
    if reasons:
        raise ValueError(f"no transformers class matches this model as {family_of(config)!r}: " + "; ".join(reasons))


def to_hf_config(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict with which transformers builds the same model as its family's own class."""
    check_hf_compatible(config)
    family = family_of(config)
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, **_decoder_json(config, dtype)}
    if family in _WINDOWED:
        out["sliding_window"] = config.sliding_window or None
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    if family == "llama":
        out["mlp_bias"] = False
    if family == "mixtral":
        out.update(intermediate_size=config.moe_ffn_dim, num_local_experts=config.n_experts,
                   num_experts_per_tok=config.top_k, router_aux_loss_coef=config.aux_loss_coef,
                   router_jitter_noise=0.0, output_router_logits=False)
    elif family == "qwen3_moe":
        out.update(intermediate_size=config.ffn_dim, moe_intermediate_size=config.moe_ffn_dim,
                   num_experts=config.n_experts, num_experts_per_tok=config.top_k,
                   norm_topk_prob=config.norm_topk_prob, router_aux_loss_coef=config.aux_loss_coef,
                   decoder_sparse_step=1, mlp_only_layers=list(range(config.n_dense_layers)),
                   output_router_logits=False)
    else:
        out["intermediate_size"] = config.ffn_dim
    return out


def _decoder_json(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """The config.json fields of everything but the feed-forward. The rope base is written both
    ways: ``rope_parameters`` (transformers 5) and ``rope_theta`` (4.x)."""
    return {
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": _rope_json(config),
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _rope_json(config: LlamaConfig) -> dict:
    rope = {"rope_type": "default" if config.rope_scaling == "none" else config.rope_scaling,
            "rope_theta": config.rope_theta}
    if config.rope_scaling != "none":
        rope["factor"] = config.rope_factor
    if config.rope_scaling == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_seq_len)
    if config.rope_scaling == "yarn":
        rope.update(original_max_position_embeddings=config.rope_original_max_seq_len,
                    beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow)
        if config.rope_attention_factor:
            rope["attention_factor"] = config.rope_attention_factor
    return rope
