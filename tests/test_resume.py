"""Checkpoints in the trainer: exact resume after kill -9, resume on another mesh, clear errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_cli import read_metrics, run, torchrun

# warmup (20 steps) spans every run here, so the LR schedule does not depend on --steps
SMALL = ["--global-batch-size", "4", "--seq-len", "32", "--checkpoint-every", "2"]
TRAIN = [sys.executable, "-m", "train"]


def last_loss_per_step(out_dir) -> dict[int, float]:
    """Loss by step; a resumed run re-logs the steps after its checkpoint, the last record wins."""
    return {row["step"]: row["loss"] for row in read_metrics(out_dir)}


def test_kill_9_at_a_random_step_then_resume_gives_the_same_losses(tmp_path):
    steps = 10
    reference = run([*TRAIN, *SMALL, "--steps", str(steps), "--output-dir", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr
    kill_after = random.Random(os.getpid()).randint(3, steps - 1)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "train", *SMALL, "--steps", str(steps), "--output-dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run([sys.executable, "-m", "train", *SMALL, "--steps", str(steps), "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout, f"killed after step {kill_after}: {resumed.stdout[-500:]}"
    assert last_loss_per_step(out) == last_loss_per_step(tmp_path / "ref"), f"killed after step {kill_after}"


def test_resume_on_a_different_mesh_continues_the_same_run(tmp_path):
    steps = ["--steps", "6"]
    reference = run([sys.executable, "-m", "train", *SMALL, *steps, "--output-dir", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr
    first = run(torchrun(4, *SMALL, "--steps", "2", "--mesh", "dp=2,tp=2", "--output-dir", str(tmp_path / "a")))
    assert first.returncode == 0, first.stderr
    for world, mesh in ((4, "tp=4"), (1, "")):
        out = tmp_path / f"resumed-{world}"
        cmd = torchrun(world, *SMALL, *steps, "--mesh", mesh, "--resume", str(tmp_path / "a" / "checkpoints"),
                       "--output-dir", str(out))
        result = run(cmd)
        assert result.returncode == 0, result.stderr
        expected = last_loss_per_step(tmp_path / "ref")
        got = last_loss_per_step(out)
        assert sorted(got) == [3, 4, 5, 6]
        assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-5)


def test_async_checkpoints_resume_like_sync_ones(tmp_path):
    reference = run([sys.executable, "-m", "train", *SMALL, "--steps", "6", "--output-dir", str(tmp_path / "ref")])
    first = run([*TRAIN, *SMALL, "--steps", "4", "--async-checkpoint", "--output-dir", str(tmp_path / "a")])
    assert reference.returncode == 0 and first.returncode == 0, first.stderr
    assert (tmp_path / "a" / "checkpoints" / "step_00000004" / "COMPLETE.json").exists()
    resumed = run([sys.executable, "-m", "train", *SMALL, "--steps", "6", "--output-dir", str(tmp_path / "a")])
    assert resumed.returncode == 0, resumed.stderr
    assert last_loss_per_step(tmp_path / "a") == last_loss_per_step(tmp_path / "ref")


def test_resume_errors_name_the_problem(tmp_path):
    missing = run([sys.executable, "-m", "train", *SMALL, "--steps", "2", "--resume", str(tmp_path / "nowhere"),
                   "--output-dir", str(tmp_path / "x")])
    assert missing.returncode != 0 and "no complete checkpoint there" in missing.stderr
    saved = run([sys.executable, "-m", "train", *SMALL, "--steps", "2", "--output-dir", str(tmp_path / "a")])
    assert saved.returncode == 0, saved.stderr
    meta_path = tmp_path / "a" / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["rope_theta"] = 1.0  # same shapes, different model
    meta_path.write_text(json.dumps(meta))
    mismatch = run([sys.executable, "-m", "train", *SMALL, "--steps", "4", "--output-dir", str(tmp_path / "a")])
    assert mismatch.returncode != 0 and "holds a different model" in mismatch.stderr
    shard = next((tmp_path / "a" / "checkpoints" / "step_00000002").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated shard
    corrupt = run([sys.executable, "-m", "train", *SMALL, "--steps", "4", "--output-dir", str(tmp_path / "a")])
    assert corrupt.returncode != 0 and "step_00000002" in corrupt.stderr


def test_wandb_run_id_is_saved_and_the_same_run_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = subprocess.run([sys.executable, "-m", "train", *SMALL, "--steps", "2", "--wandb", "--output-dir", str(out)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    run_id = json.loads((out / "checkpoints" / "step_00000002" / "meta.json").read_text())["wandb_run_id"]
    assert run_id
    second = subprocess.run([*TRAIN, *SMALL, "--steps", "4", "--wandb", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "checkpoints" / "step_00000004" / "meta.json").read_text())["wandb_run_id"] == run_id
    assert len(list(out.glob(f"wandb/offline-run-*-{run_id}*"))) == 2  # both sessions wrote into the same run id


def test_export_to_hf_then_init_from_it_on_another_mesh(tmp_path):
    """tools/hf_convert.py export -> --init-from: the same starting weights on any mesh."""
    trained = run([sys.executable, "-m", "train", *SMALL, "--steps", "2", "--output-dir", str(tmp_path / "a")])
    assert trained.returncode == 0, trained.stderr
    export = run([sys.executable, "tools/hf_convert.py", "export", str(tmp_path / "a" / "checkpoints"),
                  str(tmp_path / "hf")])
    assert export.returncode == 0, export.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors"}
    first_losses = {}
    for world, mesh in ((1, ""), (2, "tp=2")):
        out = tmp_path / f"init-{world}"
        result = run(torchrun(world, *SMALL, "--steps", "1", "--mesh", mesh, "--init-from", str(tmp_path / "hf"),
                              "--output-dir", str(out)))
        assert result.returncode == 0, result.stderr
        first_losses[mesh] = read_metrics(out)[0]["loss"]
    assert first_losses["tp=2"] == pytest.approx(first_losses[""], rel=1e-5)
    fresh = read_metrics(tmp_path / "a")[0]["loss"]
    assert abs(first_losses[""] - fresh) > 1e-3, "--init-from did not change the starting weights"


def test_pipeline_checkpoint_resumes_without_pipeline(tmp_path):
    """Stages save whole-model names, so a pp=2 checkpoint loads on one process (and back)."""
    reference = run([sys.executable, "-m", "train", *SMALL, "--steps", "4", "--output-dir", str(tmp_path / "ref")])
    saved = run(torchrun(2, *SMALL, "--steps", "2", "--mesh", "pp=2", "--output-dir", str(tmp_path / "pp")))
    assert reference.returncode == 0 and saved.returncode == 0, saved.stderr
    resumed = run([*TRAIN, *SMALL, "--steps", "4", "--resume", str(tmp_path / "pp" / "checkpoints"),
                   "--output-dir", str(tmp_path / "one")])
    assert resumed.returncode == 0, resumed.stderr
    expected, got = last_loss_per_step(tmp_path / "ref"), last_loss_per_step(tmp_path / "one")
    assert sorted(got) == [3, 4] and [got[s] for s in (3, 4)] == pytest.approx([expected[s] for s in (3, 4)], rel=1e-5)


def test_moe_checkpoint_from_expert_parallel_resumes_on_one_process(tmp_path):
    """Expert weights sharded over ep (and the expert-bias buffers) reshard like everything else."""
    moe = ["--model", "debug-moe-v3"]
    reference = run([*TRAIN, *SMALL, *moe, "--steps", "4", "--output-dir", str(tmp_path / "ref")])
    saved = run(torchrun(2, *SMALL, *moe, "--steps", "2", "--mesh", "ep=2", "--output-dir", str(tmp_path / "ep")))
    assert reference.returncode == 0 and saved.returncode == 0, saved.stderr
    resumed = run([*TRAIN, *SMALL, *moe, "--steps", "4", "--resume", str(tmp_path / "ep" / "checkpoints"),
                   "--output-dir", str(tmp_path / "one")])
    assert resumed.returncode == 0, resumed.stderr
    expected, got = last_loss_per_step(tmp_path / "ref"), last_loss_per_step(tmp_path / "one")
    assert sorted(got) == [3, 4] and [got[s] for s in (3, 4)] == pytest.approx([expected[s] for s in (3, 4)], rel=1e-5)
