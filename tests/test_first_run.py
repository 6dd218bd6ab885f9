"""A newcomer's first runs, on the real CLI: the default trains on real text with the bundled
BPE and says what it does; runs get their own folders; a run's config.toml reruns it; two runs
never share a metrics.jsonl."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rank_harness import run_python

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--global-batch-size", "4", "--seq-len", "32", "--log-every", "1"]


def train(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` in ``cwd`` (its ``outputs/`` is the runs' root)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / "packages" / p) for p in ("core", "models", "train"))}
    return run_python([sys.executable, "-m", "train", *args], cwd=cwd, capture_output=True, text=True,
                      timeout=timeout, env=env)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run(cwd: Path) -> Path:
    runs = [p for p in (cwd / "outputs").iterdir() if p.name != "latest"]
    assert len(runs) == 1, runs
    return runs[0]


def test_default_run_learns_real_text_says_what_it_does_and_its_config_reruns_it(tmp_path):
    result = train(tmp_path, "--steps", "60")
    assert result.returncode == 0, result.stderr
    run_dir = only_run(tmp_path)
    assert run_dir.name.startswith("debug-") and (tmp_path / "outputs" / "latest").resolve() == run_dir.resolve()
    head = result.stdout[:result.stdout.index("\nstep 1/60 |")].splitlines()
    banner = {line.split()[0]: line for line in head if line and not line[0].isspace()}
    assert "1.84M parameters" in banner["model"] and "vocab 4096" in banner["model"]
    assert "one process, no parallelism" in banner["mesh"]
    assert "16 sequences x 128 tokens = 2,048 tokens per step; 60 steps = 122,880 tokens" in banner["step"]
    assert "934 documents, 1,657,931 tokens" in banner["data"] and "epochs" in banner["data"]
    assert "every 500 steps and at step 60" in banner["checkpoints"]
    assert f"saved outputs/{run_dir.name}/checkpoints/step_00000060 (" in result.stdout
    # real text, a real tokenizer: from ln(4096) = 8.3 to below the unigram entropy (6.28 nats,
    # tools/corpus/baselines.py), the best a model that ignores context does
    trained = losses(run_dir)
    assert trained[0] > 7.5 and trained[-1] < 6.1, trained
    # config.toml reruns it, in a new folder: the first steps (in warmup, so the shorter schedule
    # does not change their LR) are the same to the bit
    rerun = train(tmp_path, "--config", str(run_dir / "config.toml"), "--steps", "3", "--run-name", "again")
    assert rerun.returncode == 0, rerun.stderr
    assert losses(tmp_path / "outputs" / "again") == trained[:3]


def test_document_masking_changes_the_default_runs_loss(tmp_path):
    """934 documents packed into 128-token windows: some rows of each batch hold an EOS, so masking
    changes the loss (the template corpus, one document, gave exactly the same). One process is
    deterministic: without the flag the second run would repeat the first to the bit."""
    plain = train(tmp_path, "--steps", "2", "--checkpoint-every", "0", "--run-name", "plain")
    masked = train(tmp_path, "--steps", "2", "--checkpoint-every", "0", "--run-name", "masked", "--document-masking")
    assert plain.returncode == masked.returncode == 0, plain.stderr + masked.stderr
    a, b = losses(tmp_path / "outputs" / "plain"), losses(tmp_path / "outputs" / "masked")
    assert all(abs(x - y) > 1e-6 * abs(x) for x, y in zip(a, b)), (a, b)


def test_run_names_resume_in_their_folder_and_runs_never_mix(tmp_path):
    first = train(tmp_path, *FAST, "--steps", "2", "--checkpoint-every", "1", "--run-name", "exp")
    assert first.returncode == 0, first.stderr
    exp = tmp_path / "outputs" / "exp"
    (exp / "metrics.jsonl").open("a").write('{"step": 3, "loss": 99.0}\n')  # logged after the last checkpoint
    # the same name resumes it (--resume auto looks only in its own folder) and the stale row goes
    more = train(tmp_path, *FAST, "--steps", "4", "--checkpoint-every", "1", "--run-name", "exp")
    assert more.returncode == 0, more.stderr
    assert "resumed from outputs/exp/checkpoints/step_00000002 at step 2" in more.stdout
    rows = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and 99.0 not in [r["loss"] for r in rows]
    # --resume PATH without a name continues that run in its own folder
    on = train(tmp_path, *FAST, "--steps", "5", "--resume", str(exp / "checkpoints"))
    assert on.returncode == 0, on.stderr
    assert [json.loads(line)["step"] for line in (exp / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    # no name: a new folder, which finds nothing to resume
    fresh = train(tmp_path, *FAST, "--steps", "1")
    assert fresh.returncode == 0 and "starting at step 0" in fresh.stdout, fresh.stderr
    # a second run started fresh in a folder that holds one is refused, before it writes anything
    clash = train(tmp_path, *FAST, "--steps", "1", "--resume", "none", "--run-name", "exp")
    assert clash.returncode == 2 and clash.stderr.strip().splitlines() == [
        "error: outputs/exp already holds a run's metrics.jsonl but no checkpoint this run resumes from, so two "
        "runs would mix there: pick a new --run-name (or leave it out for a new folder), or delete outputs/exp to "
        "start over"]
    assert len((exp / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("platform, rss, mib", [("linux", 2048, 2.0), ("darwin", 2 * 2**20, 2.0)])
def test_peak_memory_reads_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, rss, mib):
    """Linux reports ru_maxrss in KiB, macOS in bytes."""
    import torch

    from train import loop

    monkeypatch.setattr(loop.sys, "platform", platform)
    monkeypatch.setattr(loop.resource, "getrusage", lambda who: type("Usage", (), {"ru_maxrss": rss}))
    assert loop.peak_memory_mib(torch.device("cpu")) == mib
