"""Hugging Face Llama names and config.json <-> Meshtron's dense Llama.

Names map one to one (``layers.3.attention.wq.weight`` <-> ``model.layers.3.self_attn.q_proj.weight``)
and tensors are copied unchanged: our ``rotary`` uses HF's "rotate half" convention, so q/k
need no permutation (tests/test_hf_format.py checks logits against ``transformers``).
The file handling (safetensors, shards, DTensors) lives in ``models.hf_format``.
"""

from __future__ import annotations

import re

import torch

from .llama import LlamaConfig

# Meshtron name -> HF name, for everything outside the layers ...
TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ... and, inside ``layers.{i}.`` / ``model.layers.{i}.``: attention and norms (shared with Mixtral) ...
ATTENTION_AND_NORMS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# ... and the dense feed-forward.
_DENSE_FFN = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: w2(silu(w1 x) * w3 x)
    "feed_forward.w3.weight": "mlp.up_proj.weight",    #   == down(silu(gate x) * up x)
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_IN_LAYER = {**ATTENTION_AND_NORMS, **_DENSE_FFN}
_TOP_LEVEL_BACK = {hf: ours for ours, hf in TOP_LEVEL.items()}
_IN_LAYER_BACK = {hf: ours for ours, hf in _IN_LAYER.items()}
OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ValueError if unknown."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    match = OUR_LAYER.match(name)
    if match and match.group(2) in _IN_LAYER:
        return f"model.layers.{match.group(1)}.{_IN_LAYER[match.group(2)]}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama name (is this an MoE or modified model?)")


def from_hf_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.attention.wq.weight``; ValueError if unknown."""
    if name in _TOP_LEVEL_BACK:
        return _TOP_LEVEL_BACK[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _IN_LAYER_BACK:
        return f"layers.{match.group(1)}.{_IN_LAYER_BACK[match.group(2)]}"
    raise ValueError(f"Hugging Face weight {name!r} has no Meshtron Llama name (biases, MoE, "
                     f"or another architecture are not supported)")


def to_hf_config(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict ``transformers.LlamaForCausalLM`` needs to build the same model.

    The rope base is written both ways: ``rope_parameters`` (transformers 5) and
    ``rope_theta`` (4.x). Our output projection is untied from the embedding.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **decoder_fields(config, dtype),
        "intermediate_size": config.ffn_dim,
        "mlp_bias": False,
    }


def decoder_fields(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """The config.json fields of everything but the feed-forward (Llama and Mixtral share them)."""
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
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _rope_theta(hf: dict) -> float:
    """The rope base of an HF config; ValueError for scaled RoPE (e.g. Llama 3.1's "llama3"), which we lack."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json uses RoPE scaling {kind!r}; Meshtron implements only plain RoPE")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def decoder_kwargs(hf: dict, required: dict) -> dict:
    """LlamaConfig keyword arguments (all but ``ffn_dim``) of an HF config.json dict.

    ``required``: fields that must have the given value (default: that value), e.g.
    ``{"mlp_bias": False}``; ValueError naming the first that does not.
    """
    for key, ours in {"hidden_act": "silu", "attention_bias": False, **required}.items():
        if hf.get(key, ours) != ours:
            raise ValueError(f"config.json has {key}={hf[key]!r}; Meshtron's model needs {key}={ours!r}")
    return dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                vocab_size=hf["vocab_size"], rope_theta=_rope_theta(hf),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=hf.get("max_position_embeddings", 2048))


def check_head_dim(hf: dict, config: LlamaConfig) -> None:
    """ValueError when config.json's head_dim is not hidden_size / num_attention_heads (we derive it)."""
    head_dim = hf.get("head_dim") or config.head_dim
    if head_dim != config.head_dim:
        raise ValueError(f"config.json has head_dim={head_dim}, but Meshtron derives hidden_size/num_attention_heads"
                         f"={config.head_dim}")


def from_hf_config(hf: dict) -> LlamaConfig:
    """The LlamaConfig of an HF Llama config.json dict; ValueError naming what we cannot represent."""
    config = LlamaConfig(**decoder_kwargs(hf, {"mlp_bias": False}), ffn_dim=hf["intermediate_size"])
    check_head_dim(hf, config)
    config.validate()
    return config
