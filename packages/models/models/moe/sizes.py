"""The MoE family's registered sizes: debug ones with each routing style, and real ones."""

from __future__ import annotations

from ..llama.sizes import QWEN3
from .config import MoEConfig

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
                               n_experts=128, top_k=8, aux_loss_coef=0.001, **QWEN3),
}
