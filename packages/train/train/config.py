"""Training configuration: one dataclass, filled from defaults, then a TOML file, then CLI flags.

Every field is a flag: ``global_batch_size`` is ``--global-batch-size``; booleans also get
``--no-<flag>``. ``--config run.toml`` reads a flat TOML table with the same names
(underscores or dashes). CLI flags win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # model and parallelism
    model: str = "debug"
    model_args: str = ""                 # registry config overrides, e.g. "n_layers=2,max_seq_len=8192"
    mesh: str = ""                       # e.g. "dp=2,tp=4,pp=2"; missing dims are 1, dp=-1 fills
    dp_mode: str = "fsdp"                # "fsdp" (ZeRO-3) or "replicate" (plain DDP-style all-reduce)
    pp_schedule: str = "1f1b"            # 1f1b | gpipe | interleaved-1f1b | zbv
    microbatches: int = 0                # pipeline microbatches per step (0: 2 * pp)
    cp_method: str = "ring"              # context-parallel attention: ring | allgather
    # optimization
    steps: int = 300
    global_batch_size: int = 16          # sequences per optimizer step, over the whole mesh
    grad_accum_steps: int = 1            # split each rank's batch into this many forward/backward passes
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"               # float32 | bfloat16 (compute dtype; master weights stay float32)
    skip_nonfinite_steps: bool = False   # drop a step whose loss or grad norm is NaN/inf instead of stopping
    # data
    dataset: str = "default"             # "default" (bundled corpus), "synthetic", a local file/folder, or a hub name
    tokenizer: str = "byte"              # "byte" or a path to a tokenizers tokenizer.json
    streaming: bool = False
    # runtime
    device: str = "auto"                 # auto | cpu | cuda
    output_dir: str = "outputs/run"
    dist_timeout_s: int = 600            # a rank waiting longer than this in a collective fails instead of hanging
    # tracking
    wandb: bool = False
    wandb_project: str = "meshtron"
    # checkpoints
    checkpoint_every: int = 0            # 0: never
    keep_checkpoints: int = 3
    resume: str = "auto"                 # auto (newest in <output_dir>/checkpoints) | none | a checkpoint path
    async_checkpoint: bool = False
    init_from: str = ""                  # an HF-style folder (model.safetensors + config.json) for initial weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description="Meshtron trainer",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML file with any of the options below")
    for f in fields(TrainConfig):
        if f.type in ("bool", bool):
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, help=f"(default {f.default!r})")
    return parser


def load_toml(path: Path) -> dict[str, Any]:
    """A flat TOML table of options; unknown keys are an error that lists the known ones."""
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    known = {f.name for f in fields(TrainConfig)}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(known)}")
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- TOML (``--config``) <- CLI flags."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values)
