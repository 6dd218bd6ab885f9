"""Reference attention block math with explicit score matrices: for tests and benchmarks only.

This is what the fused kernels compute without ever building the ``[s_q, s_k]`` scores;
tests compare the kernels with it, and a memory test uses it as the negative control.
Shapes as in ``core.attention_kernels``: q [b, h, s_q, d], k/v [b, h_kv, s_k, d].
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(x: Tensor, n_kv_heads: int) -> Tensor:
    """[b, h, s, d] -> [b, h_kv, g, s, d]: the query heads that share one K/V head side by side."""
    b, h, s, d = x.shape
    return x.reshape(b, n_kv_heads, h // n_kv_heads, s, d)


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool) -> Tensor:
    """Scaled q @ k^T as [b, h_kv, g, s_q, s_k]; -inf above the diagonal when causal (s_q == s_k)."""
    scores = torch.matmul(_grouped(q, k.size(1)), k.unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        future = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def reference_block_forward(q, k, v, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out [b, h, s_q, d], lse [b, h, s_q]) of one block, in q's dtype."""
    scores = _scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.unsqueeze(2))
    return out.reshape(q.shape), lse.reshape(q.shape[:3])


def reference_block_backward(dout, q, k, v, out, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block given the *final* out and lse (the flash-attention recipe).

    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q;
    dK/dV summed over the query heads that share each K/V head.
    """
    n_kv = k.size(1)
    probs = torch.exp(_scores(q, k, scale, causal) - _grouped(lse.unsqueeze(-1), n_kv))
    dout_g, q_g = _grouped(dout, n_kv), _grouped(q, n_kv)
    delta = (dout_g * _grouped(out, n_kv)).sum(-1, keepdim=True)
    dv = torch.matmul(probs.transpose(-1, -2), dout_g).sum(2)
    dscores = probs * (torch.matmul(dout_g, v.unsqueeze(2).transpose(-1, -2)) - delta) * scale
    dq = torch.matmul(dscores, k.unsqueeze(2)).reshape(q.shape)
    dk = torch.matmul(dscores.transpose(-1, -2), q_g).sum(2)
    return dq, dk, dv
