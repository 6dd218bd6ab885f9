"""Model names -> configs. ``debug`` runs in seconds on a laptop CPU; the others are real sizes."""

from __future__ import annotations

from dataclasses import replace

from .llama import LlamaConfig, Transformer

LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    # 4 layers so pp=2 (and interleaved pp=2 x 2 virtual stages) has a layer per stage;
    # 8 query / 4 kv heads, ffn and vocab divisible by tp=1,2,4 (8 query heads for tp=8 with n_kv_heads=8).
    "debug": LlamaConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=384, vocab_size=512),
    "llama3-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                             vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                             vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                              vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
}


def model_names() -> list[str]:
    return sorted(LLAMA_CONFIGS)


def get_config(name: str, **overrides) -> LlamaConfig:
    """The named config, with fields overridden (e.g. ``n_layers=8``)."""
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return replace(LLAMA_CONFIGS[name], **overrides)


def build_model(config) -> Transformer:
    """The plain single-device model for ``config`` (weights uninitialized: see models.init)."""
    return Transformer(config)
