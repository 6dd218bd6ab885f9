"""A cluster's faults, on the real CLI (1-2 ranks, gloo): preemption signals end in one agreed,
saved step; a too-slow save ends at its deadline with the last good checkpoint named."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rank_harness import run_python

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--global-batch-size", "4", "--seq-len", "32", "--checkpoint-every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(str(ROOT / "packages" / p) for p in ("core", "models", "train"))}


def start(cwd: Path, *args: str, ranks: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "train"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "train"]
    return subprocess.Popen([*launcher, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(row["step"] >= step for row in steps_logged(run_dir)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no step {step} in {run_dir}"
        time.sleep(0.02)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The torchrun workers (children of the launcher), in rank order of their start."""
    out = run_python(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(pid) for pid in out)


def test_sigterm_saves_the_step_and_the_same_command_resumes_it_bitwise(tmp_path):
    steps = ["--steps", "150", "--log-every", "1"]
    reference = start(tmp_path, *FAST, *steps, "--run-name", "straight")
    reference.communicate(timeout=300)
    cut = start(tmp_path, *FAST, *steps, "--run-name", "cut")
    wait_for_step(tmp_path / "outputs" / "cut", 3, cut)
    cut.send_signal(signal.SIGTERM)
    out, err = cut.communicate(timeout=60)
    assert cut.returncode == 4, err
    stopped = steps_logged(tmp_path / "outputs" / "cut")[-1]["step"]
    assert 3 <= stopped < 150
    saved = f"outputs/cut/checkpoints/step_{stopped:08d}"
    assert err.strip().splitlines()[-1] == (f"preempted: stopped by SIGTERM after step {stopped}; saved {saved}: run "
                                            f"the same command again to resume from it"), err
    assert "Traceback" not in err and (tmp_path / saved / "COMPLETE.json").is_file()
    again = start(tmp_path, *FAST, *steps, "--run-name", "cut")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"resumed from {saved} at step {stopped}" in out
    assert [r["loss"] for r in steps_logged(tmp_path / "outputs" / "cut")] == \
        [r["loss"] for r in steps_logged(tmp_path / "outputs" / "straight")]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_saved_step(tmp_path):
    run = start(tmp_path, *FAST, "--steps", "2000", "--mesh", "dp=2", "--run-name", "two", ranks=2)
    wait_for_step(tmp_path / "outputs" / "two", 3, run)
    workers = worker_pids(run)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)  # what SLURM's --signal would send; to one rank only
    out, err = run.communicate(timeout=120)
    stopped = steps_logged(tmp_path / "outputs" / "two")[-1]["step"]
    assert f"preempted: stopped by SIGUSR1 after step {stopped}; saved outputs/two/checkpoints/" \
           f"step_{stopped:08d}" in err, err
    assert (tmp_path / "outputs" / "two" / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE.json").is_file()
    assert "exitcode  : 4" in err  # both workers stopped the same way (torchrun's summary)


def test_a_save_past_the_deadline_stops_with_the_newest_complete_checkpoint_named(tmp_path):
    run = start(tmp_path, *FAST, "--steps", "2000", "--checkpoint-every", "2", "--keep-checkpoints", "0",
                "--preemption-deadline-s", "0.001", "--run-name", "late")
    wait_for_step(tmp_path / "outputs" / "late", 3, run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 5, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM: the step and its save did not finish within --preemption-deadline-s "
                           "0.001; stopping without it. The newest complete checkpoint is outputs/late/checkpoints/"
                           "step_"), err
    assert (tmp_path / last.rsplit(" ", 1)[-1] / "COMPLETE.json").is_file()


def limit_file_size(limit: int):
    """For a child process: files it writes stop at ``limit`` bytes (EFBIG), a disk-full-like I/O
    error without privileges (Python ignores SIGXFSZ, so the write fails instead of killing it)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_an_io_error_during_a_save_is_one_line_and_the_previous_checkpoint_resumes(tmp_path):
    args = [sys.executable, "-m", "train", *FAST, "--checkpoint-every", "2", "--run-name", "io"]
    first = run_python([*args, "--steps", "2"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    full = run_python([*args, "--steps", "4"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                      preexec_fn=limit_file_size(2 * 2**20))  # smaller than a 10.6 MiB shard
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1, full.stderr
    assert lines[0].startswith("error: writing checkpoint step 4 into outputs/io/checkpoints/.tmp-step_00000004 "
                               "failed on rank 0: File too large [errno 27]"), lines
    assert lines[0].endswith("The newest complete checkpoint, outputs/io/checkpoints/step_00000002, is intact: fix "
                             "the folder (space, permissions) and resume from it")
    resumed = run_python([*args, "--steps", "4"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from outputs/io/checkpoints/step_00000002 at step 2" in resumed.stdout


def test_a_rank_that_stops_mid_save_ends_the_job_in_one_line_per_rank_within_the_timeout(tmp_path):
    """--dist-timeout-s bounds the checkpoint's own groups too (they waited torch's 30 minutes before)."""
    run = start(tmp_path, *FAST, "--steps", "5000", "--mesh", "dp=2", "--checkpoint-every", "1",
                "--dist-timeout-s", "5", "--run-name", "hang", ranks=2)
    wait_for_step(tmp_path / "outputs" / "hang", 3, run)
    silent = worker_pids(run)[1]
    checkpoints = tmp_path / "outputs" / "hang" / "checkpoints"
    while not list(checkpoints.glob(".tmp-step_*")):  # a save is under way: stop rank 1 inside it
        time.sleep(0.001)
    os.kill(silent, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        out, err = run.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun has usually killed it
            os.kill(silent, signal.SIGCONT)
        if run.poll() is None:  # a hang must not outlive the test
            run.terminate()
            run.wait(timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: rank 0: a collective timed out (--dist-timeout-s): rank 1 "
                                           "stopped answering (hung, stopped or dead)"), err
    assert "Traceback (most recent call last):\n  File \"/" not in err.split("torch.distributed.elastic")[0], err
    dump = json.loads((tmp_path / "outputs" / "hang" / "flight_recorder" / "rank0.json").read_text())
    assert dump["entries"] and all("profiling_name" in entry for entry in dump["entries"])
    assert time.monotonic() - stopped_at < 5 + 10 + 30 + 15  # timeout, naming wait, torchrun's kill grace, slack


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_bitwise_equal(tmp_path):
    """Plain torchrun --max-restarts=1 on one node: the restarted group finds its run (named after the
    launch) and resumes it; without the per-attempt store namespace, init failed on the dead ranks'
    addresses (pytorch/pytorch#135712)."""
    args = [*FAST, "--steps", "120", "--mesh", "dp=2", "--checkpoint-every", "4", "--log-every", "1"]
    straight = start(tmp_path, *args, "--run-name", "straight", ranks=2)
    assert straight.wait(timeout=300) == 0
    restarted = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts=1", "--nproc_per_node=2",
         "-m", "train", *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dirs = lambda: [p for p in (tmp_path / "outputs").iterdir() if p.name.startswith("debug-")]  # noqa: E731
    deadline = time.monotonic() + 120
    while not run_dirs():
        assert time.monotonic() < deadline and restarted.poll() is None
        time.sleep(0.05)
    wait_for_step(run_dirs()[0], 10, restarted)
    os.kill(worker_pids(restarted)[1], signal.SIGKILL)
    try:
        out, err = restarted.communicate(timeout=240)
    finally:
        if restarted.poll() is None:  # a failing run must not outlive the test: torchrun stops its workers
            restarted.terminate()
            restarted.wait(timeout=60)
    assert restarted.returncode == 0, err
    assert len(run_dirs()) == 1 and "resumed from outputs/debug-" in out
    assert [r["loss"] for r in steps_logged(run_dirs()[0])] == \
        [r["loss"] for r in steps_logged(tmp_path / "outputs" / "straight")]


def flip_bits(shard: Path, count: int = 256) -> None:
    """Flip one mantissa bit in ``count`` float32 values of the shard's data region (header intact)."""
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(count):
        data[header + 4 * (i * 97) + 1] ^= 0x10
    shard.write_bytes(bytes(data))


def test_bit_rot_is_caught_by_checksums_and_auto_resume_falls_back_to_an_intact_checkpoint(tmp_path):
    args = [sys.executable, "-m", "train", *FAST, "--checkpoint-every", "2", "--keep-checkpoints", "0",
            "--log-every", "1"]
    straight = run_python([*args, "--steps", "6", "--run-name", "straight"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    first = run_python([*args, "--steps", "4", "--run-name", "rot"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    step4 = tmp_path / "outputs" / "rot" / "checkpoints" / "step_00000004"
    shard = sorted(step4.glob("*.safetensors"))[0]
    flip_bits(shard)
    named = run_python([*args, "--steps", "6", "--run-name", "rot", "--resume", str(step4)], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True)
    assert named.returncode == 2 and named.stderr.strip().splitlines() == [
        f"error: checkpoint {step4}: shard {shard.name} does not match the checksum saved with it: its bytes changed "
        f"after the save (bit rot, a partial copy); restore it or resume from an older checkpoint"], named.stderr
    auto = run_python([*args, "--steps", "6", "--run-name", "rot"], cwd=tmp_path, env=ENV,
                      capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr
    assert f"shard {shard.name} does not match the checksum saved with it" in auto.stderr
    assert "falling back to the next older checkpoint" in auto.stderr
    assert "resumed from outputs/rot/checkpoints/step_00000002 at step 2" in auto.stdout
    assert [r["loss"] for r in steps_logged(tmp_path / "outputs" / "rot")] == \
        [r["loss"] for r in steps_logged(tmp_path / "outputs" / "straight")]


def test_one_run_per_folder_and_a_dead_runs_lock_does_not_block_a_resume(tmp_path):
    first = start(tmp_path, *FAST, "--steps", "5000", "--checkpoint-every", "3", "--run-name", "shared")
    wait_for_step(tmp_path / "outputs" / "shared", 4, first)
    second = run_python([sys.executable, "-m", "train", *FAST, "--steps", "5", "--run-name", "shared"],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: outputs/shared is in use by another run (host {os.uname().nodename}, pid "
                               f"{first.pid}, since "), lines
    first.kill()  # a crash: its lock stays behind
    first.wait(timeout=60)
    assert (tmp_path / "outputs" / "shared" / ".lock").exists()
    resumed = run_python([sys.executable, "-m", "train", *FAST, "--steps", "5000", "--run-name", "shared",
                              "--steps", "8", "--override-lr-schedule"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resumed from outputs/shared/checkpoints/step_" in resumed.stdout, \
        resumed.stderr
    assert not (tmp_path / "outputs" / "shared" / ".lock").exists()  # released at the end


def test_the_launcher_ends_a_signal_or_a_failure_in_lines_of_its_own_not_tracebacks(tmp_path):
    """python -m train.launch is torchrun with torchrun's options; SIGTERM to it reaches the workers,
    which save; a failed worker is named with its exit code."""
    launcher = [sys.executable, "-m", "train.launch", "--standalone", "--nproc_per_node=2", "-m", "train"]
    run = subprocess.Popen([*launcher, *FAST, "--steps", "5000", "--mesh", "dp=2", "--run-name", "l"], cwd=tmp_path,
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "outputs" / "l", 3, run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    stopped = steps_logged(tmp_path / "outputs" / "l")[-1]["step"]
    assert run.returncode == 4, err
    assert err.strip().splitlines() == [
        "SIGTERM received: finishing this step and saving it (deadline 20 s)"] * 2 + [
        f"preempted: stopped by SIGTERM after step {stopped}; saved outputs/l/checkpoints/step_{stopped:08d}: run "
        f"the same command again to resume from it",
        "launcher: SIGTERM passed to the workers, which finish their step and save it; their lines above name the "
        "checkpoint"], err
    bad = run_python([*launcher, "--steps", "0"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                     timeout=120)
    *workers, last = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and set(workers) == {"error: --steps 0: must be >= 1"}, bad.stderr  # 1 or 2 ranks:
    assert last.startswith("error: launcher: rank ") and last.endswith(  # the first to fail stops the other
        " ended with exit code 2 (a mistake in the input); its own lines above say more"), bad.stderr
