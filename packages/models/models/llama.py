"""A Llama-style dense decoder in plain single-device PyTorch.

RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> SwiGLU, repeated,
then a final norm and an output projection. The config also covers what the Llama 3.x,
Mistral, Qwen2 and Qwen3 checkpoints add (``models.hf_families`` maps them): RoPE scaling
(``models.rope``), biases on the q/k/v projections, an RMSNorm of each query and key head,
a head size other than dim / n_heads, and an output projection tied to the embedding.
Nothing here knows about meshes: the parallelisms are applied from outside (see
``models.parallelize``), which may

  - swap ``Attention.attention_fn`` (ring attention for context parallel) and
    ``Attention.position_fn`` (zigzag RoPE positions),
  - delete layers and set ``tok_embeddings`` / ``norm`` / ``output`` to ``None`` to cut a
    pipeline stage; the forward then takes and returns hidden states,
  - shard linear layers with tensor parallel; attention infers its local head count from
    the projected width, so the same code runs on 1/tp of the heads.

Layers live in a ``ModuleDict`` keyed "0".."L-1" so parameter names (``layers.3.attention.wq.weight``)
are the same in every stage and on every mesh: checkpoints and initialization rely on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.documents import Documents, document_bias

from .rope import check_rope, rotary


@dataclass(frozen=True)
class LlamaConfig:
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
    rope_scaling: str = "none"        # none | linear | llama3 | yarn (models.rope)
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


def swiglu_shapes(dim: int, hidden: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``FeedForward(dim, hidden)``'s parameters: w1, w3 [hidden, dim], w2 [dim, hidden]."""
    return {f"{prefix}w1.weight": (hidden, dim), f"{prefix}w3.weight": (hidden, dim),
            f"{prefix}w2.weight": (dim, hidden)}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA. q: [b, h, s, d]; k, v: [b, h_kv, s, d] (GQA when h_kv < h). Returns [b, h, s, d].

    ``document_ids`` [b, s] (document masking) also keeps each query inside its document,
    with an additive [b, 1, s, s] bias.
    """
    gqa = k.shape[1] != q.shape[1]
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    bias, _ = document_bias(document_ids, document_ids, True, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)


def sequential_positions(seq_len: int, device: torch.device) -> torch.Tensor:
    """RoPE positions of a full, unsharded sequence: [seq_len] = 0..seq_len-1."""
    return torch.arange(seq_len, device=device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query attention. x: [b, s, dim] -> [b, s, dim].

    ``q_norm`` / ``k_norm`` (Qwen3) normalize each head's [head_dim] vector; their weights are
    shared by all heads, so under tensor parallel each rank applies them to its own heads
    (plain parameters whose gradients are partial over tp: ``models.parallelize``).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope = cfg  # the RoPE fields (models.rope)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        # Replaced by context parallel with ring attention and zigzag positions.
        self.attention_fn: Callable[..., torch.Tensor] = causal_attention
        self.position_fn: Callable[[int, torch.device], torch.Tensor] = sequential_positions

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """``documents`` (document masking): attend within documents, positions from each one's start."""
        b, s, _ = x.shape
        # "-1" heads: under tensor parallel the projections hold n_heads/tp heads.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = self.position_fn(s, x.device) if documents is None else documents.positions
        q, k = rotary(q, positions, self.rope), rotary(k, positions, self.rope)
        extra = {} if documents is None else {"document_ids": documents.ids}
        out = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **extra)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def attention_layers(module: nn.Module) -> list[Attention]:
    """The attention layers of a model, of a pipeline stage or of a list of stages (in module order):
    what context parallel and generation give their own ``attention_fn`` / ``position_fn``."""
    return [m for m in module.modules() if isinstance(m, Attention)]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). x: [b, s, dim] -> [b, s, dim]."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.)). ``feed_forward`` may be an MoE."""

    def __init__(self, cfg: LlamaConfig, feed_forward: nn.Module | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = feed_forward if feed_forward is not None else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), documents=documents)  # a kwarg: TP plans map positional inputs
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [b, s] (int64) -> logits [b, s, vocab]; a pipeline stage maps hidden -> hidden."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): self.build_block(i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_output()

    def tie_output(self) -> None:
        """With ``tie_embeddings``, make the output projection use the embedding's weight [vocab,
        dim] (one parameter, named ``tok_embeddings.weight``), where this module holds both (a
        pipeline's last stage holds a replica instead: ``models.pipelined``). Called again after
        tensor parallel replaces the embedding's weight by a DTensor (both shard it on vocab,
        Shard(0)) and after ``to_empty``."""
        if self.config.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse: bool = True) -> Transformer:
        """``nn.Module.to_empty``, keeping a tied output tied (it gives every module a new tensor)."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_output()
        return self

    def build_block(self, layer_index: int) -> TransformerBlock:
        return TransformerBlock(self.config)

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """``documents``: document masking for packed sequences (``core.documents``); None: plain causal."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, documents)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
