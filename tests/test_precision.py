"""The run's numerics: ``--dtype auto`` and ``--float8`` (torchao's Float8Linear, rowwise scales).

float8 is checked the way bf16 is (``test_mixed_precision.py``), by comparison: over
``FLOAT8_STEPS`` steps of the debug model learning the template corpus, float8 stays within
``FLOAT8_TOLERANCE`` of bf16 on one process, and float8 on dp=2, tp=2 and dp=2,tp=2 stays within
it of float8 on one process.

Measured here (torch 2.13 CPU, torchao 0.18; the largest |loss difference| over the 50 steps,
loss 5.77 -> 2.75): float8 vs bf16 0.130 (bf16 vs float32: 0.065); float8 on dp=2 0.029, tp=2
0.085, dp=2,tp=2 0.056 from one float8 process (bf16 on the same meshes from one bf16 process:
0.034, 0.079, 0.055); bf16 from another seed vs bf16: 0.91.
"""

import functools
import tempfile

import pytest
import torch
from rank_harness import run_on_ranks

from train.parity import BASE, LEARNING

FLOAT8_STEPS = 50
MESH_STEPS = 25  # the mesh runs are compared on the first half, to keep the suite short
FLOAT8_TOLERANCE = 0.25  # nats, any step's loss: about twice the largest difference measured (float8 vs bf16)


def float8_layers(model: torch.nn.Module) -> list[str]:
    from torchao.float8.float8_linear import Float8Linear

    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]


def losses_and_layers(mesh: str, overrides: dict, taken: int = FLOAT8_STEPS) -> dict:
    """The loss of each of the first ``taken`` steps of a FLOAT8_STEPS-step run (its LR schedule)
    and the names of this rank's float8 layers."""
    from train.config import TrainConfig
    from train.loop import build_trainer, train_step

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**BASE, **LEARNING, "steps": FLOAT8_STEPS, "mesh": mesh,
                                         "output_dir": out, **overrides}))
        losses = [train_step(t)["loss"] for _ in range(taken)]
        t.batches.close()
        return {"losses": losses, "float8": float8_layers(t.model.module), "dtype": t.compute_dtype}


@functools.cache
def run(mesh: str, world: int, taken: int = FLOAT8_STEPS, **overrides) -> dict:
    return run_on_ranks(losses_and_layers, world, mesh, overrides, taken)[0]


def max_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_cuda_or_with_float8():
    from train.precision import compute_dtype

    assert compute_dtype("auto", "cpu", float8=False) == torch.float32
    assert compute_dtype("auto", "cuda", float8=False) == torch.bfloat16
    assert compute_dtype("auto", "cpu", float8=True) == torch.bfloat16
    assert compute_dtype("float32", "cuda", float8=False) == torch.float32
    assert compute_dtype("bfloat16", "cpu", float8=False) == torch.bfloat16


def test_float8_converts_the_block_linears_and_keeps_output_and_router():
    from core.float8 import convert_to_float8
    from models.parallelize import keeps_high_precision
    from models.registry import build_model, get_config

    with torch.device("meta"):
        model = build_model(get_config("debug-moe"))
    converted = convert_to_float8(model, keeps_high_precision)
    assert converted == float8_layers(model)
    block = {name.removeprefix("layers.0.") for name in converted if name.startswith("layers.0.")}
    assert block == {"attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.shared_expert.w1", "feed_forward.shared_expert.w2",
                     "feed_forward.shared_expert.w3"}, block
    assert len(converted) == 4 * len(block)
    assert not any(name == "output" or "router" in name for name in converted)


def test_float8_tracks_bfloat16():
    float8, bf16 = run("", 1, float8=True), run("", 1, dtype="bfloat16")
    assert float8["dtype"] == torch.bfloat16 and len(float8["float8"]) == 4 * 7 and not bf16["float8"]
    assert bf16["losses"][0] - min(bf16["losses"]) > 1.0, "the bf16 reference did not learn"
    assert max_difference(float8, bf16) < FLOAT8_TOLERANCE
    assert max_difference(float8, bf16) > 1e-3, "float8 had no effect: its losses equal bf16's"
    assert len(float8["losses"]) == FLOAT8_STEPS


def test_another_seed_is_outside_the_float8_tolerance():
    """Negative control: the tolerance tells another run from the same run in float8."""
    assert max_difference(run("", 1, dtype="bfloat16", seed=1), run("", 1, dtype="bfloat16")) > FLOAT8_TOLERANCE


@pytest.mark.parametrize("mesh, world", [("dp=2", 2), ("tp=2", 2), ("dp=2,tp=2", 4)])
def test_float8_meshes_match_one_float8_process(mesh, world):
    """The first MESH_STEPS steps (the largest differences were measured late, on all 50)."""
    on_mesh = run(mesh, world, MESH_STEPS, float8=True)
    assert on_mesh["float8"], "no float8 layer on the mesh"
    assert max_difference(on_mesh, run("", 1, float8=True)) < FLOAT8_TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with float8 tensor cores (sm89+: Ada, Hopper, Blackwell)")
def test_cuda_float8_tracks_bfloat16():
    """The same comparison on the GPU, where torch._scaled_mm runs on float8 tensor cores."""
    float8, bf16 = run("", 1, float8=True, device="cuda"), run("", 1, device="cuda")
    assert float8["dtype"] == bf16["dtype"] == torch.bfloat16 and float8["float8"] and not bf16["float8"]
    assert 1e-3 < max_difference(float8, bf16) < FLOAT8_TOLERANCE


def test_float8_without_torchao_or_with_float32_is_one_clear_error(monkeypatch):
    import core.float8
    from train.precision import check_precision

    with pytest.raises(ValueError, match="drop --dtype float32"):
        check_precision("float32", float8=True)
    monkeypatch.setattr(core.float8, "torchao_available", lambda: False)
    with pytest.raises(ValueError, match=r"--float8 needs torchao, which is not installed: pip install -e '\.\[float8"):
        check_precision("auto", float8=True)
