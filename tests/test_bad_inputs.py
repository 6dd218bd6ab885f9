"""A user's mistake ends in one ``error: ...`` line naming the problem and the fix, exit code 2,
before any collective: flags, TOML files, files the run reads, the output folder, resumes."""

import json
import subprocess
import sys

import pytest
from rank_harness import run_python

from train.__main__ import run

FAST = ["--dataset", "synthetic", "--steps", "2", "--global-batch-size", "4", "--seq-len", "32"]


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """The cases below must fail before any collective: reaching the process group is a test failure
    (and would leave one behind in the pytest process)."""
    def refuse(*args):
        raise AssertionError("the run got past validation to the process group")

    monkeypatch.setattr("train.loop.init_distributed", refuse)


def error_of(argv: list[str], capsys) -> str:
    """Run the CLI in this process (every case fails before the process group exists)."""
    code = run(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "garbage.json").write_text("not a tokenizer")
    (tmp_path / "bad.toml").write_text("steps = \n")
    (tmp_path / "unknown.toml").write_text("stepz = 3\n")
    (tmp_path / "typed.toml").write_text('steps = "ten"\n')
    (tmp_path / "choice.toml").write_text('dtype = "fp16"\n')
    for name, text in (("broken_hf", "{broken"), ("partial_hf", '{"model_type": "llama"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    (tmp_path / "a_file").write_text("")
    return tmp_path


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "{d}/missing.txt"], "--dataset '{d}/missing.txt' looks like a local path but {d}/missing.txt does "
                                       "not exist"),
    (["--dataset", "{d}/missing/"], "looks like a local path"),
    (["--tokenizer", "{d}/missing.json"], "--tokenizer '{d}/missing.json': expected 'default', 'byte' or the path"),
    (["--tokenizer", "{d}/garbage.json"], "tokenizer {d}/garbage.json is not a Hugging Face tokenizer.json"),
    (["--device", "cuda"], "--device cuda but no CUDA device is visible"),
    (["--config", "{d}/bad.toml"], "--config {d}/bad.toml is not valid TOML"),
    (["--config", "{d}/unknown.toml"], "{d}/unknown.toml: unknown option(s) ['stepz']"),
    (["--config", "{d}/typed.toml"], "{d}/typed.toml: steps = 'ten' should be int, not str"),
    (["--config", "{d}/choice.toml"], "--dtype 'fp16': use one of auto, float32, bfloat16"),
    (["--config", "{d}/missing.toml"], "--config {d}/missing.toml: cannot read it"),
    (["--output-dir", "{d}/a_file/run"], "--output-dir {d}/a_file/run cannot be created or written (Not a directory)"),
    (["--output-dir", "{d}/a_file"], "--output-dir {d}/a_file cannot be created or written (a file of that name"),
    (["--init-from", "{d}/broken_hf", "--dataset", "default"], "{d}/broken_hf/config.json cannot be read as JSON"),
    (["--init-from", "{d}/partial_hf"], "{d}/partial_hf/config.json lacks the field 'hidden_size'"),
    (["--warmup-steps", "-3"], "--warmup-steps -3: must be >= 0"),
    (["--dp-shard", "2"], "--dp-shard 2 applies to --dp-mode hsdp only (now fsdp)"),
    (["--activation-checkpoint", "some"], "argument --activation-checkpoint: invalid choice: 'some'"),
    (["--checkpoint-every", "-1"], "--checkpoint-every -1: must be >= 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be >= 0 (0: keep all)"),
    (["--lr", "-0.1"], "--lr -0.1: must be a finite number >= 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number >= 0"),
    (["--beta2", "1"], "--beta2 1.0: must be in [0, 1)"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0: must be > 0"),
    (["--global-batch-size", "0"], "--global-batch-size 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["--pp-schedule", "1F1B"], "argument --pp-schedule: invalid choice: '1F1B'"),
    (["--profile-steps", "3-2"], "--profile-steps '3-2': need 1 <= A <= B"),
    (["--profile-steps", "two"], "--profile-steps 'two': expected A-B (e.g. 3-5) or one step number"),
    (["--profile-steps", "2-9"], "--profile-steps 2-9: the run ends at --steps 2"),
    (["--memory-snapshot"], "--memory-snapshot records the --profile-steps window"),
    (["--memory-snapshot", "--profile-steps", "1"], "--memory-snapshot needs CUDA"),
    (["--eval-every", "-1"], "--eval-every -1: must be >= 0"),
    (["--eval-batches", "0"], "--eval-batches 0: must be >= 1"),
    (["--eval-dataset", "{d}/missing.jsonl"], "--dataset '{d}/missing.jsonl' looks like a local path"),
    (["--eval-every", "1", "--streaming", "--dataset", "default"], "--eval-every with --streaming data"),
    (["--run-name", "a/b"], "--run-name 'a/b': use letters, digits"),
    (["--run-name", "latest"], "not 'latest'"),
    (["--wandb-tags", "ok," + "x" * 70], "W&B takes tags of at most 64"),
    (["--dataset", "default", "--dataset-split", "validation"], "--dataset-split applies to Hugging Face hub"),
    (["--dataset", "default", "--dataset-config", "en"], "--dataset-config applies to Hugging Face hub"),
    (["--dataset", "default", "--text-column", " "], "--text-column is empty"),
    (["--float8", "--dtype", "float32"], "--float8 computes in bfloat16 around its float8 matmuls: drop --dtype"),
])
def test_bad_input_is_one_line(files, capsys, flags, message):
    argv = [*FAST, "--output-dir", str(files / "out"), *(f.format(d=files) for f in flags)]
    assert message.format(d=files) in error_of(argv, capsys)


