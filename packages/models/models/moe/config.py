"""The MoE family's config: the Llama decoder's fields plus the routed experts'.

Covers Mixtral, Qwen3-MoE and DeepSeek-MoE/V3-style routing (``models.moe.layer``);
``models.moe.hf_config`` maps the Hugging Face families to and from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..llama.config import LlamaConfig, swiglu_shapes

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig(LlamaConfig):
    n_experts: int = 8
    top_k: int = 2
    moe_ffn_dim: int = 128             # hidden width of each routed expert
    n_shared_experts: int = 0          # a shared expert of width n_shared_experts * moe_ffn_dim
    n_dense_layers: int = 0            # the first layers keep a dense FeedForward (DeepSeek's first_k_dense)
    score_func: str = "softmax"        # softmax (Mixtral, DeepSeek-V2) | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True        # rescale the k chosen weights to sum to 1
    aux_loss_coef: float = 0.01        # Switch-style load-balancing loss; 0 disables it
    bias_update_rate: float = 0.0      # aux-loss-free balancing step (DeepSeek-V3 "gamma"); 0 disables it

    def validate(self) -> None:
        super().validate()
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}: "
                             f"a token cannot be routed to more experts than there are")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={self.score_func!r}: use one of {SCORE_FUNCS}")

    def feed_forward_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """An ``MoE`` after the first ``n_dense_layers`` (router, the E experts, the shared expert)."""
        if layer < self.n_dense_layers:
            return super().feed_forward_shapes(layer)
        e, dim, hidden = self.n_experts, self.dim, self.moe_ffn_dim
        shapes = {"router.gate.weight": (e, dim), "experts.w1": (e, dim, hidden), "experts.w3": (e, dim, hidden),
                  "experts.w2": (e, hidden, dim)}
        if self.n_shared_experts:
            shapes.update(swiglu_shapes(dim, self.n_shared_experts * hidden, prefix="shared_expert."))
        return shapes

    def routed_share(self) -> float:
        return self.top_k / self.n_experts

    def parameter_role(self, name: str, shape: tuple[int, ...]) -> str:
        """Routed expert weights [E, ...] are "expert" (expert parallel splits them); the router and the
        shared expert "replicated" (whole on every tp rank, ``models.moe.plan``); the rest as in Llama."""
        if name.startswith("feed_forward.experts."):
            return "expert"
        if name.startswith(("feed_forward.router.", "feed_forward.shared_expert.")):
            return "replicated"
        return super().parameter_role(name, shape)


def check_expert_parallel(cfg: MoEConfig, ep: int) -> None:
    """Raise ValueError (before any collective) when the experts cannot be split over ``ep`` ranks."""
    cfg.validate()
    if cfg.n_experts % ep:
        choices = [d for d in range(1, cfg.n_experts + 1) if cfg.n_experts % d == 0]
        raise ValueError(f"n_experts={cfg.n_experts} is not divisible by ep={ep}: every ep rank holds "
                         f"n_experts/ep whole experts; use ep in {choices}")
