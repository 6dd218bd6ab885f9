"""The command line: python -m train, torchrun -m train, TOML configs, and errors before any collective."""

import json
import subprocess
import sys

import pytest
from rank_harness import run_python

from core.mesh import MeshConfigError
from train.config import TrainConfig, parse_config
from train.validation import validate

REQUIRED_METRICS = {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "step_time_s", "mem_peak_mib"}
FAST = ["--dataset", "synthetic", "--steps", "2", "--global-batch-size", "4", "--seq-len", "32"]


def run(cmd, timeout=240):
    return run_python(cmd, capture_output=True, text=True, timeout=timeout)


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "train",
            *args]


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_single_process_writes_metrics(tmp_path):
    result = run([sys.executable, "-m", "train", *FAST, "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert REQUIRED_METRICS <= rows[0].keys()
    assert "step 2/2" in result.stdout


def test_torchrun_on_a_mesh_matches_single_process(tmp_path):
    single = run([sys.executable, "-m", "train", *FAST, "--output-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    mesh = run(torchrun(4, *FAST, "--mesh", "dp=2,tp=2", "--output-dir", str(tmp_path / "mesh")))
    assert mesh.returncode == 0, mesh.stderr
    one, four = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "mesh")
    assert [r["loss"] for r in four] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert mesh.stdout.count("step 1/2") == 1, "only one rank prints"


def test_mesh_not_matching_world_size_fails_on_every_rank_without_hanging(tmp_path):
    result = run(torchrun(2, *FAST, "--mesh", "tp=4", "--output-dir", str(tmp_path)), timeout=120)
    assert result.returncode != 0
    # every rank raises before any collective; torchrun stops the rest once the first exits
    assert "error: mesh dp=1,pp=1,cp=1,tp=4,ep=1 has 4 ranks but the world size is 2" in result.stderr


def test_toml_config_with_cli_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "debug"\nsteps = 7\nglobal-batch-size = 32\nlr = 0.001\n')
    cfg = parse_config(["--config", str(config), "--steps", "9", "--no-wandb"])
    assert (cfg.steps, cfg.global_batch_size, cfg.lr, cfg.wandb) == (9, 32, 0.001, False)
    config.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="unknown option.*stepz"):
        parse_config(["--config", str(config)])


@pytest.mark.parametrize("overrides, world, message", [
    (dict(mesh="tp=3"), 3, "n_heads=8 is not divisible by tp=3"),
    (dict(mesh="cp=2", seq_len=30), 2, "seq-len = 30 is not divisible by 2\\*cp=4"),
    (dict(mesh="pp=8"), 8, "4 layers but pp=8 stages"),
    (dict(mesh="dp=4", global_batch_size=6), 4, "global-batch-size = 6 is not divisible by dp\\*ep=4"),
    (dict(mesh="dp=3"), 4, "has 3 ranks but the world size is 4"),
    (dict(grad_accum_steps=3), 1, "not divisible by --grad-accum-steps 3"),
    (dict(model="gpt-17"), 1, "unknown model 'gpt-17'"),
    (dict(mesh="cp=2", cp_method="ulysses"), 2, "--cp-method 'ulysses' is not known: use one of ring, allgather"),
    (dict(model_args="n_layer=2"), 1, "--model-args 'n_layer=2': expected KEY=VALUE with KEY one of dim, n_layers"),
    (dict(model_args="n_layers=two"), 1, "--model-args n_layers='two': expected a value of type int"),
    (dict(model_args="n_heads=3"), 1, "dim=128 is not divisible by n_heads=3"),
    (dict(seq_len=4096), 1, "--seq-len 4096 exceeds the model's max_seq_len 2048"),
    (dict(mesh="pp=2", document_masking=True), 2, "--document-masking with pp=2: pipeline stages pass only"),
    (dict(mesh="pp=2", pp_schedule="zbv", eval_every=1), 2, "--eval-every with --pp-schedule zbv: torch's"),
])
def test_bad_configurations_name_the_problem(overrides, world, message):
    with pytest.raises((MeshConfigError, ValueError), match=message):
        validate(TrainConfig(**overrides), world)


def test_model_args_override_the_registry_config():
    checked = validate(TrainConfig(model_args="n_layers=2,max_seq_len=8192,rope_theta=5e5", seq_len=4096), 1)
    assert (checked.model_config.n_layers, checked.model_config.max_seq_len) == (2, 8192)
    assert checked.model_config.rope_theta == 5e5 and checked.model_config.dim == 128  # the rest stays


def test_context_parallel_methods_from_the_command_line(tmp_path):
    """torchrun --mesh cp=2 with each --cp-method logs the 1-process losses; a bad method is one line."""
    args = [*FAST, "--seq-len", "64", "--model-args", "n_layers=2"]
    single = run([sys.executable, "-m", "train", *args, "--output-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    for method in ("ring", "allgather"):
        out = tmp_path / method
        result = run(torchrun(2, *args, "--mesh", "cp=2", "--cp-method", method, "--output-dir", str(out)))
        assert result.returncode == 0, result.stderr
        assert [r["loss"] for r in read_metrics(out)] == pytest.approx(
            [r["loss"] for r in read_metrics(tmp_path / "one")], rel=1e-5)
    bad = run([sys.executable, "-m", "train", *args, "--cp-method", "ulysses", "--output-dir", str(tmp_path / "bad")])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: argument --cp-method: invalid choice: 'ulysses' (choose from 'ring', 'allgather') "
        "(see python -m train --help)"]


def test_two_nodes_on_loopback_with_c10d_rendezvous(tmp_path):
    """Multi-node launch as on a cluster: two torchrun agents meet at a c10d rendezvous endpoint."""
    from rank_harness import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    def node(out):
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint={endpoint}", "--rdzv_id=meshtron-test", "-m", "train", *FAST, "--mesh", "dp=2",
             "--checkpoint-every", "0",  # the two "nodes" have separate folders: no shared checkpoint
             "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nodes = [node(tmp_path / "a"), node(tmp_path / "b")]
    outputs = [n.communicate(timeout=240) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outputs]
    logged = [p for p in (tmp_path / "a", tmp_path / "b") if (p / "metrics.jsonl").exists()]
    assert len(logged) == 1 and len(read_metrics(logged[0])) == 2  # global rank 0 lives on one node


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(599)} | {"</s>": 599}  # 600 tokens
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="has 600 tokens but the model's vocab_size is 512"):
        validate(TrainConfig(tokenizer=tokenizer, model_args="vocab_size=512"), 1)
    assert validate(TrainConfig(tokenizer=tokenizer, model="llama3-1b"), 1).model_config.vocab_size == 128256
    # a debug model takes the tokenizer's vocabulary, padded to a multiple of 64; synthetic data keeps its own
    assert validate(TrainConfig(tokenizer=tokenizer), 1).model_config.vocab_size == 640
    assert validate(TrainConfig(tokenizer=tokenizer, dataset="synthetic"), 1).model_config.vocab_size == 512
    assert validate(TrainConfig(tokenizer="byte"), 1).model_config.vocab_size == 320
    assert validate(TrainConfig(), 1).model_config.vocab_size == 4096  # the bundled BPE
