"""Flat, tensor-only views of a model's and an optimizer's state, for ``save/load_checkpoint``.

The returned tensors ALIAS the live parameters, buffers and optimizer state (``detach()``
shares storage; for a DTensor it shares the local shard), so ``load_checkpoint`` copying
into them updates the model and optimizer in place. DTensors stay DTensors: DCP uses their
placements to save/load only this rank's chunks. No function here issues a collective.
"""

from __future__ import annotations

import torch
from torch import nn


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by FQN (as ``state_dict`` would list them).

    Built from ``state_dict(keep_vars=True)`` so non-persistent buffers (e.g. RoPE caches)
    are left out, and FSDP2 / TP parameters come back as their sharded DTensors. A parameter
    shared by two modules (a tied output: ``output.weight`` is ``tok_embeddings.weight``) is
    listed once, under its first name, as ``named_parameters`` lists it.
    """
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach()
    return state


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _init_adam_state(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> None:
    """Create the state Adam/AdamW's first ``step()`` would create, so a fresh optimizer has
    tensors to load into. ``step()`` then finds the state present and simply uses it."""
    on_device = group.get("capturable") or group.get("fused")
    step = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
    state = optimizer.state[param]
    state["step"] = step
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensor state as ``optim.<param fqn>.<state name>``.

    For Adam/AdamW: ``exp_avg`` and ``exp_avg_sq`` (DTensors shaped like their parameter),
    ``step`` (a 0-d tensor, identical on all ranks, saved once), ``max_exp_avg_sq`` with
    amsgrad. Missing state (the optimizer has not stepped) is created first, as zeros.
    Hyperparameters (lr, betas, ...) are not tensors and are not stored: the lr schedule
    recomputes lr from the step kept in meta.
    """
    names = _param_names(model)
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError("optimizer holds a parameter that is not in the model; build the "
                                 "optimizer after parallelize_module / fully_shard, from model.parameters()")
            if adam and not optimizer.state.get(param):
                _init_adam_state(optimizer, group, param)
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim.{names[id(param)]}.{key}"] = value
    return out
