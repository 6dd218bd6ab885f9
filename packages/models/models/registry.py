"""Model names -> configs. ``debug`` / ``debug-moe(-v3)`` / ``debug-mixtral`` run in seconds on a laptop CPU;
the others are real sizes."""

from __future__ import annotations

from dataclasses import fields, replace

from .llama import LlamaConfig, Transformer
from .moe import MoEConfig, MoETransformer

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
_LLAMA31 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=131072, rope_scaling="llama3", rope_factor=8.0,
                rope_original_max_seq_len=8192)
_QWEN3 = dict(vocab_size=151936, rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960, qk_norm=True,
              attention_head_dim=128)
_QWEN25 = dict(vocab_size=152064, rope_theta=1e6, norm_eps=1e-6, max_seq_len=32768, qkv_bias=True)
HF_FAMILY_CONFIGS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **_LLAMA31),
    "llama3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA31),
    "llama3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, **_LLAMA31),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
                               **{**_LLAMA31, "rope_factor": 32.0}),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
                               **{**_LLAMA31, "rope_factor": 32.0}),
    "mistral-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32768,
                              rope_theta=1e6, max_seq_len=32768, family="mistral"),
    "qwen2.5-0.5b": LlamaConfig(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, tie_embeddings=True,
                                **{**_QWEN25, "vocab_size": 151936}),
    "qwen2.5-7b": LlamaConfig(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, **_QWEN25),
    "qwen3-0.6b": LlamaConfig(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, tie_embeddings=True,
                              **_QWEN3),
    "qwen3-1.7b": LlamaConfig(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144, tie_embeddings=True,
                              **_QWEN3),
    "qwen3-4b": LlamaConfig(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728, tie_embeddings=True,
                            **_QWEN3),
    "qwen3-8b": LlamaConfig(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288, **_QWEN3),
    "qwen3-14b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_dim=17408, **_QWEN3),
    "qwen3-32b": LlamaConfig(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_dim=25600, **_QWEN3),
}


MOE_CONFIGS: dict[str, MoEConfig] = {
    # Like "debug" (dims divisible by tp=1,2,4), 8 experts top-2 + a shared expert,
    # softmax router with the aux loss; ep = 1, 2, 4 or 8.
    "debug-moe": MoEConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=384, vocab_size=512,
                           n_experts=8, top_k=2, moe_ffn_dim=64, n_shared_experts=1, aux_loss_coef=0.01),
    # Mixtral's routing at debug size (no shared expert, no dense layer, no expert bias):
    # exports to transformers' MixtralForCausalLM (models.hf_format). ffn_dim = moe_ffn_dim,
    # as in Mixtral, where no layer is dense; != dim, so a transposed expert cannot load.
    # Dims divisible by tp=1,2,4; ep = 1, 2, 4 or 8.
    "debug-mixtral": MoEConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=192, vocab_size=512,
                               n_experts=8, top_k=2, moe_ffn_dim=192, aux_loss_coef=0.01),
    # DeepSeek-V3-style routing at debug size: a dense first layer, sigmoid scores,
    # aux-loss-free balancing by the expert bias (and a small aux loss, as V3 keeps one).
    "debug-moe-v3": MoEConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=384, vocab_size=512,
                              n_experts=8, top_k=3, moe_ffn_dim=64, n_shared_experts=1, n_dense_layers=1,
                              score_func="sigmoid", aux_loss_coef=0.001, bias_update_rate=1e-3),
    # Mixtral 8x7B: 8 experts top-2, softmax renormalized over the chosen two, no shared expert.
    "mixtral-8x7b": MoEConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
                              rope_theta=1e6, max_seq_len=32768, n_experts=8, top_k=2, moe_ffn_dim=14336,
                              aux_loss_coef=0.02),
    # DeepSeekMoE 16B: 64 fine-grained experts top-6 + 2 shared, first layer dense, no renormalization.
    "deepseek-moe-16b": MoEConfig(dim=2048, n_layers=28, n_heads=16, n_kv_heads=16, ffn_dim=10944,
                                  vocab_size=102400, max_seq_len=4096, n_experts=64, top_k=6, moe_ffn_dim=1408,
                                  n_shared_experts=2, n_dense_layers=1, norm_topk_prob=False,
                                  aux_loss_coef=0.001),
    # Qwen3-30B-A3B: 128 experts top-8 renormalized, no shared expert, every layer MoE, q/k norms.
    "qwen3-30b-a3b": MoEConfig(dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_dim=6144, moe_ffn_dim=768,
                               n_experts=128, top_k=8, aux_loss_coef=0.001, **_QWEN3),
}
CONFIGS: dict[str, LlamaConfig] = {**LLAMA_CONFIGS, **HF_FAMILY_CONFIGS, **MOE_CONFIGS}
# Models with no tokenizer of their own: trained on real text, their vocabulary is the tokenizer's
# (rounded up to VOCAB_MULTIPLE) unless --model-args sets vocab_size. The real sizes keep theirs.
TOKENIZER_SIZED = frozenset({"debug", "debug-moe", "debug-mixtral", "debug-moe-v3"})
# Padding the vocabulary to a multiple of 64 keeps the output matmul aligned and divisible by any tp <= 64.
VOCAB_MULTIPLE = 64


def vocab_for_tokenizer(tokens: int) -> int:
    """The vocabulary a tokenizer-sized model gets for a tokenizer of ``tokens`` tokens."""
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_names() -> list[str]:
    return sorted(CONFIGS)


def _registered(name: str) -> LlamaConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return CONFIGS[name]


def get_config(name: str, **overrides) -> LlamaConfig:
    """The named config, with fields overridden (e.g. ``n_layers=8``) and checked."""
    config = replace(_registered(name), **overrides)
    config.validate()
    return config


def parse_model_args(base: str | LlamaConfig, spec: str) -> dict:
    """``--model-args "n_layers=2,max_seq_len=8192"`` -> {"n_layers": 2, "max_seq_len": 8192}.

    Keys are the fields of ``base``'s config (a registry name, or a config, e.g. one read from
    a Hugging Face folder); each value is parsed as that field's type (int, float, bool as
    true/false, str). ValueError names a bad key or value.
    """
    config = _registered(base) if isinstance(base, str) else base
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(config)}
    overrides = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep or key not in types:
            raise ValueError(f"--model-args {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        overrides[key] = _parse_value(key, text, types[key])
    return overrides


def _parse_value(key: str, text: str, kind: str):
    try:
        if kind == "bool":
            return {"true": True, "false": False}[text.lower()]
        return {"int": int, "float": float, "str": str}[kind](text)
    except (KeyError, ValueError):
        raise ValueError(f"--model-args {key}={text!r}: expected a value of type {kind}") from None


def build_model(config) -> Transformer:
    """The plain single-device model for ``config`` (weights uninitialized: see models.init)."""
    return MoETransformer(config) if isinstance(config, MoEConfig) else Transformer(config)
