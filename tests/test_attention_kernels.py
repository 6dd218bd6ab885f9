"""The fused block kernels behind context-parallel attention, and its O(S/cp) memory.

* Each kernel's forward (out, lse) and backward (given the final out and lse) match the
  explicit-score reference (``attention_reference``), on CPU and, where present, CUDA.
* The recipe itself: attention split into key blocks, merged by lse, and each block's
  backward run with the final out/lse, reproduces full attention and its gradients.
* Memory: one ring / all-gather call at a sequence long enough to tell never holds a
  tensor the size of an [s_local, s_local] score matrix; the reference does (control).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_harness import run_on_ranks

from core.attention_kernels import (
    CPU_FLASH,
    CUDA_CUDNN,
    CUDA_EFFICIENT,
    CUDA_FLASH,
    merge_block,
    merge_dtype,
    select_block_kernel,
)
from core.attention_reference import reference_block_backward, reference_block_forward
from core.context_parallel import CP_METHODS
from core.live_memory import PeakLiveBytes
from core.zigzag import zigzag_shard

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
hopper_only = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0),
                                 reason="needs a Hopper (sm90+) GPU")

# (kernel, device, dtype, tolerance relative to the largest reference value)
KERNELS = [
    pytest.param(CPU_FLASH, "cpu", torch.float64, 1e-12, id="cpu-fp64"),
    pytest.param(CPU_FLASH, "cpu", torch.float32, 1e-5, id="cpu-fp32"),
    pytest.param(CPU_FLASH, "cpu", torch.bfloat16, 2e-2, id="cpu-bf16"),
    pytest.param(CUDA_FLASH, "cuda", torch.bfloat16, 2e-2, id="cuda-flash-bf16", marks=cuda_only),
    pytest.param(CUDA_FLASH, "cuda", torch.float16, 4e-3, id="cuda-flash-fp16", marks=cuda_only),
    pytest.param(CUDA_CUDNN, "cuda", torch.bfloat16, 2e-2, id="cuda-cudnn-bf16", marks=hopper_only),
    pytest.param(CUDA_EFFICIENT, "cuda", torch.float32, 1e-5, id="cuda-efficient-fp32", marks=cuda_only),
    pytest.param(CUDA_EFFICIENT, "cuda", torch.bfloat16, 2e-2, id="cuda-efficient-bf16", marks=cuda_only),
]
# (s_q, s_k, causal): the diagonal block, and unmasked blocks of either aspect ratio (ring and all-gather
# compute all three); 40 rows is not a multiple of the efficient kernel's 32-row lse padding
BLOCKS = [(48, 48, True), (24, 48, False), (48, 24, False), (40, 40, True)]
B, H, H_KV, D = 2, 4, 2, 16  # GQA: 2 query heads per K/V head


def _tensors(shapes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def _assert_close(got, expected, tol, name):
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), expected.double(), atol=tol * scale, rtol=0,
                               msg=lambda message: f"{name}: {message}")


@pytest.mark.parametrize("s_q, s_k, causal", BLOCKS)
@pytest.mark.parametrize("kernel, device, dtype, tol", KERNELS)
def test_block_kernel_matches_reference(kernel, device, dtype, tol, s_q, s_k, causal):
    q, k, v, dout = _tensors([(B, H, s_q, D), (B, H_KV, s_k, D), (B, H_KV, s_k, D), (B, H, s_q, D)], device, dtype)
    scale = D ** -0.5
    out, lse = kernel.forward(q, k, v, causal, scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    ref_out, ref_lse = reference_block_forward(*(t.double() for t in (q, k, v)), causal, scale)
    _assert_close(out, ref_out, tol, "out")
    _assert_close(lse, ref_lse, tol, "lse")
    grads = kernel.backward(dout, q, k, v, out, lse, causal, scale)
    ref_grads = reference_block_backward(*(t.double() for t in (dout, q, k, v, out, lse)), causal, scale)
    for name, got, expected, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.shape == like.shape and got.dtype == dtype, name
        _assert_close(got, expected, tol, name)


@pytest.mark.parametrize("kernel, device, dtype, tol", KERNELS)
def test_blocks_merged_by_lse_reproduce_full_attention_and_its_gradients(kernel, device, dtype, tol):
    """Causal attention over [past | own] keys = merge(own block causal, past block unmasked)."""
    past, own = 32, 24
    q, dout = _tensors([(B, H, own, D)] * 2, device, dtype, seed=1)
    k, v = _tensors([(B, H_KV, past + own, D)] * 2, device, dtype, seed=2)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    # reference: the queries are the last `own` positions, causal (bottom-right) mask
    allowed = torch.ones(own, past + own, dtype=torch.bool, device=device).tril(past)
    expected = F.scaled_dot_product_attention(leaves[0], *(t.repeat_interleave(H // H_KV, 1) for t in leaves[1:]),
                                              attn_mask=allowed)
    expected.backward(dout.double())

    scale = D ** -0.5
    blocks = [(slice(past, None), True), (slice(0, past), False)]
    out, lse = kernel.forward(q, k[:, :, blocks[0][0]], v[:, :, blocks[0][0]], True, scale)
    out, lse = out.to(merge_dtype(dtype)), lse.to(merge_dtype(dtype))
    block_out, block_lse = kernel.forward(q, k[:, :, :past], v[:, :, :past], False, scale)
    merge_block(out, lse, block_out, block_lse)
    _assert_close(out, expected, tol, "merged out")

    out = out.to(dtype)
    dq, dk, dv = torch.zeros_like(q, dtype=torch.float64), torch.zeros_like(k, dtype=torch.float64), \
        torch.zeros_like(v, dtype=torch.float64)
    for keys, causal in blocks:
        g_q, g_k, g_v = kernel.backward(dout, q, k[:, :, keys], v[:, :, keys], out, lse, causal, scale)
        dq += g_q.double()
        dk[:, :, keys] += g_k.double()
        dv[:, :, keys] += g_v.double()
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        _assert_close(got, leaf.grad, tol, name)


def test_kernel_choice():
    assert select_block_kernel(torch.device("cpu"), torch.bfloat16, 128) is CPU_FLASH
    with pytest.raises(ValueError, match="no fused kernel for device type 'meta'"):
        select_block_kernel(torch.device("meta"), torch.float32, 64)


@cuda_only
def test_cuda_kernel_choice():
    device = torch.device("cuda")
    assert select_block_kernel(device, torch.float32, 64) is CUDA_EFFICIENT
    capability = torch.cuda.get_device_capability()
    if capability >= (8, 0):
        half_kernel = CUDA_CUDNN if capability >= (9, 0) else CUDA_FLASH
        assert select_block_kernel(device, torch.bfloat16, 64) is half_kernel
        assert select_block_kernel(device, torch.bfloat16, 192) is CUDA_FLASH  # beyond cuDNN's 128
        assert select_block_kernel(device, torch.bfloat16, 512) is CUDA_EFFICIENT  # beyond FlashAttention-2
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        select_block_kernel(device, torch.float64, 64)


# --------------------------------------------------------------------------- memory

SEQ, HEADS, KV_HEADS, HEAD_DIM = 8192, 2, 1, 16  # s_local = 4096 at cp=2: one score matrix is 64 MiB (fp32)


def _attention_memory(method: str) -> dict:
    """Peak live bytes and largest tensor inside one forward and one backward, on this rank."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = (zigzag_shard(t, 2, rank, cp) for t in _tensors(
        [(1, HEADS, SEQ, HEAD_DIM), (1, KV_HEADS, SEQ, HEAD_DIM), (1, KV_HEADS, SEQ, HEAD_DIM),
         (1, HEADS, SEQ, HEAD_DIM)], "cpu", torch.float32))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    attention = CP_METHODS[method] if method in CP_METHODS else _reference_attention
    with PeakLiveBytes() as fwd:
        out = attention(q, k, v, dist.group.WORLD)
    with PeakLiveBytes() as bwd:
        out.backward(dout)
    return {"peak": max(fwd.peak, bwd.peak), "largest": max(fwd.largest, bwd.largest),
            "input": q.numel() * q.element_size()}


