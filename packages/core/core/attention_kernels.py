"""Fused attention on one block of queries and keys, returning the log-sum-exp (lse).

Context parallel attention (``core.ring_attention``, ``core.allgather_attention``) splits
one causal attention into blocks: a query block against a key/value block, either
causal (a square block on the diagonal) or unmasked (keys wholly in the queries' past).
Each block runs on PyTorch's own fused SDPA kernels, which never build the
``[s_q, s_k]`` score matrix, and which also return the per-row log-sum-exp of the
scores, the one number needed to merge blocks exactly (see ``merge_block``):

  ===========  ==================================================  ================
  device       kernel (forward / backward)                         dtypes
  ===========  ==================================================  ================
  cpu          aten._scaled_dot_product_flash_attention_for_cpu     fp64 fp32 bf16 fp16
  cuda sm90+   aten._scaled_dot_product_cudnn_attention             bf16 fp16
  cuda sm80+   aten._scaled_dot_product_flash_attention             bf16 fp16
  cuda         aten._scaled_dot_product_efficient_attention         fp32 (half in fp32)
  ===========  ==================================================  ================

Each backward takes the *final* output and lse of the whole attention (not the block's):
with them, exp(scores - lse) is the true global probability, so the block's dQ/dK/dV
are exactly its share of the full gradient (the flash-attention backward recipe).

Shapes everywhere: q, out, dout ``[b, h, s_q, d]``; k, v ``[b, h_kv, s_k, d]`` with
``h % h_kv == 0`` (GQA; K/V are never copied per query head); lse ``[b, h, s_q]``
in the merge dtype (fp32, fp64 for fp64 inputs). No function here communicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .documents import document_bias

__all__ = [
    "BlockKernel", "AttentionSetup", "prepare_attention", "select_block_kernel", "merge_dtype", "merge_block",
    "block_forward", "block_backward", "seq_rows", "check_attention_inputs",
]

aten = torch.ops.aten

# The CUDA efficient kernel stores lse padded to a multiple of this many rows, and its
# backward reads it with that stride (it rejects an unpadded lse).
_EFFICIENT_LSE_ALIGN = 32


@dataclass(frozen=True)
class BlockKernel:
    """One device's fused attention block: ``forward`` -> (out, lse); ``backward`` -> (dq, dk, dv).

    ``forward(q, k, v, causal, scale, bias)``; ``backward(dout, q, k, v, out, lse, causal, scale, bias)``.
    ``causal`` is only used on square blocks (top-left and bottom-right alignment agree there).
    ``bias`` (document masking, ``core.documents``): an additive ``[b, 1, s_q, s_k]`` bias in
    q's dtype, or None; only kernels with ``takes_bias`` accept one. Outputs are in q's dtype
    except lse, which is in the merge dtype.
    """

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    takes_bias: bool = False


# --------------------------------------------------------------------------- CPU flash

def _cpu_flash_forward(q, k, v, causal, scale, bias=None):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                     attn_mask=bias, scale=scale)


# --------------------------------------------------------------------------- CUDA flash (FlashAttention-2)

# Row slices (views) of q, k, v, out and dout are read exactly by every kernel here (the
# CPU one was checked bit for bit on all six inputs, FlashAttention-2 on CUDA too). A
# sliced lse is not: FlashAttention-2's backward read it with dense strides and returned
# gradients off by ~0.5 with no error, so the CUDA backwards get a contiguous lse.

def _cuda_flash_forward(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    # cum_seq_q/k are for packed variable-length batches and the philox state for
    # dropout: neither is used here, so they are passed as undefined tensors (None).
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.size(2), k.size(2), 0.0, causal, None, None,
        scale=scale)
    return dq, dk, dv


# --------------------------------------------------------------------------- CUDA cuDNN (Hopper)

def _cuda_cudnn_forward(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.squeeze(-1)  # cuDNN keeps a trailing size-1 dim: [b, h, s, 1]


def _cuda_cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    philox = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout off: never read
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), philox, philox, None, None, None,
        q.size(2), k.size(2), 0.0, causal, scale=scale)
    return dq, dk, dv


# --------------------------------------------------------------------------- CUDA memory-efficient

def _heads_as_batch(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """GQA for a kernel that needs equal head counts, without copying K/V per query head.

    q [b, h, s, d] -> [b*h_kv, g, s, d] (the g query heads sharing a K/V head are
    adjacent); k, v [b, h_kv, s, d] -> [b*h_kv, g, s, d] as stride-0 expansions.
    """
    b, h, s_q, d = q.shape
    h_kv, s_k = k.size(1), k.size(2)
    g = h // h_kv
    expand = (b * h_kv, g, s_k, d)
    return (q.reshape(b * h_kv, g, s_q, d), k.reshape(b * h_kv, 1, s_k, d).expand(expand),
            v.reshape(b * h_kv, 1, s_k, d).expand(expand))


def _in_fp32(fn):
    """Run ``fn`` on fp32 copies of its tensor arguments; cast tensor results back to q's dtype (lse stays fp32).

    The efficient kernel's bf16 backward returned garbage dq (up to 1e37) on an H100 with
    torch 2.11 while its fp32 path is exact; it only serves half precision where cuDNN and
    FlashAttention-2 cannot (pre-Ampere GPUs, head_dim > 256), so those blocks run in fp32.
    """
    def run(*args):
        dtype = next(a.dtype for a in args if isinstance(a, Tensor))
        results = fn(*(a.float() if isinstance(a, Tensor) else a for a in args))
        if dtype == torch.float32:
            return results
        return tuple(r if r.dim() == 3 else r.to(dtype) for r in results)  # the 3-D result is lse
    return run


def _cuda_efficient_forward(q, k, v, causal, scale):
    qh, kh, vh = _heads_as_batch(q, k, v)
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, causal, scale=scale)
    s_q = q.size(2)
    return out.reshape(q.shape), lse[..., :s_q].reshape(q.shape[:3])


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale):
    qh, kh, vh = _heads_as_batch(q, k, v)
    s_q = q.size(2)
    padded = torch.zeros(*qh.shape[:2], math.ceil(s_q / _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN,
                         dtype=lse.dtype, device=lse.device)
    padded[..., :s_q] = lse.reshape(qh.shape[:3])
    philox = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout off: never read
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout.reshape(qh.shape), qh, kh, vh, None, out.reshape(qh.shape), padded, philox, philox,
        0.0, [True, True, True, False], causal, scale=scale)
    # dk, dv come back per query head [b*h_kv, g, s_k, d]: sum each K/V head's group
    return dq.reshape(q.shape), dk.sum(1).reshape(k.shape), dv.sum(1).reshape(v.shape)


CPU_FLASH = BlockKernel("cpu-flash", _cpu_flash_forward, _cpu_flash_backward, takes_bias=True)
CUDA_FLASH = BlockKernel("cuda-flash", _cuda_flash_forward, _cuda_flash_backward)
CUDA_CUDNN = BlockKernel("cuda-cudnn", _cuda_cudnn_forward, _cuda_cudnn_backward)
CUDA_EFFICIENT = BlockKernel("cuda-efficient", _in_fp32(_cuda_efficient_forward), _in_fp32(_cuda_efficient_backward))


def select_block_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, bias: bool = False) -> BlockKernel:
    """The fused kernel for this device and dtype (and a ``bias``: document masking); ValueError where none applies.

    CUDA in half precision takes cuDNN attention on Hopper (sm90+, head_dim a multiple of
    8 up to 128: it is what SDPA itself picks there, and faster than FlashAttention-2 on
    Hopper), else FlashAttention-2 (sm80+, head_dim up to 256);
    everything else, fp32 included, runs the memory-efficient kernel (in fp32).
    """
    if device.type == "cpu":
        return CPU_FLASH
    if bias:
        raise ValueError("document masking runs on the CPU flash kernel in this version; the CUDA block kernels "
                         "here take no attention bias yet: train without --document-masking on CUDA")
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        capability = torch.cuda.get_device_capability(device)
        if half and capability >= (9, 0) and head_dim % 8 == 0 and head_dim <= 128:
            return CUDA_CUDNN
        if half and capability >= (8, 0) and head_dim % 8 == 0 and head_dim <= 256:
            return CUDA_FLASH
        if half or dtype == torch.float32:
            return CUDA_EFFICIENT
        raise ValueError(f"context-parallel attention on CUDA needs float32, bfloat16 or float16, got {dtype}")
    raise ValueError(f"context-parallel attention has no fused kernel for device type {device.type!r}")


# --------------------------------------------------------------------------- merging blocks

def seq_rows(x: Tensor, rows: slice) -> Tensor:
    """Sequence rows of a [b, h, s, ...] tensor (q, k, v, out, lse, accumulators), as a view."""
    return x[:, :, rows]


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs and lse are merged in fp32 (fp64 stays fp64), whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_block(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Merge one block's softmax result into the running one, in place (``out``/``lse`` may be views).

    A block's output is normalized by its own sum of exp(scores), exp(block_lse). The
    union's normalizer is exp(lse) + exp(block_lse) = exp(new_lse); rescaling each part
    by its share of it and adding gives exactly the softmax over both key sets:

        new_lse = log(exp(lse) + exp(block_lse))
        out     = out * exp(lse - new_lse) + block_out * exp(block_lse - new_lse)

    out [b, h, s, d] and lse [b, h, s] in the merge dtype; block_out in any float dtype.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out.to(out.dtype) * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


# --------------------------------------------------------------------------- one block, maybe masked

def block_forward(setup: AttentionSetup, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                  ids: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse) of one block. ``ids``: the document ids ``([b, s_q], [b, s_k])`` of its queries
    and keys, for document masking (``core.documents``); a query with no key of its document
    in the block gets lse = -inf, so ``merge_block`` gives it no weight (the kernel says 0)."""
    if ids is None:
        return setup.kernel.forward(q, k, v, causal, setup.scale)
    bias, empty = document_bias(*ids, causal, q.dtype)
    out, lse = setup.kernel.forward(q, k, v, False, setup.scale, bias)
    return out, lse.masked_fill(empty, float("-inf"))


