"""``python -m train --dry-run``: one simulated rank predicts a real rank's peak tensor memory
(within 10%) and its collective bytes per mesh dim (exactly), and rejects what a real run rejects.

"Measured" is the real run's second step on gloo, every tensor storage counted by torch's
``MemTracker`` (the CPU has no allocator statistic like ``torch.cuda.max_memory_allocated``:
the tracker sees each storage an operator creates and when it is freed). "Predicted" is the
dry run of the same configuration, where nothing is allocated. The model is wide enough
(dim 512) that tensors, not bookkeeping, make up the peak.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rank_harness import run_on_ranks, run_python

ROOT = Path(__file__).resolve().parents[1]
WIDE = dict(model="debug", model_args="dim=512,n_heads=8,n_kv_heads=4,ffn_dim=1536,n_layers=2,vocab_size=4096",
            dataset="synthetic", seq_len=256, global_batch_size=4)
MEMORY_TOLERANCE = 0.10


def flags(options: dict) -> list[str]:
    return [part for name, value in options.items() for part in ("--" + name.replace("_", "-"), str(value))]


def dry_run(world: int, mesh: str, options: dict, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """The CLI's dry run (a child process: one process plays one rank); its dry_run.json if it succeeded."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "train", "--dry-run", "--world-size", str(world), "--mesh", mesh,
                   "--device", "cpu", "--output-dir", out, *flags(options), *extra]
        result = run_python(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        report = json.loads((Path(out) / "dry_run.json").read_text()) if result.returncode == 0 else None
    return result, report


def measured_second_step(mesh: str, options: dict) -> dict:
    """On this rank of a real gloo run: peak bytes alive during its second step, and the bytes of
    every collective of that step by mesh dim."""
    from train.config import TrainConfig
    from train.dry_run import measure_real_step
    from train.loop import build_trainer

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**options, "mesh": mesh, "output_dir": out, "checkpoint_every": 0}))
        measured = measure_real_step(t)
        t.batches.close()
    return measured


@pytest.mark.parametrize("mesh, world, extra", [
    ("", 1, {}),
    ("dp=2", 2, {}),                                  # FSDP
    ("dp=2", 2, {"dp_mode": "replicate"}),
    ("cp=2", 2, {}),                                  # ring attention
    # tensor + sequence parallel, loss parallel, FSDP's bf16 casts on a one-rank mesh, recomputation
    ("tp=2", 2, {"dtype": "bfloat16", "activation_checkpoint": "selective"}),
    ("pp=2", 2, {}),                                  # 1F1B, 4 microbatches: the schedule's P2P, two stage roles
])
def test_dry_run_predicts_memory_and_collectives(mesh, world, extra):
    options = {**WIDE, **extra}
    measured = run_on_ranks(measured_second_step, world, mesh, options)[0]
    result, report = dry_run(world, mesh, options)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = report["ranks"][0]
    assert abs(predicted["memory_bytes"]["peak"] / measured["peak"] - 1) < MEMORY_TOLERANCE, \
        (predicted["memory_bytes"]["peak"], measured["peak"])
    assert predicted["collectives"] == measured["collectives"]


def test_expert_parallel_is_simulated_with_balanced_routing():
    """ep=2, bf16: the dry run sends every rank an even share of the (token, choice) rows; the
    real run routes a random-init model near evenly, so its peak and all-to-all bytes are close
    (within 1% for the bytes: the count exchange is exact, the rows move by routing's skew)."""
    options = {**WIDE, "model": "debug-moe", "dtype": "bfloat16",
               "model_args": "dim=512,n_heads=8,n_kv_heads=4,moe_ffn_dim=512,n_layers=2,vocab_size=4096"}
    measured = run_on_ranks(measured_second_step, 2, "ep=2", options)[0]
    result, report = dry_run(2, "ep=2", options)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = report["ranks"][0]
    assert abs(predicted["memory_bytes"]["peak"] / measured["peak"] - 1) < MEMORY_TOLERANCE
    assert predicted["collectives"].keys() == measured["collectives"].keys() == {"ep"}
    assert abs(predicted["collectives"]["ep"] / measured["collectives"]["ep"] - 1) < 0.01


def test_default_ranks_play_each_pipeline_role():
    from train.dry_run import ranks_to_simulate

    assert ranks_to_simulate("", 8, 1) == [0]
    assert ranks_to_simulate("", 16, 2) == [0, 8]                  # first and last stage
    assert ranks_to_simulate("", 512, 8) == [0, 256, 448]          # first, middle, last: pp is outermost
    assert ranks_to_simulate("3,1", 8, 1) == [1, 3] and ranks_to_simulate("all", 2, 2) == [0, 1]


def test_parameters_gradients_and_optimizer_state_are_the_closed_form():
    """dp=2 FSDP: each rank holds half of every parameter (all dims even): 4 bytes an element,
    the same for its gradient, twice that for AdamW's two moments."""
    import torch

    from models.registry import build_model, get_config, parse_model_args

    _, report = dry_run(2, "dp=2", WIDE)
    with torch.device("meta"):
        model = build_model(get_config("debug", **parse_model_args("debug", WIDE["model_args"])))
    half = sum(p.numel() for p in model.parameters()) // 2
    memory = report["ranks"][0]["memory_bytes"]
    assert (memory["params"], memory["grads"], memory["optimizer"]) == (4 * half, 4 * half, 8 * half)


def test_several_ranks_and_init_timing():
    result, report = dry_run(4, "dp=2,tp=2", WIDE, "--dry-run-ranks", "0,3", "--dry-run-init")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 3] and all(r["init_seconds"] > 0 for r in ranks)
    assert "| 0 |" in result.stdout and "| 3 |" in result.stdout


@pytest.mark.parametrize("extra, message", [
    (["--mesh", "dp=2,tp=3"], "model n_heads=8 is not divisible by tp=3"),  # what a real run says
    (["--mesh", "dp=3,pp=2", "--global-batch-size", "12", "--pp-schedule", "zbv"],
     "does not simulate --pp-schedule zbv"),
    (["--model", "debug-moe", "--mesh", "dp=3,ep=2", "--global-batch-size", "12", "--device", "cpu"],
     "MoE model needs bf16 compute"),
    (["--mesh", "dp=6", "--global-batch-size", "12", "--dry-run-ranks", "9"],
     "--dry-run-ranks '9': ranks must lie in [0, 5]"),
    (["--world-size", "0"], "--dry-run needs --world-size N"),
])
def test_impossible_layouts_are_one_line(extra, message):
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "train", "--dry-run", "--world-size", "6", "--output-dir", out, *extra]
        result = run_python(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
