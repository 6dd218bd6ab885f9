"""Float8 training of Linear layers with torchao (an optional dependency: ``pip install -e '.[float8]'``).

``convert_to_float8`` swaps chosen ``nn.Linear`` modules for torchao's ``Float8Linear``. Its
forward and backward cast the matmul operands to float8 (e4m3) just before each of a layer's
three matmuls, with *rowwise* scales:

    output      = x @ W^T         x [tokens, in] scaled per token row, W per output row
    grad_input  = grad @ W        grad scaled per token row, W per input column
    grad_weight = grad^T @ x      both scaled per token column

and runs them with ``torch._scaled_mm`` (float8 tensor cores on Hopper/Blackwell; the CPU
runs the same op, slowly, so the recipe is tested here). Everything else stays as it was:
the weights are still float32 master parameters (FSDP still casts them to bf16 for compute,
and all-gathers them in bf16), gradients are reduced in float32, the optimizer is unchanged,
and the parameter names (so checkpoints) are those of the Linear it replaced.

Rowwise rather than tensorwise scaling: one scale per row means an outlier token or output
channel costs precision in its own row only, which is what keeps long runs on the bf16 loss
curve (torchao and torchtitan use it for training); tensorwise is faster only where its
float8 all-gather pays, and with one scale for a whole tensor it is more sensitive to outliers.

Tensor parallel composes with no float8-specific plan: the usual Colwise/Rowwise styles shard
the Float8Linear's weight like any Linear's, and the float8 casts happen on each rank's local
shard (the collectives move bf16 activations, as without float8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

INSTALL_HINT = "pip install -e '.[float8]'"
# torch._scaled_mm needs both matmul dims of every operand to be multiples of 16.
FLOAT8_ALIGNMENT = 16


def torchao_available() -> bool:
    """Whether torchao can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def check_float8_available() -> None:
    """ValueError naming the install when torchao is missing."""
    if not torchao_available():
        raise ValueError(f"--float8 needs torchao, which is not installed: {INSTALL_HINT}")


def _import_torchao_float8():
    """torchao.float8, imported quietly: a CPU or older-GPU build cannot load torchao's Hopper/Blackwell
    kernel libraries and logs a warning per library, although float8 training does not use them."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return float8


def float8_compatible(linear: nn.Linear) -> bool:
    """Whether ``torch._scaled_mm`` can run this layer's matmuls (both dims multiples of 16)."""
    return linear.in_features % FLOAT8_ALIGNMENT == 0 and linear.out_features % FLOAT8_ALIGNMENT == 0


def convert_to_float8(model: nn.Module, keep_high_precision: Callable[[str], bool]) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` for a rowwise-scaled ``Float8Linear``, except those whose
    name ``keep_high_precision`` selects and those ``torch._scaled_mm`` cannot run. In place, on any
    device (meta too: nothing is allocated). Returns the names of the converted layers.

    Call it before tensor parallel, FSDP and compile wrap the model. No communication.
    """
    check_float8_available()
    float8 = _import_torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name("rowwise")
    converted: list[str] = []

    def choose(module: nn.Module, name: str) -> bool:
        chosen = isinstance(module, nn.Linear) and float8_compatible(module) and not keep_high_precision(name)
        if chosen:
            converted.append(name)
        return chosen

    float8.convert_to_float8_training(model, module_filter_fn=choose, config=config)
    return converted
