"""Every benchmark runs: each script in a cheap mode, so a rename or API change cannot break one silently."""

import sys
from pathlib import Path

import pytest
from rank_harness import run_python

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


ROWS = [
    ("bench_checkpoint.py", ["--smoke"], ["save s", "load s", "CRC-32"]),
    ("bench_context_parallel.py", ["--smoke"], ["attention op", "ring block", "training step"]),
    ("bench_dry_run.py", ["--smoke"], ["| dp=2 FSDP |", "| equal |", "| debug | 8 | dp=8"]),
    ("bench_init.py", ["--smoke"], ["| debug | dp=4 |", "| debug | dp=2,tp=2 |", "full / tiled"]),
    ("bench_meshes.py", ["--steps", "2", "--seq-len", "32", "--global-batch-size", "4", "--meshes", "dp=2"], ["dp=2"]),
    ("bench_moe_mesh.py", ["--mesh", "ep=2"], ["same run"]),
    ("bench_step.py", ["--smoke"], ["dp=2 fsdp", "no communication", "selective", "x eager", "grouped ms"]),
    ("gpu_acceptance.py", ["--smoke", "--out", "{tmp}/gpu_acceptance.md"],
     ["| no host sync between reports (CPU twin) | 1 passed", "| bf16 |", "| float8 |", "float8 / bf16 tokens/s"]),
]


@pytest.mark.parametrize("script, args, expect", ROWS)
def test_benchmark_runs(script, args, expect, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_python([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expect:
        assert text in result.stdout, result.stdout[-3000:]
    listed = sorted({row[0] for row in ROWS})
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == listed, \
        "a new benchmark needs a row here"
