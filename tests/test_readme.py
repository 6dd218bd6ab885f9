"""The README's commands, run as a newcomer would type them (at smoke size where they are long).

Every command the README shows (in its bash blocks, or inline starting with ``.venv/bin/`` or
``make``) must be listed in ``COMMANDS`` below: with the arguments the test appends to make it
short (argparse takes the last value of a repeated flag), or with the reason it does not run
here and the test that covers it. A README edit that adds a command fails this test until it is
listed, so the README cannot drift from what works.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMALL = ["--global-batch-size", "4", "--seq-len", "32"]
SYNTHETIC = ["--dataset", "synthetic", "--steps", "2", *SMALL, "--checkpoint-every", "0"]

# README command -> arguments appended to run it here, or why it does not run here (a string).
# The runnable ones run in this order, in one folder: the "next steps" build on each other.
COMMANDS = {
    ".venv/bin/python -m train --help": [],
    ".venv/bin/python -m train --run-name first --steps 100 --checkpoint-every 25":
        [*SMALL, "--steps", "4", "--checkpoint-every", "2"],
    ".venv/bin/python -m train --run-name first --steps 200 --override-lr-schedule": [*SMALL, "--steps", "6"],
    ".venv/bin/python -m train --config outputs/latest/config.toml --steps 50": ["--steps", "2"],
    ".venv/bin/python tools/evaluate.py outputs/latest/checkpoints": ["--eval-batches", "1"],
    '.venv/bin/python tools/generate.py outputs/latest/checkpoints --prompt "ROMEO:"': ["--max-new-tokens", "4"],
    ".venv/bin/python tools/hf_convert.py export outputs/latest/checkpoints hf_model/": [],
    ".venv/bin/python -m train --init-from hf_model/ --run-name finetune --steps 20": [*SMALL, "--steps", "2"],
    ".venv/bin/python tools/evaluate.py hf_model/ --dataset default": [*SMALL, "--eval-batches", "1"],
    ".venv/bin/python tools/plot_metrics.py outputs/latest/metrics.jsonl -o curves.png": [],
    ".venv/bin/python -m train --init-from Qwen/Qwen3-0.6B --dataset my_texts.jsonl --seq-len 1024 "
    "--global-batch-size 16 --steps 300 --lr 2e-5 --warmup-steps 30 --run-name qwen-ft":
        "downloads from the hub; test_hf_families trains from a hub id out of a cache it fills, offline",
    ".venv/bin/torchrun --nproc_per_node=4 -m train --init-from Qwen/Qwen3-0.6B --mesh dp=2,tp=2 --dataset "
    "my_texts.jsonl --seq-len 1024 --global-batch-size 16 --steps 300 --lr 2e-5 --warmup-steps 30 --run-name "
    "qwen-ft-tp": "downloads from the hub; test_hf_families runs the Qwen3 features on dp=2,tp=2, cp=2, pp=2",
    '.venv/bin/python tools/generate.py outputs/qwen-ft/checkpoints --prompt "The three laws of motion are"':
        "needs the run above; the quick start's generate command runs, test_generate covers the families",
    ".venv/bin/python tools/hf_convert.py export outputs/qwen-ft/checkpoints qwen-ft/ --dtype bfloat16":
        "needs the run above; the quick start's export runs, test_hf_families exports a Qwen3 run",
    '.venv/bin/torchrun --nproc_per_node=2 tools/generate.py qwen-ft/ --prompt "The three laws of motion are" '
    "--mesh tp=2": "needs the export above; test_generate runs tp=2 generation against one process",
    ".venv/bin/python tools/hf_convert.py push qwen-ft/ you/qwen3-0.6b-ft":
        "uploads to the hub; test_hf_families pushes into a local folder and pulls it back",
    ".venv/bin/python tools/hf_convert.py pull Qwen/Qwen3-0.6B qwen3/":
        "downloads from the hub; test_hf_families pulls from a cache it fills, offline",
    ".venv/bin/python tools/corpus/baselines.py": [],
    ".venv/bin/torchrun --nproc_per_node=4  -m train --mesh dp=2,tp=2": SYNTHETIC,
    ".venv/bin/torchrun --nproc_per_node=4  -m train --mesh cp=4 --cp-method allgather --seq-len 8192 "
    "--global-batch-size 1 --model-args max_seq_len=8192": [*SYNTHETIC, "--seq-len", "64", "--global-batch-size", "1",
                                                             "--model-args", "max_seq_len=64"],
    ".venv/bin/torchrun --nproc_per_node=4  -m train --model debug-moe --mesh ep=2,dp=2": SYNTHETIC,
    ".venv/bin/python -m train.launch --nproc_per_node=4 -m train --mesh dp=2,tp=2": SYNTHETIC,
    ".venv/bin/torchrun --nproc_per_node=16 -m train --mesh dp=2,tp=4,pp=2":
        "16 ranks: test_pipeline runs this mesh (a slow test); test_parity_dense runs dp=2,tp=4",
    ".venv/bin/torchrun --nproc_per_node=8  -m train --mesh cp=2,tp=2,dp=2 --seq-len 256":
        "8 ranks: test_parity_context_parallel runs cp x tp x dp",
    ".venv/bin/torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 -m train ...":
        "a template; test_cli's two-node loopback rendezvous runs it on one machine",
    ".venv/bin/torchrun ... tools/evaluate.py CKPT --mesh tp=2": "a template; test_evaluation runs it at tp=2",
    ".venv/bin/python tools/pipeline_timeline.py [--pp 4 --microbatches 8 --schedule 1f1b]":
        "a template; test_pipeline runs the tool",
    ".venv/bin/tensorboard --logdir outputs/latest/tensorboard": "a server; test_observability reads the events",
    ".venv/bin/pip install -e '.[tensorboard]'": "an install; make test installs the same extra",
    ".venv/bin/pip install -e '.[tools]'": "an install; make test installs the same packages",
    ".venv/bin/python -m train --dry-run --world-size 64 --model llama3-8b --mesh dp=8,tp=8 --seq-len 8192 "
    "--global-batch-size 64": "a minute; test_dry_run runs the dry run at small sizes against real runs",
    ".venv/bin/python benchmarks/bench_dry_run.py": "~40 minutes; test_benchmarks runs its --smoke",
    ".venv/bin/python tools/plan.py --model llama3-70b --gpus 256 --gpu h100 --seq-len 8192 "
    "--global-batch-size 512": [],
    ".venv/bin/pip install -e '.[float8]'": "an install; make test installs the same extra (torchao)",
    ".venv/bin/python benchmarks/gpu_acceptance.py": "needs a CUDA GPU; test_benchmarks runs its --smoke",
    ".venv/bin/python benchmarks/gpu_acceptance.py --smoke": "test_benchmarks runs it",
    ".venv/bin/python benchmarks/bench_step.py": "13 minutes; test_benchmarks runs its --smoke",
    ".venv/bin/python benchmarks/bench_checkpoint.py": "a minute; test_benchmarks runs its --smoke",
    ".venv/bin/python benchmarks/bench_init.py": "minutes and ~10 GB; test_benchmarks runs its --smoke",
    ".venv/bin/python benchmarks/bench_context_parallel.py": "10 minutes; test_benchmarks runs its --smoke",
    "make train": "python -m train with the defaults: test_first_run runs them (60 steps)",
    "make TORCH_INDEX=https://download.pytorch.org/whl/cpu train": "an install with another index; as make train",
    "make test": "this test suite",
    "make test-fast": "this test suite without the slow tests",
    "make lint": "CI runs it (ci/run) before the tests",
}


def readme_commands() -> list[str]:
    """The commands in the README's bash blocks (comments dropped) and its inline ``.venv/bin/``/``make`` spans."""
    text = README.read_text()
    found = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n  ", " ")
    found += [span for span in re.findall(r"`([^`]+)`", prose) if span.startswith((".venv/bin/", "make "))]
    return found


