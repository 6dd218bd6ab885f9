"""Pipeline parallel: stage assignment, clear errors, and mesh invariance of pipelined training.

Parity: same seed, model, global batch -> loss per step (1e-5 relative), grad norm, the
first step's full gradients and the final weights match the single-process run, for each
schedule and for pp combined with tp and dp. The debug model has 4 layers: pp=2 gives 2
layers per stage; interleaved/ZBV pp=2 x 2 virtual stages give 1 layer per stage.
"""

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from rank_harness import run_on_ranks, run_python

from core.mesh import MeshConfigError
from core.pipeline import PipelineConfigError, last_stage_rank, layers_per_stage, stages_of_rank
from train.config import TrainConfig
from train.parity import BASE, LEARNING, assert_same_run, assert_tracks_float32, merge_ranks, run_steps
from train.validation import validate

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- stage assignment (no processes)

def test_equal_layers_split_evenly_with_extras_last():
    assert layers_per_stage([1.0] * 4, 2) == [[0, 1], [2, 3]]
    assert layers_per_stage([1.0] * 5, 2) == [[0, 1], [2, 3, 4]]
    assert layers_per_stage([1.0] * 7, 4) == [[0], [1, 2], [3, 4], [5, 6]]
    assert sum(layers_per_stage([1.0] * 80, 8), []) == list(range(80))


def test_the_output_projection_moves_layers_off_the_last_stage():
    """Llama 3 8B: the head costs ~2 layers; an even 8/8/8/8 split would make the last stage 10."""
    from models.registry import get_config
    from models.stats import ModelStats

    stats = ModelStats.of(get_config("llama3-8b"))
    layers, head = stats.layer_costs(8192), stats.head_cost
    assert 2.0 < head / layers[0] < 2.2
    split = layers_per_stage(layers, 4, last_cost=head)
    assert [len(stage) for stage in split] == [8, 9, 9, 6]


def test_split_is_the_best_possible():
    """Against every split of small random cases: no slower stage than the best, each stage non-empty."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n, stages = rng.randint(2, 9), rng.randint(1, 4)
        if stages > n:
            continue
        costs = [rng.choice([1.0, 1.0, 1.5, 3.0]) for _ in range(n)]
        last = rng.choice([0.0, 0.3, 2.0, 5.0])

        def slowest(split):
            return max(sum(costs[i] for i in stage) + (last if k == len(split) - 1 else 0)
                       for k, stage in enumerate(split))

        every = [[list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, n))]
                 for cuts in itertools.combinations(range(1, n), stages - 1)]
        split = layers_per_stage(costs, stages, last)
        assert sum(split, []) == list(range(n)) and all(split)
        assert slowest(split) == min(slowest(s) for s in every), (costs, stages, last, split)


def test_stages_of_rank_looped_and_v():
    assert [stages_of_rank(r, 2, "1f1b") for r in range(2)] == [[0], [1]]
    assert [stages_of_rank(r, 4, "interleaved-1f1b") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stages_of_rank(r, 4, "zbv") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert last_stage_rank(4, "1f1b") == 3 and last_stage_rank(4, "interleaved-1f1b") == 3
    assert last_stage_rank(4, "zbv") == 0


# ---------------------------------------------------------------- clear errors before any collective

def config(mesh: str, **overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, "mesh": mesh, **overrides})


@pytest.mark.parametrize("mesh, world, overrides, message", [
    ("pp=8", 8, {}, "4 layers but pp=8"),
    ("pp=4", 4, {"pp_schedule": "interleaved-1f1b"}, "8 stages need at least one layer"),
    ("pp=4", 4, {"microbatches": 2}, "needs at least pp=4 microbatches"),
    ("dp=2,pp=2", 4, {"microbatches": 3}, "per-rank batch of 4 sequences is not divisible into --microbatches 3"),
    ("pp=2", 2, {"grad_accum_steps": 2}, "use --microbatches instead"),
    ("pp=2", 2, {"pp_schedule": "1F1B-typo"}, "unknown --pp-schedule"),
])
def test_bad_pipeline_configs_fail_before_any_collective(mesh, world, overrides, message):
    with pytest.raises((PipelineConfigError, MeshConfigError), match=message):
        validate(config(mesh, **overrides), world)


def test_gpipe_accepts_fewer_microbatches_than_stages():
    validate(config("pp=4", pp_schedule="gpipe", microbatches=2), 4)


# ---------------------------------------------------------------- parity with one process

@functools.cache
def single_process(**overrides) -> dict:
    return merge_ranks(run_on_ranks(run_steps, 1, "", overrides))


def on_mesh(mesh: str, world: int, **overrides) -> dict:
    return merge_ranks(run_on_ranks(run_steps, world, mesh, overrides))


@pytest.mark.parametrize("mesh, world, overrides", [
    ("pp=2", 2, {}),                                        # 1F1B, m = 2*pp = 4
    ("pp=2", 2, {"pp_schedule": "gpipe", "microbatches": 2}),
    ("pp=2,tp=2", 4, {}),
    ("dp=2,pp=2", 4, {}),                                   # FSDP inside each stage
    ("pp=2", 2, {"pp_schedule": "interleaved-1f1b"}),      # 2 virtual stages per rank
    ("dp=2,pp=2", 4, {"pp_schedule": "zbv"}),               # V placement, split input/weight backward
    ("pp=2,cp=2", 4, {}),                                   # ring attention inside each stage
    ("pp=2,cp=2", 4, {"cp_method": "allgather"}),           # all-gather K/V inside each stage
], ids=["pp2-1f1b", "pp2-gpipe", "pp2-tp2", "dp2-pp2-fsdp", "pp2-interleaved", "dp2-pp2-zbv", "pp2-cp2",
        "pp2-cp2-allgather"])
def test_pipeline_matches_single_process(mesh, world, overrides):
    result = on_mesh(mesh, world, **overrides)
    assert result["grads"].keys() == single_process()["grads"].keys()  # every stage's parameters came back
    assert_same_run(single_process(), result)


def run_steps_with_torch_default_scaling(mesh: str, overrides: dict) -> dict | None:
    """``run_steps`` with the schedule's default ``scale_grads=True`` (grads divided by m)."""
    import core.pipeline

    build = core.pipeline.build_schedule

    def build_scaled(name, stages, microbatches, loss_fn):
        schedule = build(name, stages, microbatches, loss_fn)
        schedule.scale_grads = True
        return schedule

    core.pipeline.build_schedule = build_scaled
    import models.pipelined
    models.pipelined.build_schedule = build_scaled
    return run_steps(mesh, overrides)


