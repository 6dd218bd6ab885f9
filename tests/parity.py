"""Shared helpers for mesh-invariance tests: train a few steps on a mesh, return what to compare.

Every rank runs ``run_steps``; the ranks that hold distinct model pieces (first rank of
each pipeline stage) return the full (unsharded) gradients of the first step, the full
weights (and buffers) after the last step, and the per-step losses and gradient norms.
"""

from __future__ import annotations

import tempfile

import torch
from torch.distributed.tensor import DTensor

from train.config import TrainConfig
from train.loop import apply_gradients, build_trainer, global_loss, compute_gradients

# adam_eps=1e-5: Adam's first steps move every weight by ~lr * sign(grad), so float32
# reduction-order noise in a near-zero gradient element could flip a whole lr-sized update.
# A larger eps makes updates of tiny gradients proportional to them and the weights
# comparable; it does not touch the loss and gradient checks.
BASE = dict(dataset="synthetic", steps=3, global_batch_size=8, seq_len=32, lr=1e-2, warmup_steps=1, adam_eps=1e-5)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """Collective for DTensors (all-gather over their mesh); identity otherwise."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_steps(mesh: str, overrides: dict) -> dict | None:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out, **overrides})
        t = build_trainer(cfg)
        losses, norms, first_grads = [], [], None
        for step in range(cfg.steps):
            loss_share, _ = compute_gradients(t)
            if step == 0:
                first_grads = {n: full(p.grad) for n, p in t.named_parameters() if p.grad is not None}
            norm, _ = apply_gradients(t)
            losses.append(global_loss(t, loss_share))
            norms.append(norm)
        weights = {n: full(p) for n, p in t.named_parameters()}
        weights.update({n: full(b) for n, b in t.named_buffers()})  # e.g. the MoE expert bias
    holds_distinct_piece = t.pm.local_rank("dense_grad") == 0 and t.pm.local_rank("tp") == 0
    if not holds_distinct_piece:
        return None
    return {"losses": losses, "grad_norms": norms, "grads": first_grads, "weights": weights}


def merge_ranks(results: list[dict | None]) -> dict:
    """Union of the pieces returned by the ranks (pipeline stages hold different parameters)."""
    merged = {"grads": {}, "weights": {}}
    for r in results:
        if r is None:
            continue
        merged["losses"], merged["grad_norms"] = r["losses"], r["grad_norms"]
        merged["grads"].update(r["grads"])
        merged["weights"].update(r["weights"])
    return merged


def assert_same_run(reference: dict, other: dict, loss_rtol: float = 1e-5) -> None:
    """Loss per step within ``loss_rtol``; first-step gradients and final weights close, name by name.

    Weights get an absolute tolerance of 2e-5 (0.2% of one lr=1e-2 AdamW step); a wrong
    gradient, clip or optimizer shard moves weights by ~lr and fails.
    """
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=loss_rtol, atol=0)
    torch.testing.assert_close(torch.tensor(other["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=1e-4, atol=0)
    for kind, atol in (("grads", 1e-6), ("weights", 2e-5)):
        assert other[kind].keys() == reference[kind].keys(), f"{kind}: different parameter names"
        for name, ref in reference[kind].items():
            torch.testing.assert_close(other[kind][name], ref, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name, k=kind: f"{k} of {n}: {m}")
