"""The run's numerics: which dtype the forward and backward compute in, TF32, float8.

One recipe on every mesh (``models.parallelize``): float32 master weights, optimizer state and
gradient reductions; the compute dtype is what FSDP (or ``replicate``) casts the parameters to
for the forward and backward. ``--dtype auto`` picks it from the hardware:

  - CUDA: bfloat16. Hopper and Ampere run bf16 matmuls at ~15x their float32 rate (H100 SXM:
    989 vs 67 TFLOP/s dense) and it is what large runs train in;
  - CPU: float32. CPUs without AMX run bf16 matmuls no faster, and float32 keeps a laptop run
    comparable with the parity tests' references;
  - ``--float8``: bfloat16 on either (float8 matmuls produce bf16 outputs; the rest of the
    block computes in bf16 as it would without float8).

Whatever stays float32 on CUDA (e.g. ``--dtype float32``) runs its matmuls in TF32
(``enable_tf32``): 10 mantissa bits instead of 23 in the products, float32 accumulation.
"""

from __future__ import annotations

import torch

from core.float8 import check_float8_available

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(choice: str, device_type: str, float8: bool) -> torch.dtype:
    """The dtype ``--dtype choice`` computes in on ``device_type`` ("cpu" or "cuda")."""
    if choice == "auto":
        return torch.bfloat16 if device_type == "cuda" or float8 else torch.float32
    return COMPUTE_DTYPES[choice]


def check_precision(choice: str, float8: bool) -> None:
    """ValueError for a combination that cannot run: float8 without torchao or with float32 compute."""
    if not float8:
        return
    check_float8_available()
    if choice == "float32":
        raise ValueError("--float8 computes in bfloat16 around its float8 matmuls: drop --dtype float32 (or use "
                         "--dtype bfloat16)")


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls use TF32 tensor cores (process-wide; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
