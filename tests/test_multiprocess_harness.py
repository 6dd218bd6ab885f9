"""The harness itself: results come back per rank, a failing rank fails the test fast, the caller's
environment reaches the ranks, and a forked CLI run answers what a fresh interpreter does."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from rank_harness import run_on_ranks, run_python


def _all_reduce_rank() -> torch.Tensor:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t


def _rank1_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the harness's kill


def _environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def test_results_come_back_in_rank_order():
    results = run_on_ranks(_all_reduce_rank, 3)
    assert [r.item() for r in results] == [3.0, 3.0, 3.0]


def test_one_failing_rank_fails_fast_without_hanging():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_on_ranks(_rank1_raises, 2, timeout=120)


def test_ranks_see_the_callers_environment_at_the_call(monkeypatch):
    """The forkserver starts before the variable is set (or already has): the ranks still see it."""
    assert run_on_ranks(_environment_variable, 1, "MESHTRON_HARNESS_PROBE") == [None]
    monkeypatch.setenv("MESHTRON_HARNESS_PROBE", "set after the server started")
    assert run_on_ranks(_environment_variable, 2, "MESHTRON_HARNESS_PROBE") == ["set after the server started"] * 2


@pytest.mark.parametrize("args", [["--steps", "0"], ["--dataset", "synthetic", "--steps", "1", "--seq-len", "16",
                                                     "--global-batch-size", "2", "--run-name", "probe"]])
def test_a_forked_cli_run_answers_what_a_fresh_interpreter_does(tmp_path, args):
    """Exit code, stdout and stderr of ``python -m train`` (an error, then a short run, each in a folder
    of its own) are those of a subprocess: the forked run is a faithful stand-in for the CLI tests."""
    cmd = [sys.executable, "-m", "train", *args]
    (tmp_path / "forked").mkdir()
    (tmp_path / "fresh").mkdir()
    forked = run_python(cmd, cwd=tmp_path / "forked", timeout=120)
    fresh = subprocess.run(cmd, cwd=tmp_path / "fresh", capture_output=True, text=True, timeout=120)
    assert forked.returncode == fresh.returncode, (forked.stderr, fresh.stderr)
    assert forked.stderr == fresh.stderr
    assert forked.stdout.splitlines()[:6] == fresh.stdout.splitlines()[:6]
