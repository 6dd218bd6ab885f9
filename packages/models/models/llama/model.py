"""A Llama-style dense decoder in plain single-device PyTorch.

RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> SwiGLU, repeated,
then a final norm and an output projection. The config also covers what the Llama 3.x,
Mistral, Qwen2 and Qwen3 checkpoints add (``models.llama.hf_config`` maps them): RoPE scaling
(``models.llama.rope``), biases on the q/k/v projections, an RMSNorm of each query and key head,
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

import torch
import torch.nn.functional as F
from torch import nn

from core.documents import Documents, document_bias

from .config import LlamaConfig
from .rope import rotary


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
        self.rope = cfg  # the RoPE fields (models.llama.rope)
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
