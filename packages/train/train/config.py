"""Training configuration: one dataclass, filled from defaults, then a TOML file, then CLI flags.

Every field is a flag: ``global_batch_size`` is ``--global-batch-size``; booleans also get
``--no-<flag>``. ``--config run.toml`` reads a flat TOML table with the same names
(underscores or dashes). CLI flags win over the file. Each field's metadata carries its
one-line ``--help`` text and, where the values are a fixed set, its ``choices``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


def option(default, help: str, choices: tuple | None = None):
    """A config field with its ``--help`` line (and its fixed set of values, if the trainer owns it;
    sets owned by the parallelism and model code are looked up in ``registered_choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model and parallelism
    model: str = option("", "model name from the registry (default: debug, or the model --init-from defines)")
    model_args: str = option("", "override model config fields, e.g. n_layers=2,max_seq_len=8192")
    mesh: str = option("", "parallel mesh, e.g. dp=2,tp=4,pp=2; missing dims are 1, dp=-1 fills the rest")
    dp_mode: str = option("fsdp", "data parallel: fsdp (sharded over all dp ranks, ZeRO-3), hsdp (sharded within "
                                  "groups of --dp-shard ranks, replicated across them) or replicate (all-reduce)")
    dp_shard: int = option(0, "with --dp-mode hsdp: dp ranks that shard parameters together (must divide dp); "
                              "0: as many as fit in one node (torchrun's LOCAL_WORLD_SIZE)")
    fsdp_unit_params: int = option(10_000_000, "FSDP: consecutive blocks with fewer parameters are grouped into "
                                                "one unit (one gather and one reduce-scatter for the group); "
                                                "0: one unit per block")
    pp_schedule: str = option("1f1b", "pipeline schedule")
    microbatches: int = option(0, "pipeline microbatches per step (0: 2 * pp)")
    cp_method: str = option("ring", "context-parallel attention: ring (P2P) or allgather (K/V all-gather)")
    activation_checkpoint: str = option("none", "recompute activations in backward to save memory: none, full "
                                                "(keep only block inputs) or selective (keep matmul, attention "
                                                "and collective outputs; recompute element-wise ops)")
    compile: bool = option(False, "torch.compile each transformer block (inductor; the first step includes "
                                  "compile time)")
    float8: bool = option(False, "run the transformer blocks' Linear matmuls in float8 with rowwise scales (torchao; "
                                 "pip install -e '.[float8]'); the output projection and MoE routers stay bf16")
    # optimization
    steps: int = option(600, "optimizer steps to train for (the LR schedule's length)")
    global_batch_size: int = option(16, "sequences per optimizer step, over the whole mesh")
    grad_accum_steps: int = option(1, "forward/backward passes per step, splitting each rank's batch")
    seq_len: int = option(128, "tokens per sequence")
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at min_lr_ratio * lr")
    warmup_steps: int = option(20, "linear warmup steps before the cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay of matrices (norm weights get none)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (inf: no clipping)")
    seed: int = option(0, "seed of the initial weights and the data order")
    dtype: str = option("auto", "compute dtype; auto: bfloat16 on CUDA (and with --float8), float32 on CPU. Master "
                                "weights, optimizer state and gradient reductions stay float32", DTYPES)
    log_every: int = option(1, "report metrics every N steps (and at eval, checkpoint and the last step); the "
                               "steps between read nothing on the host, so the GPU never waits for Python")
    skip_nonfinite_steps: bool = option(False, "on a NaN/inf loss or gradient norm, skip that step's update "
                                               "instead of stopping the run")
    # evaluation
    eval_every: int = option(0, "evaluate on held-out data every N steps and at the end (0: never)")
    eval_batches: int = option(4, "global batches in the evaluation set")
    sample_every: int = option(0, "every N steps and at the end, print (and log to metrics.jsonl / W&B) the "
                                  "model's greedy continuation of --sample-prompt (0: never)")
    sample_prompt: str = option("", "the text --sample-every continues")
    sample_tokens: int = option(32, "tokens per --sample-every sample")
    eval_dataset: str = option("", "evaluate on this dataset (same forms as --dataset) instead of the held-out "
                                    "1% of the training data")
    # profiling
    profile_steps: str = option("", "write a torch.profiler trace per rank of steps A-B (e.g. 3-5) under "
                                     "<output-dir>/profile/")
    memory_snapshot: bool = option(False, "with --profile-steps on CUDA: also a CUDA memory snapshot of those steps")
    # data
    dataset: str = option("default", "default (the bundled Shakespeare corpus), templates (bundled template "
                                     "stories), synthetic, a local .txt/.jsonl/.json/.parquet file or folder "
                                     "(.gz too), or a Hugging Face hub name")
    dataset_config: str = option("", "the configuration of a hub --dataset (its second load_dataset argument)")
    dataset_split: str = option("train", "the split of a hub --dataset to train on")
    text_column: str = option("text", "the field that holds the text in .jsonl/.json/.parquet and hub records")
    tokenizer: str = option("", "default (the bundled 4096-token BPE), byte, or the path of a Hugging Face "
                                "tokenizer.json (or its folder); the debug models' vocab follows it. Unset: the "
                                "--init-from folder's tokenizer, else default")
    document_masking: bool = option(False, "tokens attend only within their own document (EOS-separated) and "
                                           "rotary positions restart at each document")
    streaming: bool = option(False, "stream the dataset instead of tokenizing it into a cache first")
    # runtime
    device: str = option("auto", "auto picks CUDA when a GPU is visible", DEVICES)
    run_name: str = option("", "this run's name; its folder is outputs/NAME. Default: a new name "
                               "(<model>-<date>-<time>); pass an earlier run's name to resume it")
    output_dir: str = option("", "the run's folder, instead of outputs/<run name>")
    dist_timeout_s: int = option(600, "seconds a rank waits in a collective before failing instead of hanging")
    preemption_deadline_s: float = option(20.0, "on SIGTERM/SIGINT/SIGUSR1, seconds to finish the step and save it "
                                                "before stopping anyway (the last complete checkpoint stays)")
    # tracking
    wandb: bool = option(False, "log to Weights & Biases (online or offline as wandb's own login and WANDB_MODE "
                                "say)")
    wandb_project: str = option("meshtron", "W&B project name")
    wandb_entity: str = option("", "W&B entity (team or user) that owns the project (default: your own)")
    wandb_run_name: str = option("", "the run's display name in W&B (default: the run name)")
    wandb_tags: str = option("", "comma-separated W&B tags, e.g. baseline,tp2")
    tensorboard: bool = option(False, "also write the metrics as TensorBoard scalars under <output-dir>/tensorboard "
                                      "(needs the tensorboard package)")
    # checkpoints
    checkpoint_every: int = option(500, "save every N steps and at the last step (0: never)")
    keep_checkpoints: int = option(3, "keep the newest N checkpoints (0: keep all)")
    resume: str = option("auto", "auto (newest in <output-dir>/checkpoints), none, or a checkpoint path")
    override_lr_schedule: bool = option(False, "on resume, use this run's --lr/--steps/--warmup-steps/"
                                               "--min-lr-ratio instead of refusing to change them")
    async_checkpoint: bool = option(False, "write checkpoints in the background while training goes on")
    init_from: str = option("", "start from a Hugging Face model: a folder (config.json + safetensors) or a hub "
                                "id (e.g. Qwen/Qwen3-0.6B); its config defines the model and its tokenizer.json "
                                "the tokenizer")
    # dry run
    dry_run: bool = option(False, "simulate one rank of a --world-size N run in this process (fake process group, "
                                  "fake tensors): memory and collective bytes per rank, no training")
    world_size: int = option(0, "with --dry-run: the number of ranks to simulate")
    dry_run_ranks: str = option("", "with --dry-run: which ranks, all or R,R,... (default: one per pipeline role)")
    dry_run_init: bool = option(False, "with --dry-run: also allocate the rank's shards for real and time their "
                                       "initialization")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --help lists the options by topic, in this order (every field is in exactly one group).
HELP_GROUPS = {
    "model": ("model", "model_args", "init_from", "dtype", "device"),
    "parallelism": ("mesh", "dp_mode", "dp_shard", "fsdp_unit_params", "pp_schedule", "microbatches", "cp_method"),
    "memory and speed": ("activation_checkpoint", "compile", "float8", "log_every"),
    "data": ("dataset", "dataset_config", "dataset_split", "text_column", "tokenizer", "document_masking",
             "streaming"),
    "optimization": ("steps", "global_batch_size", "grad_accum_steps", "seq_len", "lr", "min_lr_ratio",
                     "warmup_steps", "weight_decay", "beta1", "beta2", "adam_eps", "max_grad_norm", "seed",
                     "skip_nonfinite_steps"),
    "evaluation": ("eval_every", "eval_batches", "eval_dataset", "sample_every", "sample_prompt", "sample_tokens"),
    "run folder and checkpoints": ("run_name", "output_dir", "checkpoint_every", "keep_checkpoints", "resume",
                                   "override_lr_schedule", "async_checkpoint"),
    "tracking": ("wandb", "wandb_project", "wandb_entity", "wandb_run_name", "wandb_tags", "tensorboard"),
    "profiling and faults": ("profile_steps", "memory_snapshot", "dist_timeout_s", "preemption_deadline_s"),
    "dry run": ("dry_run", "world_size", "dry_run_ranks", "dry_run_init"),
}
TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def field_type(f: dataclasses.Field) -> type:
    return TYPES[f.type if isinstance(f.type, str) else f.type.__name__]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error: ...`` line (not usage + message)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def registered_choices() -> dict[str, list[str]]:
    """The value sets that live with their implementations (imported when a parser is built)."""
    from core.activation_checkpoint import AC_MODES
    from core.context_parallel import CP_METHODS
    from core.pipeline import SCHEDULES
    from models.parallelize import DP_MODES
    from models.registry import model_names

    return {"model": model_names(), "dp_mode": list(DP_MODES), "pp_schedule": list(SCHEDULES),
            "cp_method": list(CP_METHODS), "activation_checkpoint": list(AC_MODES)}


def build_parser() -> argparse.ArgumentParser:
    registered = registered_choices()
    parser = OneLineErrorParser(prog="python -m train", usage="%(prog)s [--config FILE] [--option VALUE ...]",
                                description="Meshtron trainer: train a model on a "
                                "parallel mesh (python -m train, or torchrun -m train --mesh ...).")
    parser.add_argument("--config", type=Path, help="a TOML file with any of the options below (flags win); a "
                        "run's own outputs/<run>/config.toml reruns it")
    by_name = {f.name: f for f in fields(TrainConfig)}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_option(group, by_name[name], registered.get(name, by_name[name].metadata["choices"]))
    return parser


def _add_option(group, f: dataclasses.Field, choices) -> None:
    help_text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")  # argparse formats with %
    if field_type(f) is bool:
        group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
    else:
        group.add_argument(_flag(f.name), dest=f.name, type=field_type(f), default=None, choices=choices,
                           help=help_text, metavar=None if choices else f.name.upper())


def load_toml(path: Path) -> dict[str, Any]:
    """A flat TOML table of options, each checked against its field's type. ValueError names the
    file and the problem: unreadable, not TOML, an unknown key, a value of the wrong type."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path} is not valid TOML: {err}") from None
    by_name = {f.name: f for f in fields(TrainConfig)}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(by_name)}")
    return {name: _typed_toml_value(path, by_name[name], value) for name, value in values.items()}


def _typed_toml_value(path: Path, f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type, or ValueError (its value set is checked by ``validate``, as for flags)."""
    kind = field_type(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # lr = 1 is a float option written as an integer
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{path}: {f.name} = {value!r} should be {kind.__name__}, not {type(value).__name__}")
    return value


def to_toml(cfg: TrainConfig, leave_out: tuple[str, ...] = ()) -> str:
    """``cfg`` as the flat TOML table ``--config`` reads, every option but ``leave_out``.

    Strings are written as JSON strings, which are valid TOML basic strings (the same escapes);
    TOML spells the infinite float ``inf``.
    """
    lines = []
    for f in fields(TrainConfig):
        if f.name in leave_out:
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float) and math.isinf(value):
            text = "inf" if value > 0 else "-inf"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(value, ensure_ascii=False)
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- TOML (``--config``) <- CLI flags."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values)
