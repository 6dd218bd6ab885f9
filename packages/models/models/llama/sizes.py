"""The Llama family's registered sizes: ``debug`` (seconds on a laptop CPU) and real ones."""

from __future__ import annotations

from .config import LlamaConfig

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
    # Llama 3.1 405B's shape (126 layers, 405.9B parameters); trained here without its long-context
    # RoPE scaling, so up to the 8k context it was pretrained at.
    "llama3-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                               vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
}
# Llama 3.1+ (long context by "llama3" RoPE scaling of the 8k pretraining context), Llama 3.2's
# small tied models, Mistral 7B v0.3, Qwen2.5 (q/k/v biases) and Qwen3 (q/k norms, 128-wide heads,
# tied up to 4B): the shapes and math of their Hugging Face configs (models.hf_families).
LLAMA31 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=131072, rope_scaling="llama3", rope_factor=8.0,
                rope_original_max_seq_len=8192)
QWEN3 = dict(vocab_size=151936, rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960, qk_norm=True,
              attention_head_dim=128)
QWEN25 = dict(vocab_size=152064, rope_theta=1e6, norm_eps=1e-6, max_seq_len=32768, qkv_bias=True)
HF_FAMILY_CONFIGS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **LLAMA31),
    "llama3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **LLAMA31),
    "llama3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, **LLAMA31),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
                               **{**LLAMA31, "rope_factor": 32.0}),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
                               **{**LLAMA31, "rope_factor": 32.0}),
    "mistral-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32768,
                              rope_theta=1e6, max_seq_len=32768, family="mistral"),
    "qwen2.5-0.5b": LlamaConfig(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, tie_embeddings=True,
                                **{**QWEN25, "vocab_size": 151936}),
    "qwen2.5-7b": LlamaConfig(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, **QWEN25),
    "qwen3-0.6b": LlamaConfig(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, tie_embeddings=True,
                              **QWEN3),
    "qwen3-1.7b": LlamaConfig(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144, tie_embeddings=True,
                              **QWEN3),
    "qwen3-4b": LlamaConfig(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728, tie_embeddings=True,
                            **QWEN3),
    "qwen3-8b": LlamaConfig(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288, **QWEN3),
    "qwen3-14b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_dim=17408, **QWEN3),
    "qwen3-32b": LlamaConfig(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_dim=25600, **QWEN3),
}
