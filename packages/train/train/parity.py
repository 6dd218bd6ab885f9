"""Mesh-invariance checks: train a few steps on a mesh, return what to compare with one process.

The parity tests and benchmarks use these (with ``core.ranks.run_on_ranks``); so can a check of a
feature of your own: run ``run_steps`` on a mesh and in one process, then ``assert_same_run``.

Every rank runs ``run_steps``; the ranks that hold distinct model pieces (first rank of
each pipeline stage) return the full (unsharded) gradients of the first step, the full
weights (and buffers) after the last step, and the per-step losses and gradient norms.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch
from torch.distributed.tensor import DTensor

from train.config import TrainConfig
from train.loop import apply_gradients, build_trainer, compute_gradients

# adam_eps=1e-5: Adam's first steps move every weight by ~lr * sign(grad), so float32
# reduction-order noise in a near-zero gradient element could flip a whole lr-sized update.
# A larger eps makes updates of tiny gradients proportional to them and the weights
# comparable; it does not touch the loss and gradient checks.
# checkpoint_every=0: each rank of these in-process runs writes to its own temporary folder, so none is shared
BASE = dict(dataset="synthetic", steps=3, global_batch_size=8, seq_len=32, lr=1e-2, warmup_steps=1, adam_eps=1e-5,
            checkpoint_every=0)

# bf16 runs are compared with fp32 on text the model learns (the bundled corpus: the loss
# falls from 6.2 to ~3.1 in 8 steps), not on random tokens, where it stays near ln(vocab)
# and a run that learns nothing would look the same as one that learns.
LEARNING = dict(dataset="templates", tokenizer="byte", steps=8)  # a corpus 8 steps learn visibly

# adam_eps=1e-4 (BASE has 1e-5): a token first seen at step 2 gets a tiny Adam
# update whose derivative in its gradient is ~lr/eps; at 1e-5 float32 reduction-order noise
# (1e-7 in a gradient) moved one embedding element of ep=2,tp=2 by 2.8e-5, over the 2e-5
# weight tolerance (dense tp=2 shows 1.1e-5 the same way). At 1e-4 that element differs by 1.6e-6.
# A real bug still fails: it shows in the first-step gradients (atol 1e-6) and moves weights by ~lr.
MOE = {"adam_eps": 1e-4}


@contextlib.contextmanager
def counted_calls(module, name: str):
    """Count the calls of ``module.name`` (e.g. ``torch.distributed.all_reduce``) inside the block:
    yields a list that gains one entry per call."""
    calls, original = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counting)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """Collective for DTensors (all-gather over their mesh); identity otherwise."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_steps(mesh: str, overrides: dict) -> dict | None:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out, **overrides})
        t = build_trainer(cfg)
        losses, norms, first_grads, expert_loads = [], [], None, []
        for step in range(cfg.steps):
            loss_share, _ = compute_gradients(t)
            if step == 0:
                first_grads = {n: full(p.grad) for n, p in t.model.named_parameters() if p.grad is not None}
            expert_loads.append(t.model.metrics().get("moe_tokens_per_expert"))
            losses.append(t.model.reduce_loss(loss_share))
            norm, _, _ = apply_gradients(t, losses[-1])
            norms.append(norm)
        weights = {n: full(p) for n, p in t.model.named_parameters()}
        weights.update({n: full(b) for n, b in t.model.named_buffers()})  # e.g. the MoE expert bias
    holds_distinct_piece = t.model.mesh.local_rank("dense_grad") == 0 and t.model.mesh.local_rank("tp") == 0
    if not holds_distinct_piece:
        return None
    return {"losses": losses, "grad_norms": norms, "grads": first_grads, "weights": weights,
            "expert_loads": expert_loads}


def merge_ranks(results: list[dict | None]) -> dict:
    """Union of the pieces returned by the ranks (pipeline stages hold different parameters)."""
    merged = {"grads": {}, "weights": {}}
    for r in results:
        if r is None:
            continue
        merged["losses"], merged["grad_norms"], merged["expert_loads"] = r["losses"], r["grad_norms"], r["expert_loads"]
        merged["grads"].update(r["grads"])
        merged["weights"].update(r["weights"])
    return merged


def assert_same_run(reference: dict, other: dict, loss_rtol: float = 1e-5, weight_atol: float = 2e-5) -> None:
    """Loss per step within ``loss_rtol``; MoE load identical at every step; first-step gradients
    and final weights close, name by name.

    Weights get an absolute tolerance of 2e-5 (0.2% of one lr=1e-2 AdamW step); a wrong
    gradient, clip or optimizer shard moves weights by ~lr and fails. Runs much longer than
    3 steps pass a larger ``weight_atol``: Adam turns reduction-order noise in the tiny
    gradients of rarely seen tokens into weight noise that grows with the steps.
    """
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=loss_rtol, atol=0)
    torch.testing.assert_close(torch.tensor(other["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               rtol=1e-4, atol=0)
    assert other["expert_loads"] == reference["expert_loads"], "MoE tokens per expert differ (routed pairs per step)"
    for kind, atol in (("grads", 1e-6), ("weights", weight_atol)):
        assert other[kind].keys() == reference[kind].keys(), f"{kind}: different parameter names"
        for name, ref in reference[kind].items():
            torch.testing.assert_close(other[kind][name], ref, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name, k=kind: f"{k} of {n}: {m}")


def assert_tracks_float32(bf16: dict, fp32: dict, grad_rtol: float = 2e-2, loss_share_of_drop: float = 2e-2) -> None:
    """A bf16 run of the ``LEARNING`` recipe follows the fp32 run of it, and is really bf16.

    - every step's loss is within ``loss_share_of_drop`` of fp32's total loss drop (dense bf16
      measured: <= 0.6%; a run that does not learn, lr=0, is off by ~100%; another seed by ~15%);
    - each first-step gradient is within ``grad_rtol`` (norm-relative) of fp32's (dense bf16
      measured: 0.4-0.9%; another seed: > 100%);
    - bf16 had an effect: some gradient differs from fp32 by more than 0.1% (a float32 mesh
      differs by ~1e-6).
    """
    drop = fp32["losses"][0] - min(fp32["losses"])
    assert drop > 1.0, f"the fp32 reference did not learn (loss {fp32['losses']})"
    torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"]), rtol=0,
                               atol=loss_share_of_drop * drop,
                               msg=lambda m: f"bf16 losses {bf16['losses']} do not follow fp32 {fp32['losses']}: {m}")
    errors = {name: ((bf16["grads"][name] - ref).norm() / ref.norm()).item() for name, ref in fp32["grads"].items()}
    assert max(errors.values()) < grad_rtol, f"first-step gradients differ from fp32 beyond bf16 noise: {errors}"
    assert max(errors.values()) > 1e-3, "bf16 had no effect: the gradients equal fp32's"