def test_float8_without_torchao_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("core.float8.torchao_available", lambda: False)
    assert "--float8 needs torchao, which is not installed: pip install -e '.[float8]'" in error_of(
        [*FAST, "--output-dir", str(tmp_path), "--float8"], capsys)


def test_tensorboard_without_its_package_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("train.validation.importlib.util.find_spec", lambda name: None)
    assert "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'" in error_of(
        [*FAST, "--tensorboard", "--output-dir", str(tmp_path)], capsys)


def test_help_lists_every_option_once_with_its_default(capsys):
    assert run(["--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default '" not in text
    assert "--dtype {auto,float32,bfloat16}" in text and "--dp-mode {fsdp,hsdp,replicate}" in text
    assert "--device {auto,cpu,cuda}" in text and "--pp-schedule {1f1b,gpipe,interleaved-1f1b,zbv}" in text
    assert "--model {debug," in text and "--lr LR               peak learning rate (AdamW) (default: 0.003)" in text
    from dataclasses import fields

    from train.config import HELP_GROUPS, TrainConfig

    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(TrainConfig))  # each option in exactly one group

    headings = [text.index(f"\n{title}:\n") for title in HELP_GROUPS]  # grouped by topic, in this order
    assert headings == sorted(headings)
    run_folder = text[text.index("\nrun folder and checkpoints:\n"):text.index("\ntracking:\n")]
    assert "--run-name RUN_NAME" in run_folder and "--resume RESUME" in run_folder and "--lr " not in run_folder


def test_a_lost_peer_is_one_line(monkeypatch, capsys):
    """A rank whose peer died reports that (its peer's own error says why), not a gloo traceback."""
    def train(cfg):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")

    monkeypatch.setattr("train.__main__.train", train)
    assert run(FAST) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lost contact with a peer rank, which probably failed first" in lines[0]


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_python([sys.executable, "-m", "train", *FAST, *args], capture_output=True, text=True, timeout=240)


def test_resume_checks_the_checkpoint_before_loading_it(tmp_path):
    """A missing meta.json, and a changed LR schedule, fail before any tensor is read;
    --override-lr-schedule continues on the new schedule from the saved step."""
    out = tmp_path / "run"
    assert cli("--checkpoint-every", "1", "--output-dir", str(out)).returncode == 0
    step1, step2 = out / "checkpoints" / "step_00000001", out / "checkpoints" / "step_00000002"

    changed = cli("--steps", "4", "--lr", "1e-3", "--resume", str(step1), "--output-dir", str(tmp_path / "b"))
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"error: {step1} was trained with --lr 0.003 (now 0.001), --steps 2 (now 4): resuming would silently "
        f"change the learning-rate schedule; pass the saved values, or --override-lr-schedule to continue on this "
        f"run's schedule from step 1 (the LR may jump)"]
    override = cli("--steps", "4", "--lr", "1e-3", "--warmup-steps", "1", "--override-lr-schedule", "--resume",
                   str(step1), "--output-dir", str(tmp_path / "b"))
    assert override.returncode == 0, override.stderr
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert rows[0]["lr"] == pytest.approx(1e-3)  # step 2 of 4 after 1 warmup step: the new peak

    (step2 / "meta.json").unlink()
    missing = cli("--steps", "3", "--output-dir", str(out))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {step2 / 'meta.json'} is missing: the checkpoint's training state (step, data position, LR "
        f"schedule) is lost; resume from another checkpoint"]


def test_unreadable_data_is_one_line(tmp_path):
    """Found only while reading (after the process group is up), the same on every rank."""
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine"}\n{broken\n')
    result = cli("--dataset", str(data), "--output-dir", str(tmp_path / "out"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert errors == [f"error: --dataset {data} (1 file) cannot be read: JSON parse error: Missing a name for object "
                      f"member. in row 1"]
