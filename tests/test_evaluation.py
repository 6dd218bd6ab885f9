"""Held-out evaluation: the same eval loss on every mesh (pipeline and context parallel included),
read from data training never sees, and invisible to training (MoE statistics included)."""

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from rank_harness import run_on_ranks, run_python

from train.parity import BASE, full

ROOT = Path(__file__).resolve().parents[1]
EVAL = {**BASE, "dataset": "templates", "tokenizer": "byte", "eval_every": 1, "eval_batches": 2}


def train_then_evaluate(mesh: str, overrides: dict) -> dict:
    """Two training steps, then one evaluation; every rank returns what it measured."""
    from train.config import TrainConfig
    from train.evaluation import evaluate
    from train.loop import apply_gradients, build_trainer, compute_gradients

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**EVAL, "mesh": mesh, "output_dir": out, **overrides}))
        for _ in range(2):
            loss_share, _ = compute_gradients(t)
            apply_gradients(t, t.model.reduce_loss(loss_share))
        return evaluate(t.model, t.eval_batches)


def eval_loss(mesh: str, world: int, **overrides) -> float:
    results = run_on_ranks(train_then_evaluate, world, mesh, overrides)
    assert len({r["eval_loss"] for r in results}) == 1, "every rank reports the same eval loss"
    return results[0]["eval_loss"]


@pytest.fixture(scope="module")
def reference() -> float:
    return eval_loss("", 1)


@pytest.mark.parametrize("mesh, world, overrides", [
    ("dp=2", 2, {}),
    ("tp=2", 2, {}),
    ("cp=2", 2, {}),
    ("cp=2", 2, {"cp_method": "allgather"}),
    ("pp=2", 2, {}),                                        # forward-only 1F1B
    ("dp=2,pp=2", 4, {"pp_schedule": "interleaved-1f1b"}),  # FSDP stages, 2 virtual stages per rank
])
def test_eval_loss_is_mesh_invariant(reference, mesh, world, overrides):
    assert eval_loss(mesh, world, **overrides) == pytest.approx(reference, rel=1e-5)


def test_eval_loss_of_moe_under_expert_and_pipeline_parallel():
    assert eval_loss("ep=2,pp=2", 4, model="debug-moe") == pytest.approx(eval_loss("", 1, model="debug-moe"), rel=1e-5)


def steps_with_or_without_evaluation(mesh: str, overrides: dict) -> dict:
    """Three steps of v3 routing (the expert bias moves with the load), evaluating after each or not."""
    from train.config import TrainConfig
    from train.evaluation import evaluate
    from train.loop import apply_gradients, build_trainer, compute_gradients

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**EVAL, "model": "debug-moe-v3", "mesh": mesh, "output_dir": out,
                                         **overrides}))
        loads = []
        for _ in range(3):
            loss_share, _ = compute_gradients(t)
            loads.append(t.model.metrics()["moe_tokens_per_expert"])
            apply_gradients(t, t.model.reduce_loss(loss_share))
            if t.cfg.eval_every:
                evaluate(t.model, t.eval_batches)
        return {"loads": loads, "weights": {n: full(p) for n, p in t.model.named_parameters()},
                "bias": {n: full(b) for n, b in t.model.named_buffers() if n.endswith("expert_bias")}}


def test_evaluation_leaves_training_untouched():
    """Eval mode keeps MoE load statistics (and so the expert bias) to training forwards only."""
    with_eval, without = run_on_ranks(steps_with_or_without_evaluation, 1, "ep=1", {}), \
        run_on_ranks(steps_with_or_without_evaluation, 1, "", {"eval_every": 0})
    assert with_eval[0]["loads"] == without[0]["loads"]
    for kind in ("weights", "bias"):
        for name, value in without[0][kind].items():
            assert torch.equal(with_eval[0][kind][name], value), name


def test_cli_logs_eval_loss_every_k_steps_and_at_the_end(tmp_path):
    cmd = [sys.executable, "-m", "train", "--steps", "3", "--global-batch-size", "4", "--seq-len", "32",
           "--eval-every", "2", "--eval-batches", "1", "--output-dir", str(tmp_path)]
    proc = run_python(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_loss" in r) for r in rows] == [False, True, True]
    assert rows[1]["eval_perplexity"] == pytest.approx(math.exp(rows[1]["eval_loss"]), rel=1e-12)
    assert "eval_loss" in proc.stdout


def test_evaluate_tool_reproduces_the_logged_eval_loss(tmp_path):
    """tools/evaluate.py on the checkpoint (1 process and tp=2) and on its HF export gives the eval
    loss the run logged at that step."""
    def run(*cmd):
        proc = run_python([sys.executable, *cmd], capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    small = ["--global-batch-size", "4", "--seq-len", "32", "--eval-batches", "2"]
    run("-m", "train", *small, "--steps", "2", "--eval-every", "2", "--checkpoint-every", "2",
        "--output-dir", str(tmp_path / "run"))
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    checkpoints = str(tmp_path / "run" / "checkpoints")
    run("tools/hf_convert.py", "export", checkpoints, str(tmp_path / "hf"))
    run("tools/evaluate.py", checkpoints, "--json", str(tmp_path / "one.json"))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/evaluate.py", checkpoints,
        "--mesh", "tp=2", "--json", str(tmp_path / "tp.json"))
    run("tools/evaluate.py", str(tmp_path / "hf"), *small, "--json", str(tmp_path / "hf.json"))
    for name in ("one", "tp", "hf"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["eval_loss"] == pytest.approx(logged, rel=1e-5), name