@pytest.mark.parametrize("mesh, world", [("pp=2", 2), ("dp=2,pp=2", 4)])
def test_bfloat16_pipeline_tracks_float32(mesh, world):
    """bf16 stages (FSDP's mixed precision on one rank or on dp=2) follow fp32 within bf16 noise."""
    assert_tracks_float32(on_mesh(mesh, world, dtype="bfloat16", **LEARNING), single_process(**LEARNING))


def test_a_wrong_microbatch_scaling_is_detected():
    """The comparison can fail: torch's default (grads divided by m) breaks parity, as it must."""
    with pytest.raises(AssertionError):
        scaled = merge_ranks(run_on_ranks(run_steps_with_torch_default_scaling, 2, "pp=2", {}))
        assert_same_run(single_process(), scaled)


def step_metrics(mesh: str, overrides: dict) -> dict:
    """One train_step on this rank; its metrics (every rank reports)."""
    import tempfile

    from train.loop import build_trainer, train_step
    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(config(mesh, output_dir=out, **overrides))
        return train_step(t)


def test_every_rank_reports_the_global_loss():
    """Only the last stage computes the loss; it is broadcast over pp so all ranks log the same value."""
    metrics = run_on_ranks(step_metrics, 2, "pp=2", {"steps": 1})
    losses = [m["loss"] for m in metrics]
    assert losses == pytest.approx([single_process()["losses"][0]] * 2, rel=1e-5)
    assert len({m["grad_norm"] for m in metrics}) == 1


def steps_with_checked_stage_tensors(mesh: str, overrides: dict) -> dict | None:
    """``run_steps`` with torch's DETAIL debug level, under which every stage checks each tensor it
    receives and sends against the static metadata it was built with (``models.pipelined.stage_io``)."""
    import torch.distributed as dist

    dist.set_debug_level(dist.DebugLevel.DETAIL)
    return run_steps(mesh, overrides)


@pytest.mark.parametrize("mesh, world, overrides", [
    ("pp=2,tp=2", 4, {"microbatches": 2}),                                           # float32, sequence slices
    ("pp=2", 2, {"dtype": "bfloat16", "pp_schedule": "interleaved-1f1b"}),           # bf16 on a one-rank FSDP mesh
    ("dp=2,pp=2", 4, {"dtype": "bfloat16", "pp_schedule": "zbv"}),                   # FSDP casts to bf16
], ids=["pp2-tp2-fp32", "pp2-bf16", "dp2-pp2-bf16-fsdp"])
def test_static_stage_metadata_matches_the_real_tensors(mesh, world, overrides):
    run_on_ranks(steps_with_checked_stage_tensors, world, mesh, {"steps": 1, **overrides})


