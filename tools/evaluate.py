"""Evaluate a checkpoint or a Hugging Face folder on held-out data, on one process or on a mesh.

    python tools/evaluate.py outputs/latest/checkpoints                  # its newest checkpoint
    python tools/evaluate.py outputs/latest/checkpoints/step_00000300 --eval-batches 16
    python tools/evaluate.py hf_model/ --dataset default --seq-len 128
    torchrun --nproc_per_node=4 tools/evaluate.py outputs/latest/checkpoints --mesh dp=2,tp=2

A checkpoint records its run's options (meta.json), so by default it is evaluated on the
very set the run logged ``eval_loss`` on (the held-out 1% of its data, ``--eval-batches``
global batches); the flags below override them. A Hugging Face folder records only its
model: the data options come from the flags, with the trainer's defaults. Rank 0 prints
``eval_loss`` and ``eval_perplexity`` (and writes them to ``--json FILE``). The loss is the
one ``train.evaluation.evaluate`` computes, the same on every mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: this checkout's packages come first.
sys.path[:0] = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

import torch.distributed as dist  # noqa: E402
from hf_convert import resolve_checkpoint  # noqa: E402

from core.checkpoint import CheckpointError, read_checkpoint_meta  # noqa: E402
from models.hf_format import CONFIG_FILE  # noqa: E402
from train import checkpointing  # noqa: E402
from train.config import TrainConfig, field_type  # noqa: E402
from train.distributed import shutdown_and_exit  # noqa: E402
from train.evaluation import evaluate  # noqa: E402
from train.loop import build_trainer  # noqa: E402

# Options a user may set here; for a checkpoint, the ones left unset keep the run's values.
DATA_OPTIONS = ("dataset", "tokenizer", "seq_len", "global_batch_size", "eval_batches", "eval_dataset", "dtype",
                "mesh", "device")


def is_hf_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def checkpoint_config(checkpoint: Path, options: dict, out: str) -> TrainConfig:
    """The run's own config (from meta.json), set up to evaluate: options override, nothing is written."""
    saved = read_checkpoint_meta(checkpoint).get("train_config", {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in saved.items() if name in known}
    values.update(options, resume=str(checkpoint), output_dir=out, eval_every=1, checkpoint_every=0, wandb=False,
                  init_from="")
    return TrainConfig(**values)


def hf_config(folder: Path, options: dict, out: str) -> TrainConfig:
    """A config whose model, weights and (unless --tokenizer) tokenizer are the folder's."""
    return TrainConfig(**options, init_from=str(folder), resume="none", output_dir=out, eval_every=1, wandb=False)


def run_evaluation(path: Path, options: dict) -> dict:
    """Build the model on the mesh, load the weights, evaluate. Collective."""
    with tempfile.TemporaryDirectory() as out:
        if is_hf_folder(path):
            t = build_trainer(hf_config(path, options, out))
        else:
            checkpoint = resolve_checkpoint(path)
            t = build_trainer(checkpoint_config(checkpoint, options, out))
            checkpointing.restore(t, checkpoint)
        return {"step": t.step, **evaluate(t.model, t.eval_batches)}


def parse_args(argv: list[str] | None) -> tuple[Path, dict, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a step_N checkpoint, a checkpoint root (its newest), or an HF folder")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in DATA_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=field_type(fields[name]),
                            help="as for python -m train")
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in DATA_OPTIONS if getattr(args, name) is not None}
    return args.path, options, args.json


def main(argv: list[str] | None = None) -> None:
    path, options, json_out = parse_args(argv)
    code = 0
    try:
        result = run_evaluation(path, options)
        if dist.get_rank() == 0:
            print(f"{path} (step {result['step']}): eval_loss {result['eval_loss']:.6f} | "
                  f"eval_perplexity {result['eval_perplexity']:.4f}", flush=True)
            if json_out:
                json_out.write_text(json.dumps(result, allow_nan=False))
    except (ValueError, CheckpointError) as err:
        sys.stderr.write(f"error: {err}\n")
        code = 2
    shutdown_and_exit(code)


if __name__ == "__main__":
    main()