def block_backward(setup: AttentionSetup, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool, ids: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block, given the final out and lse; ``ids`` as in ``block_forward``."""
    if ids is None:
        return setup.kernel.backward(dout, q, k, v, out, lse, causal, setup.scale)
    bias, _ = document_bias(*ids, causal, q.dtype)
    return setup.kernel.backward(dout, q, k, v, out, lse, False, setup.scale, bias)


# --------------------------------------------------------------------------- entry

@dataclass(frozen=True)
class AttentionSetup:
    """What a context-parallel attention call needs besides its tensors (kept for its backward)."""

    group: Any                # the cp ProcessGroup (None: the default group)
    scale: float
    kernel: BlockKernel
    stats: Any                # core.attention_stats.AttentionStats or None
    document_ids: Tensor | None = None  # [b, S] of the whole sequence: document masking (core.documents)


def prepare_attention(q: Tensor, k: Tensor, v: Tensor, group, scale: float | None, stats,
                      document_ids: Tensor | None = None) -> AttentionSetup:
    """Check shapes (before any communication), default the scale to head_dim**-0.5, pick the kernel."""
    check_attention_inputs(q, k, v)
    if q.size(2) % 2:
        raise ValueError(f"local sequence length {q.size(2)} is odd: a zigzag part is two equal chunks "
                         f"(the global length must be divisible by 2*cp)")
    if document_ids is not None and (document_ids.dim() != 2 or document_ids.size(0) != q.size(0)):
        raise ValueError(f"document_ids must be [batch, global_seq], got shape {tuple(document_ids.shape)}")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    kernel = select_block_kernel(q.device, q.dtype, q.size(-1), bias=document_ids is not None)
    return AttentionSetup(group, scale, kernel, stats, document_ids)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shape errors before any communication, so every rank fails the same way at once."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, s, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"batch size mismatch: q has {b}, k/v have {bk}")
    if s != sk:
        raise ValueError(f"local sequence mismatch: q has {s} tokens, k/v have {sk}; "
                         f"shard q, k and v with the same zigzag_shard")
    if d != dk:
        raise ValueError(f"head_dim mismatch: q has {d}, k/v have {dk}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"n_heads {h} is not divisible by n_kv_heads {hkv} (GQA needs whole groups); "
                         f"with tensor parallelism both counts are per rank")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")
