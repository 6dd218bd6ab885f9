"""``tools/plan.py`` and its model (``train.planner``): the layouts it proposes are ones the
trainer accepts, its memory estimate agrees with the dry run's, and the CLI ranks, checks
and refuses as it says. One process each (the dry runs are child processes)."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rank_harness import run_python

from models.registry import get_config, parse_model_args
from train.config import parse_config
from train.planner import HARDWARE, Layout, model_shape, plan, rank_memory
from train.validation import validate

ROOT = Path(__file__).resolve().parents[1]
# llama3-8b's block (the dims the planner's activation bytes were fitted at), 4 layers, a small
# vocabulary: the layers' activations, not the logits, make the peak
SLICE = "dim=4096,n_heads=32,n_kv_heads=8,ffn_dim=14336,n_layers=4,vocab_size=1024"
PLAN_TOLERANCE = 0.15


def test_planned_layouts_pass_the_trainers_checks():
    """Every layout the planner ranks is one ``python -m train`` accepts on that many ranks."""
    estimates = plan(get_config("llama3-8b"), 8, 8192, 64, HARDWARE["h100"], 0.5)
    assert estimates and all(a.tokens_per_second_per_gpu >= b.tokens_per_second_per_gpu
                             for a, b in zip(estimates, estimates[1:]) if a.fits and b.fits)
    pipelined = [e for e in estimates if e.layout.pp > 1][:10]
    for e in estimates[:10] + pipelined:
        flags = ["--model", "llama3-8b", "--seq-len", "8192", "--global-batch-size", "64", "--device", "cpu",
                 *e.layout.flags()]
        validate(parse_config(flags), 8)  # raises on a layout the trainer refuses


@pytest.mark.parametrize("world, layout", [
    (2, Layout(1, 1, 1, 2, 1, "fsdp", "selective")),                        # tensor + sequence parallel
    (4, Layout(2, 2, 1, 1, 1, "fsdp", "full", "1f1b", 2)),                  # pipeline: buffers, gathered stage
])
def test_planned_memory_is_the_dry_runs(world, layout):
    """The closed form within 15% of the dry run of the same layout (its fullest simulated rank)."""
    seq, batch = 8192, 4
    config = get_config("llama3-8b", **parse_model_args("llama3-8b", SLICE))
    shape = model_shape(config, seq)
    roles = sorted({0, layout.pp - 1})
    predicted = max(sum(rank_memory(shape, layout, r, seq, batch, 8).values()) for r in roles)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "train", "--dry-run", "--world-size", str(world), "--model", "llama3-8b",
                   "--model-args", SLICE, "--seq-len", str(seq), "--global-batch-size", str(batch),
                   "--dataset", "synthetic", "--output-dir", out, *layout.flags()]
        result = run_python(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        ranks = json.loads((Path(out) / "dry_run.json").read_text())["ranks"]
    simulated = max(r["memory_bytes"]["peak"] for r in ranks)
    assert abs(predicted / simulated - 1) < PLAN_TOLERANCE, (predicted / 2**30, simulated / 2**30)


def plan_cli(*flags: str) -> subprocess.CompletedProcess:
    return run_python([sys.executable, "tools/plan.py", *flags], capture_output=True, text=True, timeout=600,
                      cwd=ROOT)


def test_cli_ranks_and_checks_with_the_dry_run():
    """A ranked table, then the first layout checked by its dry run (a debug model: seconds)."""
    result = plan_cli("--model", "debug", "--gpus", "2", "--seq-len", "256", "--global-batch-size", "4",
                      "--verify", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    checked = [line for line in lines[lines.index("") + 1:] if line.startswith("| 1 |")]
    assert checked and checked[0].split("|")[8].strip() != "-"  # the dry run's peak, in GiB
    assert "run the first: torchrun" in result.stdout


def test_cli_json():
    result = plan_cli("--model", "llama3-8b", "--gpus", "8", "--seq-len", "8192", "--global-batch-size", "64",
                      "--json")
    ranked = json.loads(result.stdout)
    assert len(ranked) == 8 and len({tuple(r["flags"]) for r in ranked}) == 8
    assert all(r["fits"] and r["memory_bytes"] <= 0.9 * HARDWARE["h100"].memory_bytes for r in ranked)
    speeds = [r["tokens_per_second_per_gpu"] for r in ranked]
    assert speeds == sorted(speeds, reverse=True)


@pytest.mark.parametrize("flags, message", [
    (["--gpu", "h900"], "unknown --gpu 'h900'"),
    (["--seq-len", "65536"], "add --model-args max_seq_len=65536"),
    (["--gpus", "1", "--seq-len", "8192"], "no layout of llama3-8b fits 1 x H100"),
    (["--verify", "-1"], "--verify -1 must be >= 0"),
])
def test_bad_input_is_one_line(flags, message):
    base = {"--model": "llama3-8b", "--gpus": "8", "--seq-len": "4096", "--global-batch-size": "64"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    result = plan_cli(*[part for item in base.items() for part in item])
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
