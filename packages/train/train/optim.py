"""The optimizer and its learning-rate schedule.

AdamW over all parameters (matrices decay, vectors do not), and one schedule: linear
warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at
``steps``. No communication: every rank steps its own (sharded) parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def lr_lambda(cfg):
    """The schedule's factor of ``lr`` at each step (0-based): warmup, then cosine."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norm weights) do not.

    The update is the fused kernel (one pass over each tensor's parameter, gradient and both
    moments, fewer and larger kernels than the per-parameter loop or ``foreach``) whenever
    every parameter is of one kind, all plain tensors or all DTensors. Its ``found_inf`` input
    also lets the trainer skip a non-finite step on the device (``train.loop.apply_gradients``).
    Mixed lists (float32 MoE under tp without data parallel: the token-split MoE parameters
    stay plain) keep the per-parameter loop, as fused and foreach kernels cannot mix DTensors
    with plain tensors. Same math either way.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=len(kinds) == 1, foreach=False if len(kinds) > 1 else None)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``cfg`` positioned at ``step`` (0: a fresh run), with ``cfg.lr`` as its peak.

    Setting each group's ``initial_lr`` (the base LambdaLR scales) makes a schedule built
    mid-run start from this run's ``lr``, whatever an earlier schedule left there.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg), last_epoch=step - 1)
