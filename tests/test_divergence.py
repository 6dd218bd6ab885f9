"""A run whose loss or gradient norm turns NaN/inf stops (or, when asked, skips the step) on every
rank at once, applies nothing from that step, saves nothing from it, and logs strict JSON."""

import json
import sys
import tempfile

import pytest
import torch
from rank_harness import run_on_ranks, run_python

from train.parity import BASE, full


def poisoned_step(mesh: str, skip: bool, on_device: bool = False) -> dict:
    """One step whose gradient holds a NaN on global rank 0 only; what apply_gradients did
    (``on_device``: a step between reports, which reads nothing on the host)."""
    import torch.distributed as dist

    from train.config import TrainConfig
    from train.divergence import TrainingDiverged
    from train.loop import apply_gradients, build_trainer, compute_gradients

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out, "skip_nonfinite_steps": skip}))
        loss_share, _ = compute_gradients(t)
        loss = t.model.reduce_loss(loss_share, on_host=not on_device)
        before = {name: full(p) for name, p in t.model.named_parameters()}
        if dist.get_rank() == 0:
            grad = t.model.trainable[0].grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")
        try:
            outcome = apply_gradients(t, loss)
        except TrainingDiverged as err:
            outcome = str(err)
        unchanged = all(torch.equal(full(p), before[name]) for name, p in t.model.named_parameters())
        return {"outcome": outcome, "unchanged": unchanged, "optimizer_steps": len(t.optimizer.state),
                "schedule_step": t.scheduler.last_epoch}


def test_a_nan_gradient_on_one_rank_stops_every_rank_before_the_update():
    results = run_on_ranks(poisoned_step, 2, "dp=2", False)
    for r in results:
        assert isinstance(r["outcome"], str) and "training diverged at step 1: loss" in r["outcome"]
        assert "gradient norm nan" in r["outcome"] and "--skip-nonfinite-steps" in r["outcome"]
        assert r["unchanged"] and r["optimizer_steps"] == 0


def test_skip_nonfinite_steps_drops_only_the_update():
    for r in run_on_ranks(poisoned_step, 2, "dp=2", True):
        grad_norm, _, applied = r["outcome"]
        assert not applied and grad_norm != grad_norm  # NaN
        assert r["unchanged"] and r["optimizer_steps"] == 0
        assert r["schedule_step"] == 1, "the LR schedule moves on with the data"


def test_between_reports_a_nan_step_is_dropped_on_the_device():
    """The fused AdamW kernel is told the step is not finite and leaves weights and moments alone."""
    for r in run_on_ranks(poisoned_step, 2, "dp=2", False, True):
        grad_norm, _, applied = r["outcome"]
        assert isinstance(applied, torch.Tensor) and not applied.item() and grad_norm.isnan().item()
        assert r["unchanged"] and r["schedule_step"] == 1


def test_a_diverging_run_with_log_every_stops_at_the_next_report(tmp_path):
    """--lr 1e30 --log-every 3: step 2 diverges unseen, is dropped on the device, and the report at
    step 3 stops the run (exit 3) naming steps 1-2; nothing non-finite was applied or saved."""
    cmd = [sys.executable, "-m", "train", "--dataset", "synthetic", "--steps", "6", "--global-batch-size", "4",
           "--seq-len", "32", "--lr", "1e30", "--warmup-steps", "1", "--log-every", "3", "--output-dir", str(tmp_path)]
    proc = run_python(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: training diverged between steps 1 and 2 (--log-every 3)" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "metrics.jsonl").read_text().strip(), "no step was reported before the divergence"


def test_a_diverging_run_exits_with_one_line_keeps_its_checkpoint_and_logs_strict_json(tmp_path):
    """--lr 1e30 on 2 ranks: step 1 is finite, step 2 is not; both ranks stop with exit 3."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "--mesh", "dp=2", "--dataset", "synthetic", "--steps", "6", "--global-batch-size", "4", "--seq-len", "32",
           "--lr", "1e30", "--warmup-steps", "1", "--checkpoint-every", "1", "--keep-checkpoints", "1",
           "--output-dir", str(tmp_path)]
    proc = run_python(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("error: training diverged at step 2") == 2, proc.stderr[-3000:]  # both ranks
    assert f"resume from {tmp_path / 'checkpoints' / 'step_00000001'}" in proc.stderr
    assert "/packages/" not in proc.stderr, "a traceback from our code (torchrun adds its own failure summary)"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert [r["step"] for r in rows] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_skipped_steps_are_logged_as_strict_json(tmp_path):
    """With --skip-nonfinite-steps the run ends normally; non-finite values are written as null."""
    cmd = [sys.executable, "-m", "train", "--dataset", "synthetic", "--steps", "3", "--global-batch-size", "4",
           "--seq-len", "32", "--lr", "1e30", "--warmup-steps", "1", "--skip-nonfinite-steps",
           "--output-dir", str(tmp_path)]
    proc = run_python(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert rows[0]["grad_norm"] is not None and "skipped_steps" not in rows[0]
    # (the loss stays finite: RMSNorm rescales the 1e30-sized weights; their gradients do not)
    assert [r["grad_norm"] for r in rows[1:]] == [None, None] and [r["skipped_steps"] for r in rows[1:]] == [1, 2]
