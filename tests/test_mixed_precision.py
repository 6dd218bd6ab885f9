"""One mixed-precision recipe on every mesh: float32 master weights and optimizer state, bf16
compute, float32 gradient reduction, whether the model is sharded (FSDP), replicated, split by
tensor parallel, or on one process (FSDP's mixed precision on a one-rank mesh).

Measured on the ``LEARNING`` recipe (8 steps, loss 6.23 -> ~3.2), the largest difference in any
step's loss from bf16 on one process: dp=2 FSDP 0.0019, dp=2 replicate 0.0019, pp=2 0.0014,
tp=2 0.0139 (tensor parallel sums its row-split matmuls' partial results in bf16), against
0.0059 between bf16 and float32 on one process. A run from another seed differs by > 0.1.
"""

import functools
import tempfile

import pytest
import torch
from rank_harness import run_on_ranks

from train.parity import BASE, LEARNING, merge_ranks, run_steps

BF16_MESHES = [("dp=2", 2, {}), ("dp=2", 2, {"dp_mode": "replicate"}), ("tp=2", 2, {})]
MESH_IDS = ["dp2-fsdp", "dp2-replicate", "tp2"]
LOSS_TOLERANCE = 0.03  # nats: about twice the largest difference measured (tp=2)


@functools.cache
def run(mesh: str, world: int, **overrides) -> dict:
    return merge_ranks(run_on_ranks(run_steps, world, mesh, {**LEARNING, **overrides}))


def max_loss_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))


@pytest.mark.parametrize("mesh, world, overrides", BF16_MESHES, ids=MESH_IDS)
def test_bfloat16_losses_agree_across_meshes(mesh, world, overrides):
    assert max_loss_difference(run(mesh, world, dtype="bfloat16", **overrides), run("", 1, dtype="bfloat16")) \
        < LOSS_TOLERANCE


def test_another_seed_is_outside_the_tolerance():
    """Negative control: the tolerance tells a different run from the same one on another mesh."""
    assert max_loss_difference(run("", 1, dtype="bfloat16", seed=1), run("", 1, dtype="bfloat16")) > LOSS_TOLERANCE


def recipe_of_one_step(mesh: str, overrides: dict) -> dict:
    """The dtypes one bf16 step works in on this rank: parameters, their gradients, AdamW state,
    a block's output (the residual stream) and the logits."""
    from train.config import TrainConfig
    from train.loop import apply_gradients, build_trainer, compute_gradients

    seen: dict = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, output.dtype)
        return hook

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out, "dtype": "bfloat16",
                                         **overrides}))
        model = t.model.module
        model.layers["0"].register_forward_hook(record("block output"))
        model.register_forward_hook(record("logits"))
        loss_share, _ = compute_gradients(t)
        seen["parameters"] = {p.dtype for p in t.model.trainable}
        seen["gradients"] = {p.grad.dtype for p in t.model.trainable}
        apply_gradients(t, t.model.reduce_loss(loss_share))
        seen["optimizer state"] = {v.dtype for s in t.optimizer.state.values() for k, v in s.items() if k != "step"}
    return seen


def test_every_mesh_computes_by_one_recipe():
    """bf16 activations and logits, float32 parameters, gradients and AdamW state, on one process
    and on every data/tensor-parallel mesh (before, one process and replicate ran under autocast,
    whose residual stream is float32, and FSDP in bf16)."""
    expected = {"block output": torch.bfloat16, "logits": torch.bfloat16, "parameters": {torch.float32},
                "gradients": {torch.float32}, "optimizer state": {torch.float32}}
    for mesh, world, overrides in [("", 1, {}), *BF16_MESHES]:
        for rank_recipe in run_on_ranks(recipe_of_one_step, world, mesh, overrides):
            assert rank_recipe == expected, (mesh, overrides, rank_recipe)