def test_wrong_stage_metadata_is_detected():
    """Negative control for the test above: a wrong hidden dtype fails the DETAIL check."""
    with pytest.raises(RuntimeError, match="dtype"):
        run_on_ranks(steps_with_wrong_hidden_dtype, 2, "pp=2", {"steps": 1})


def steps_with_wrong_hidden_dtype(mesh: str, overrides: dict) -> dict | None:
    import dataclasses

    import torch

    import models.pipelined

    real = models.pipelined.stage_io

    def wrong(*args):
        io = real(*args)
        return dataclasses.replace(io, activation=io.activation.to(torch.float64))

    models.pipelined.stage_io = wrong
    return steps_with_checked_stage_tensors(mesh, overrides)


@pytest.mark.slow
def test_sixteen_ranks_dp2_tp4_pp2_matches_single_process():
    assert_same_run(single_process(), on_mesh("dp=2,tp=4,pp=2", 16))


# ---------------------------------------------------------------- the CLI

def logged_losses(world: int, out: Path, *flags: str) -> list[float]:
    """Run the CLI on ``world`` processes (torchrun when > 1); the losses it wrote to metrics.jsonl."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone"] if world > 1 else []
    cmd = [sys.executable, *launcher, "-m", "train", "--dataset", "synthetic", "--steps", "2", "--seq-len", "32",
           "--global-batch-size", "8", "--lr", "1e-2", "--warmup-steps", "1", "--output-dir", str(out), *flags]
    proc = run_python(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    return [r["loss"] for r in rows]


def test_torchrun_cli_pipeline(tmp_path):
    """``torchrun -m train --mesh pp=2,tp=2`` logs the losses ``python -m train`` logs on one process."""
    pipelined = logged_losses(4, tmp_path / "pp", "--mesh", "pp=2,tp=2")
    assert pipelined == pytest.approx(logged_losses(1, tmp_path / "one"), rel=1e-5)


# ---------------------------------------------------------------- the timeline tool

def load_timeline_tool():
    spec = importlib.util.spec_from_file_location("pipeline_timeline", ROOT / "tools" / "pipeline_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpipe_recording(p: int, m: int, tf: float, tb: float) -> list[dict]:
    """An ideal GPipe run: all forwards (rank r starts microbatch i at (r+i)*tf), then all backwards."""
    forward_end = (m + p - 1) * tf
    recordings = []
    for r in range(p):
        events = [{"kind": "F", "stage": r, "mb": i, "start": (r + i) * tf, "end": (r + i + 1) * tf} for i in range(m)]
        events += [{"kind": "B", "stage": r, "mb": m - 1 - k, "start": forward_end + (p - 1 - r + k) * tb,
                    "end": forward_end + (p - r + k) * tb} for k in range(m)]
        recordings.append({"rank": r, "pp": p, "microbatches": m, "schedule": "gpipe", "stages": [r], "events": events})
    return recordings


def test_bubble_of_an_ideal_schedule_is_the_theory():
    tool = load_timeline_tool()
    stats = tool.bubble(gpipe_recording(p=4, m=8, tf=1.0, tb=2.0))
    assert stats["theory"] == pytest.approx(3 / 11)
    assert stats["measured"] == pytest.approx(3 / 11)
    trace = tool.chrome_trace(gpipe_recording(p=2, m=2, tf=1.0, tb=2.0))
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 2 * 2 * 2 and {e["pid"] for e in complete} == {0, 1}


def test_timeline_tool_records_every_action(tmp_path):
    """A real 2-stage 1F1B run: in each timed step every rank records m forwards and m backwards,
    the last one also m losses; trace and PNG are written."""
    cmd = [sys.executable, str(ROOT / "tools" / "pipeline_timeline.py"), "--pp", "2", "--microbatches", "4",
           "--batch", "8", "--seq-len", "32", "--steps", "2", "--out", str(tmp_path)]
    proc = run_python(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "theory (p-1)/(m+p-1) = 0.200" in proc.stdout and "theory for these stages' measured times" in proc.stdout
    for r in load_timeline_tool().load_recording(tmp_path / "recording"):
        assert len(r["steps"]) == 2
        losses = [("L", i) for i in range(4)] if r["rank"] == 1 else []
        for events in r["steps"]:
            kinds = sorted((e["kind"], e["mb"]) for e in events)
            assert kinds == sorted([("F", i) for i in range(4)] + [("B", i) for i in range(4)] + losses)
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