def test_every_readme_command_is_listed():
    unlisted = sorted(set(readme_commands()) - set(COMMANDS))
    assert not unlisted, f"README commands this test does not know: {unlisted}"
    stale = sorted(set(COMMANDS) - set(readme_commands()))
    assert not stale, f"listed here but no longer in the README: {stale}"


def as_argv(command: str) -> list[str]:
    """``.venv/bin/python`` / ``.venv/bin/torchrun`` -> this interpreter (the test's environment)."""
    words = command.replace("'", "").split()
    if words[0] == ".venv/bin/torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    assert words[0] == ".venv/bin/python", command
    return [sys.executable, *words[1:]]


@pytest.mark.timeout(900)
def test_readme_commands_run(tmp_path):
    """The runnable commands in README order, in a fresh folder holding links to tools/ and benchmarks/."""
    for name in ("tools", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / "packages" / p) for p in ("core", "models", "train")),
           "OMP_NUM_THREADS": "1"}
    runnable = [c for c in dict.fromkeys(readme_commands()) if isinstance(COMMANDS.get(c), list)]
    for command in runnable:
        repeats = readme_commands().count(command)  # "the same command resumes it": run it as often as shown
        for _ in range(repeats):
            result = subprocess.run([*as_argv(command), *COMMANDS[command]], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    first = tmp_path / "outputs" / "first"
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # 4 steps, resumed (nothing left to do), then on to 6 on a new schedule
    assert (tmp_path / "hf_model" / "config.json").is_file() and (tmp_path / "curves.png").is_file()