def _reference_attention(q, k, v, group):
    """The negative control: the local diagonal block with explicit scores, as the old ring did."""
    return reference_block_forward(q, k, v, True, q.size(-1) ** -0.5)[0]


@pytest.fixture(scope="module")
def attention_memory():
    return run_on_ranks(_memory_all_methods, 2, timeout=300)


def _memory_all_methods() -> dict:
    return {method: _attention_memory(method) for method in [*CP_METHODS, "reference"]}


@pytest.mark.parametrize("method", list(CP_METHODS))
def test_context_parallel_attention_memory_is_linear_in_the_local_sequence(attention_memory, method):
    s_local = SEQ // 2
    score_matrix = s_local * s_local * 4  # one head's fp32 [s_local, s_local]: 64 MiB = 128 x q's 512 KiB
    for rank, per_rank in enumerate(attention_memory):
        m = per_rank[method]
        # Tensors the size of q/k/v/out/dout and fp32 accumulators; all-gather adds one layer's
        # whole-sequence K/V and dK/dV (2 * cp * the local K/V). A constant multiple of the
        # input: linear in the sequence, a quarter of one head's score matrix at this length.
        assert m["largest"] <= 4 * m["input"], (rank, m)
        assert m["peak"] <= 32 * m["input"] <= score_matrix / 4, (rank, m)


def test_memory_check_catches_a_score_matrix(attention_memory):
    """Negative control: the explicit-score block math fails the bound above."""
    s_local = SEQ // 2
    for per_rank in attention_memory:
        assert per_rank["reference"]["largest"] >= s_local * s_local * 4
