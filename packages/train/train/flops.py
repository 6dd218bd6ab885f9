"""FLOPs per token and accelerator peaks, for model FLOPs utilization (MFU).

``MFU = tokens_per_second * transformer_flops_per_token(...) / (n_devices * peak_flops(...))``.
"""

from __future__ import annotations

import torch

from models.stats import ModelStats


def model_flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token of the whole (unsharded) model of ``model_config``, counted from
    the config (``models.stats``)."""
    stats = ModelStats.of(model_config)
    return transformer_flops_per_token(stats.matmul_weights, model_config.n_layers, stats.attention_width, seq_len)


def transformer_flops_per_token(n_params_non_embedding_active: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a decoder-only transformer.

    ``6 * N + 12 * L * d * s`` where

    * ``N`` counts the parameters that multiply each token: all matmul weights except the
      input embedding (a lookup, not a matmul); for MoE only the *active* experts (top-k
      routed + shared). Include the output projection (lm head): it is a matmul.
      Each weight costs 2 FLOPs (multiply + add) per token forward and 4 backward: 6N.
    * ``12 * L * d * s`` is attention's two matmuls (``Q K^T`` and ``softmax(.) V``): per layer
      and token, ``2 * s * d`` FLOPs each forward, so ``4 * s * d``, times 3 for the backward.
      ``d`` is the attention width (n_heads * head_dim, usually the model dim).

    Convention: the attention term counts the full ``s x s`` score matrix, NOT halved for the
    causal mask (as PaLM, Megatron and torchtitan report MFU), so MFU values are comparable
    with published ones; the causal work actually done is about half of this term.
    Activation recomputation is not counted (it would be "hardware FLOPs", not model FLOPs).
    """
    return 6.0 * n_params_non_embedding_active + 12.0 * n_layers * dim * seq_len


# Dense (no 2:4 sparsity) tensor-core peaks per GPU in FLOP/s, from the vendors' datasheets (which
# print the sparse figure first: these are half of it). For float32 matmuls: "tf32" when torch allows
# TF32, else plain "fp32". float8 runs are rated against "bf16" too (as torchtitan reports them), so
# a float8 run's MFU says how much faster it is than the bf16 ceiling.
#   H100 SXM / H200 / H100 PCIe: NVIDIA H100 and H200 Tensor Core GPU datasheets.
#   A100: NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe share these peaks).
#   GB200, B200: NVIDIA GB200 NVL72 / HGX B200 specifications, per GPU (GB200 runs at up to
#     1,200 W, an HGX B200 at 1,000 W: different clocks, different peaks).
#   L40S: NVIDIA L40S datasheet.
#   A10G (AWS G5 only; NVIDIA publishes no datasheet for it): AWS's figures as collected by
#     Baseten, "NVIDIA A10 vs A10G for ML model inference" (A10G: 70 bf16, 35 TF32, 31.2 fp32).
#   MI300X: AMD Instinct MI300X datasheet (ROCm builds of torch report it through torch.cuda).
PEAKS = {  # name fragment (most specific first) -> {dtype: FLOP/s}
    "H200": {"bf16": 989.5e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.5e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM (also "H100 80GB HBM3")
    "A100": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "GB200": {"bf16": 2500.0e12, "tf32": 1250.0e12, "fp32": 80.0e12},
    "B200": {"bf16": 2250.0e12, "tf32": 1100.0e12, "fp32": 75.0e12},
    "L40S": {"bf16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70.0e12, "tf32": 35.0e12, "fp32": 31.2e12},
    "MI300X": {"bf16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of one ``device`` computing in ``dtype``; None when unknown (CPU, other GPUs).

    bf16 and fp16 share a peak. For float32 the TF32 peak is used when
    ``torch.get_float32_matmul_precision()`` is not ``"highest"`` (matmuls then run in TF32).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    if "NVL" in name:  # H100/H200 NVL run at lower clocks: better no number than a wrong one
        return None
    for fragment, peaks in PEAKS.items():
        if fragment in name:
            return _peak_for_dtype(peaks, dtype)
    return None


def _peak_for_dtype(peaks: dict[str, float], dtype: torch.dtype) -> float | None:
    if dtype in (torch.bfloat16, torch.float16):
        return peaks["bf16"]
    if dtype == torch.float32:
        return peaks["fp32"] if torch.get_float32_matmul_precision() == "highest" else peaks["tf32"]
    return None
