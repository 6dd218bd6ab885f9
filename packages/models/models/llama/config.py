"""The Llama family's config: sizes and the features of Llama 3.x, Mistral, Qwen2 and Qwen3.

Besides validating itself, a config lists its model's parameters (``parameter_shapes``) and the
role each plays under the parallelisms (``parameter_role``), so everything that counts a model
(``models.stats``) reads the config and never builds a module. ``models.llama.hf_config`` maps
it to and from Hugging Face config.json files.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rope import check_rope


@dataclass(frozen=True)
class LlamaConfig:
    """A dense decoder's architecture: the sizes, then the features each Hugging Face family adds.

    Frozen, so a config is a value: runs compare it field by field (``--init-from`` against
    ``--model``, a resumed run against its meta.json) and ``dataclasses.replace`` derives variants.
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 768
    vocab_size: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    attention_head_dim: int = 0       # 0: dim // n_heads (Qwen3 sets its own, e.g. 128 at dim 1024 with 16 heads)
    qkv_bias: bool = False            # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False             # RMSNorm over each query and key head, before RoPE (Qwen3)
    tie_embeddings: bool = False      # the output projection is the embedding matrix (Llama 3.2 1B/3B, Qwen3 <= 4B)
    sliding_window: int = 0           # Mistral's attention window; only where it never binds: max_seq_len <= it
    rope_scaling: str = "none"        # none | linear | llama3 | yarn (models.llama.rope)
    rope_factor: float = 1.0
    rope_original_max_seq_len: int = 0  # llama3, yarn: the context the model was pretrained at
    rope_low_freq_factor: float = 1.0   # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0        # yarn
    rope_beta_slow: float = 1.0         # yarn
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0: 0.1 ln(rope_factor) + 1
    family: str = ""                  # Hugging Face model_type to export as ("": the one the features imply)

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.dim // self.n_heads

    def validate(self) -> None:
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len")
        too_small = [f"{name}={getattr(self, name)}" for name in sizes if getattr(self, name) < 1]
        if too_small:
            raise ValueError(f"model sizes must be >= 1: {', '.join(too_small)}")
        if not self.attention_head_dim and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads} (or set attention_head_dim)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window and self.max_seq_len > self.sliding_window:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds sliding_window={self.sliding_window}: Meshtron "
                             f"attends over the whole sequence, which equals windowed attention only up to the "
                             f"window; set max_seq_len <= {self.sliding_window}")
        check_rope(self)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> full shape of every parameter of this config's model, in module order, a tied
        output listed once (as the embedding): what ``Transformer(self).named_parameters()`` gives,
        without building it (``models.stats``)."""
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab_size, self.dim)}
        for layer in range(self.n_layers):
            shapes.update({f"layers.{layer}.{name}": shape for name, shape in self.block_shapes(layer).items()})
        shapes["norm.weight"] = (self.dim,)
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, self.dim)
        return shapes

    def block_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """One ``TransformerBlock``'s parameters (names relative to it)."""
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"attention_norm.weight": (self.dim,)}
        for proj, width in (("wq", q_width), ("wk", kv_width), ("wv", kv_width)):
            shapes[f"attention.{proj}.weight"] = (width, self.dim)
            if self.qkv_bias:
                shapes[f"attention.{proj}.bias"] = (width,)
        shapes["attention.wo.weight"] = (self.dim, q_width)
        if self.qk_norm:
            shapes.update({"attention.q_norm.weight": (self.head_dim,), "attention.k_norm.weight": (self.head_dim,)})
        shapes["ffn_norm.weight"] = (self.dim,)
        shapes.update({f"feed_forward.{name}": shape for name, shape in self.feed_forward_shapes(layer).items()})
        return shapes

    def feed_forward_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """The feed-forward of block ``layer``: a SwiGLU of width ``ffn_dim``."""
        return swiglu_shapes(self.dim, self.ffn_dim)

    def routed_share(self) -> float:
        """The fraction of the routed experts' weights that multiplies a token (no experts: 1)."""
        return 1.0

    def parameter_role(self, name: str, shape: tuple[int, ...]) -> str:
        """How the parallelisms treat block parameter ``name`` (relative to its block, e.g.
        ``attention.wq.weight``; ``models.stats.ROLES``): "tp" for the 2-D attention and
        feed-forward weights tensor parallel shards, "replicated" for norms and biases."""
        if len(shape) == 2 and name.startswith(("attention.", "feed_forward.w")):
            return "tp"
        return "replicated"


def swiglu_shapes(dim: int, hidden: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``FeedForward(dim, hidden)``'s parameters: w1, w3 [hidden, dim], w2 [dim, hidden]."""
    return {f"{prefix}w1.weight": (hidden, dim), f"{prefix}w3.weight": (hidden, dim),
            f"{prefix}w2.weight": (dim, hidden)}
