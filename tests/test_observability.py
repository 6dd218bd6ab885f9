"""Seeing where time goes and what the run did: torch.profiler traces per rank, TensorBoard scalars."""

import json
import subprocess
import sys

import pytest
from rank_harness import run_python

FAST = ["--dataset", "synthetic", "--global-batch-size", "4", "--seq-len", "32"]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = run_python([sys.executable, *args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_profile_steps_write_one_chrome_trace_per_rank(tmp_path):
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *FAST, "--mesh", "dp=2",
        "--steps", "3", "--profile-steps", "2-3", "--output-dir", str(tmp_path))
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert traces == ["rank0_steps2-3.json", "rank1_steps2-3.json"]
    for name in traces:
        events = json.loads((tmp_path / "profile" / name).read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        assert "aten::mm" in names, "the trace records the model's matmuls"
        assert any(str(n).startswith("gloo:all_reduce") or "all_reduce" in str(n) for n in names), \
            "and the collectives"


def test_tensorboard_scalars_match_metrics_jsonl_across_a_resume(tmp_path):
    """A run stopped after step 4 and resumed from its step-2 checkpoint reads as one run: the
    resumed steps 3-4 replace the first run's, as the last records of metrics.jsonl do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path)
    run("-m", "train", *FAST, "--steps", "4", "--checkpoint-every", "2", "--tensorboard", "--output-dir", out)
    run("-m", "train", *FAST, "--steps", "6", "--tensorboard", "--resume", f"{out}/checkpoints/step_00000002",
        "--output-dir", out)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        logged[row["step"]] = row  # the last record of a step wins
    assert {"loss", "grad_norm", "lr", "tokens_per_sec"} <= set(events.Tags()["scalars"])
    for tag in ("loss", "grad_norm", "lr"):
        scalars = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in scalars] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in scalars] == pytest.approx([logged[s][tag] for s, _ in scalars], rel=1e-6)
