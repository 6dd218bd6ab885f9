"""Mesh invariance of the dense model: every mesh trains exactly like one process.

Same seed, model, global batch -> loss per step (1e-5 relative), the first step's
gradients and the final weights match the single-process run.
"""

import functools

import pytest
from rank_harness import run_on_ranks

from train.parity import LEARNING, assert_same_run, assert_tracks_float32, merge_ranks, run_steps


@functools.cache
def single_process(**overrides) -> dict:
    return merge_ranks(run_on_ranks(run_steps, 1, "", overrides))


def on_mesh(mesh: str, world: int, **overrides) -> dict:
    return merge_ranks(run_on_ranks(run_steps, world, mesh, overrides))


@pytest.mark.parametrize("mesh, world", [("dp=2", 2), ("tp=2", 2), ("tp=4", 4), ("dp=2,tp=2", 4), ("dp=2,tp=4", 8)])
def test_mesh_matches_single_process(mesh, world):
    assert_same_run(single_process(), on_mesh(mesh, world))


def test_one_fsdp_unit_per_block_matches_single_process():
    """The debug model's blocks are small enough to share one FSDP unit by default; one unit
    per block (what real model sizes get) with FSDP x TP 2-D sharding."""
    assert_same_run(single_process(), on_mesh("dp=2,tp=2", 4, fsdp_unit_params=0))


def test_replicated_data_parallel_matches_single_process():
    assert_same_run(single_process(), on_mesh("dp=2", 2, dp_mode="replicate"))


def test_gradient_accumulation_matches_one_big_batch():
    assert_same_run(single_process(), on_mesh("dp=2,tp=2", 4, grad_accum_steps=2))


def test_a_different_seed_is_detected():
    """The comparison can fail: another seed gives other initial weights and losses."""
    with pytest.raises(AssertionError):
        assert_same_run(single_process(), single_process(seed=1))


@pytest.mark.parametrize("mesh, world", [("", 1), ("dp=2", 2)])
def test_bfloat16_compute_tracks_float32(mesh, world):
    """bf16 (FSDP's mixed precision on a one-rank mesh, and on dp=2) follows fp32 within bf16 noise."""
    assert_tracks_float32(on_mesh(mesh, world, dtype="bfloat16", **LEARNING), single_process(**LEARNING))


@pytest.mark.parametrize("broken", [{"dtype": "bfloat16", "lr": 0.0}, {"seed": 1}], ids=["no-learning", "other-seed"])
def test_bfloat16_comparison_catches_a_broken_run(broken):
    """Negative controls: a bf16 run that does not learn, and an fp32 run from other weights, both fail it."""
    with pytest.raises(AssertionError):
        assert_tracks_float32(single_process(**LEARNING, **broken), single_process(**LEARNING))


def gradient_reductions_in_one_step(mesh: str, overrides: dict) -> tuple[int, int]:
    """FSDP's gradient reduce-scatters while computing one step's gradients: (calls of
    ``reduce_scatter_single``, calls of ``all_to_all_single``). On gloo each reduce-scatter is
    an all-to-all (``core.data_parallel.AllToAllReduceScatter``); the dense model issues no other."""
    import tempfile

    import torch.distributed as dist

    from train.config import TrainConfig
    from train.loop import build_trainer, compute_gradients
    from train.parity import BASE, counted_calls

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out, **overrides}))
        with counted_calls(dist, "reduce_scatter_single") as native, counted_calls(dist, "all_to_all_single") as ours:
            compute_gradients(t)
    return len(native), len(ours)


def reduce_scatters_in_one_step(mesh: str, overrides: dict) -> int:
    return sum(gradient_reductions_in_one_step(mesh, overrides))


def test_fsdp_on_gloo_reduce_scatters_by_all_to_all():
    """The debug model is one FSDP unit: one all-to-all, and gloo's reduce-scatter is not called
    (the values are checked by every FSDP parity test)."""
    assert run_on_ranks(gradient_reductions_in_one_step, 2, "dp=2", {})[0] == (0, 1)


def test_gradient_accumulation_reduce_scatters_once_per_step():
    """FSDP syncs gradients after the last of 4 micro-batches only, as often as with 1."""
    once = run_on_ranks(reduce_scatters_in_one_step, 2, "dp=2", {})[0]
    accumulated = run_on_ranks(reduce_scatters_in_one_step, 2, "dp=2", {"grad_accum_steps": 4})[0]
    assert once > 0 and accumulated == once, (once, accumulated)


def test_small_blocks_share_one_fsdp_unit():
    """The debug model (0.9M parameters in all) is one FSDP unit by default: one reduce-scatter
    per step; with ``--fsdp-unit-params 0`` one per block + the root. A threshold of two blocks'
    parameters makes two block units; of a bit more, one of three (the fourth joins the root)."""
    from core.data_parallel import group_blocks
    from models.registry import build_model, get_config

    assert run_on_ranks(reduce_scatters_in_one_step, 2, "dp=2", {})[0] == 1
    assert run_on_ranks(reduce_scatters_in_one_step, 2, "dp=2", {"fsdp_unit_params": 0})[0] == 5
    blocks = list(build_model(get_config("debug")).layers.values())
    two_blocks = 2 * sum(p.numel() for p in blocks[0].parameters())
    assert [len(unit) for unit in group_blocks(blocks, two_blocks)] == [2, 2]
    assert [len(unit) for unit in group_blocks(blocks, two_blocks + 1)] == [3]
    assert [len(unit) for unit in group_blocks(blocks, 0)] == [1, 1, 1, 1]
