"""config.json <-> LlamaConfig for the dense Hugging Face families Meshtron computes exactly.

    model_type   class                 what it adds to the Llama decoder
    llama        LlamaForCausalLM      RoPE scaling (Llama 3.1+: "llama3"), tied output (3.2 1B/3B)
    mistral      MistralForCausalLM    a sliding window (only where it never binds: max_seq_len <= it)
    qwen2        Qwen2ForCausalLM      biases on q/k/v (Qwen2, Qwen2.5)
    qwen3        Qwen3ForCausalLM      RMSNorm of each q/k head, head_dim != hidden/heads, tied (<= 4B)

Every field of a config.json that changes the math is either mapped or refused by name
(``from_hf_config``); an exported config is the family's own (``to_hf_config``), so
``AutoModelForCausalLM`` builds the family's class. The model_type of a config is inferred
from its features (``model_type_of``), or, where they do not tell (Mistral without a window
computes what Llama does), named by its ``family`` field. The attention, norm and RoPE fields
(``decoder_fields`` / ``decoder_json``) are shared with the MoE families (``models.moe.hf_config``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import LlamaConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
QK_NORM = ("qwen3", "qwen3_moe")
WINDOWED = ("mistral", "mixtral")  # sliding_window is live; the Qwen families gate it by use_sliding_window
_ROPE_KEYS = {  # rope_parameters keys we read, per scaling type (others are refused)
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "attention_factor", "truncate"},
}


def model_type_of(config: LlamaConfig) -> str:
    """The HF model_type ``config`` exports as: its ``family`` field, else the one its features need."""
    if config.family:
        return config.family
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window else "llama"


def keep_family_if_needed(config, model_type_of) -> LlamaConfig:
    """``config`` with its ``family`` field cleared where its features already say it (round trips stay equal)."""
    inferred = replace(config, family="")
    return inferred if model_type_of(inferred) == config.family else config


# ---- reading config.json ----------------------------------------------------------------

def from_hf_config(hf: dict) -> LlamaConfig:
    """The LlamaConfig of a dense family's config.json dict (``hf["model_type"]`` one of ``ARCHITECTURES``);
    ValueError naming the field we cannot honour and what would fix it."""
    family = hf.get("model_type", "llama")
    config = LlamaConfig(**decoder_fields(hf, family), family=family, ffn_dim=hf["intermediate_size"])
    config.validate()
    return keep_family_if_needed(config, model_type_of)


def require(hf: dict, field: str, needed, why: str) -> None:
    if field in hf and hf[field] is not None and hf[field] != needed:
        raise ValueError(f"config.json has {field}={hf[field]!r}; Meshtron needs {field}={needed!r} ({why})")


def decoder_fields(hf: dict, family: str) -> dict:
    """LlamaConfig fields shared by every family (all but the feed-forward's)."""
    require(hf, "hidden_act", "silu", "its feed-forward is SwiGLU")
    require(hf, "mlp_bias", False, "its projections have no bias")
    require(hf, "attention_bias", False, "only Qwen2's q/k/v biases are implemented")
    require(hf, "partial_rotary_factor", 1.0, "RoPE rotates every channel of a head")
    if family not in WINDOWED:
        require(hf, "use_sliding_window", False, "attention is over the whole sequence")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    fields = dict(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
                  n_kv_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=hf.get("max_position_embeddings", 2048),
                  attention_head_dim=0 if head_dim * heads == dim else head_dim,
                  qkv_bias=family == "qwen2", qk_norm=family in QK_NORM,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **rope_fields(hf))
    window = hf.get("sliding_window") if family in WINDOWED else None
    if window:
        fields.update(sliding_window=window, max_seq_len=min(fields["max_seq_len"], window))
    return fields


def rope_fields(hf: dict) -> dict:
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


# ---- writing config.json ----------------------------------------------------------------

def export_mismatches(config: LlamaConfig) -> list[str]:
    """Why transformers' class for ``model_type_of(config)`` would not compute what ``config`` does ([] if
    it would)."""
    return decoder_mismatches(config, model_type_of(config))


def decoder_mismatches(config: LlamaConfig, family: str) -> list[str]:
    """Where ``config``'s attention differs from what HF model_type ``family`` computes."""
    checks = [
        (config.qkv_bias == (family == "qwen2"), f"qkv_bias={config.qkv_bias} (only qwen2 has q/k/v biases)"),
        (config.qk_norm == (family in QK_NORM), f"qk_norm={config.qk_norm} (only qwen3 and qwen3_moe have q/k norms)"),
        (not config.sliding_window or family in WINDOWED, f"sliding_window={config.sliding_window} (only mistral "
                                                          f"and mixtral have one)"),
    ]
    return [reason for ok, reason in checks if not ok]


def to_hf_config(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict with which transformers builds the same model as its family's own class
    (``config`` already checked by ``export_mismatches``)."""
    family = model_type_of(config)
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, **decoder_json(config, dtype),
           **window_json(config, family), "intermediate_size": config.ffn_dim}
    if family == "llama":
        out["mlp_bias"] = False
    return out


def window_json(config: LlamaConfig, family: str) -> dict:
    """The sliding-window fields of ``family``'s config.json: live in Mistral's and Mixtral's, switched off
    (``use_sliding_window``) in the others'."""
    if family in WINDOWED:
        return {"sliding_window": config.sliding_window or None}
    return {"use_sliding_window": False, "sliding_window": None}


def decoder_json(config: LlamaConfig, dtype: torch.dtype) -> dict:
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
        "rope_parameters": rope_json(config),
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }


def rope_json(config: LlamaConfig) -> dict:
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
