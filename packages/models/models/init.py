"""Mesh-invariant weight initialization.

Each parameter's initial value is drawn from its own generator, seeded by the run seed
and a hash of the parameter's name. So the weights do not depend on how the model was
cut (pipeline stages), sharded (tensor parallel, FSDP, expert parallel) or in which order
parameters were created: ``layers.3.attention.wq.weight`` gets the same values everywhere.

It also lets big models start on the meta device: a rank materializes one full parameter
at a time on the CPU, keeps its own shard and drops the rest, so peak memory is one
parameter, not the model.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

INIT_STD = 0.02


def parameter_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (``hash()`` is salted per process, crc32 is not)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def initial_value(name: str, shape: torch.Size, n_layers: int, seed: int) -> torch.Tensor:
    """The float32 CPU initial value of parameter ``name``.

    Norm weights start at 1; an expert bias at 0; expert weights (``experts.w1`` etc.,
    [n_experts, ...]) are drawn whole under their one name, so an expert-parallel rank
    slicing its experts out of the full tensor gets the same experts on every mesh;
    projections that write into the residual stream (``wo``, ``w2``) get std
    0.02/sqrt(2*n_layers) so the residual's variance does not grow with depth (GPT-2's
    rule); every other weight N(0, 0.02).
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("expert_bias"):
        return torch.zeros(shape)
    std = INIT_STD / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight", "w2")) else INIT_STD
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


# Buffers that start at zero: the MoE router's expert bias.
ZERO_BUFFERS = ("expert_bias",)


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """Give every buffer its initial value (after ``to_empty`` they hold garbage). No communication."""
    for name, buffer in model.named_buffers():
        if not name.endswith(ZERO_BUFFERS):
            raise ValueError(f"no initial value for buffer {name!r}: add a rule in models.init")
        buffer.zero_()


@torch.no_grad()
def init_weights(model: nn.Module, n_layers: int, seed: int) -> None:
    """Fill every parameter of ``model`` (sharded or not, any device) with its initial value, and every buffer.

    For a DTensor parameter the full value is cut locally (``src_data_rank=None``: no
    scatter, every rank computes the same full tensor), so this issues no collective.
    """
    init_buffers(model)
    for name, param in model.named_parameters():
        copy_full_value_(param, initial_value(name, param.shape, n_layers, seed))


@torch.no_grad()
def copy_full_value_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a parameter's full (unsharded) value into it; a DTensor keeps only its local shard.

    ``src_data_rank=None``: every rank holds the same full tensor and cuts its own piece,
    so no scatter (no collective) is needed.
    """
    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)
