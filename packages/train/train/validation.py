"""Every check that can reject a run, done before the first collective.

All ranks run the same checks on the same inputs, so a bad configuration raises the
same clear error on every rank at once, and no rank is left waiting in a collective
for a peer that has already failed. Each error is a ValueError (or a subclass) whose
message names the option, the value and the fix; ``python -m train`` prints it as one
``error: ...`` line.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from core.activation_checkpoint import check_mode as check_activation_checkpoint
from core.context_parallel import cp_attention
from core.mesh import MeshConfigError, MeshShape, check_divisible, hsdp_shard_size
from core.pipeline import PipelineConfigError, check_pipeline, default_microbatches, schedule_spec
from models.family import ModelConfig
from models.parallelize import DP_MODES
from models.registry import family_of

from .config import DTYPES, TrainConfig
from .data_sources import check_local_dataset
from .distributed import device_type
from .model_source import model_config as model_config_of
from .precision import check_precision, compute_dtype
from .profiling import check_profiling
from .runs import RUNS_ROOT, check_run_name, requested_run_dir
from .sampling import check_sampling
from .tokenizer import Tokenizer, load_tokenizer
from .tracking import parse_tags


@dataclass(frozen=True)
class ValidatedRun:
    shape: MeshShape
    model_config: ModelConfig  # its family's config class (an MoEConfig for MoE models)
    tokenizer: Tokenizer       # loaded once here; the data and document masking use this one
    dp_shard: int | None    # HSDP's shard-group size along dp (None: no HSDP)
    compute_dtype: torch.dtype  # what --dtype (auto: by device and --float8) computes in


def validate(cfg: TrainConfig, world_size: int) -> ValidatedRun:
    """Resolve the mesh against ``world_size`` and check options, model, batch, sequence and files."""
    _check_ranges(cfg)
    _check_choices(cfg)
    check_run_name(cfg.run_name)
    _check_dry_run_options(cfg)
    shape = MeshShape.parse(cfg.mesh).resolve(world_size)
    tokenizer = load_tokenizer(cfg.tokenizer)  # a bad --tokenizer is a mistake even where unused
    model_config = model_config_of(cfg, tokenizer)
    check_model_fits_mesh(model_config, shape)
    check_batch(cfg, shape)
    _check_pipeline(cfg, model_config, shape)
    dp_shard = _hsdp_shard(cfg, shape, world_size)
    if cfg.document_masking and shape.cp > 1 and device_type(cfg.device) == "cuda":
        raise ValueError("--document-masking with cp > 1 runs on the CPU flash kernel in this version (the CUDA "
                         "block kernels here take no attention bias yet): use cp=1 on CUDA")
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")
    _check_files(cfg, model_config, tokenizer)
    check_sampling(cfg, shape, tokenizer, model_config.max_seq_len)
    _check_tracking(cfg)
    check_precision(cfg.dtype, cfg.float8)
    return ValidatedRun(shape, model_config, tokenizer, dp_shard,
                        compute_dtype(cfg.dtype, device_type(cfg.device), cfg.float8))


def _check_dry_run_options(cfg: TrainConfig) -> None:
    """The dry run's own options mean nothing to a real run (its world size is torchrun's)."""
    if cfg.dry_run:
        if cfg.world_size < 1:
            raise ValueError("--dry-run needs --world-size N (the number of ranks to simulate), N >= 1")
        return
    given = [flag for flag, value in (("--world-size", cfg.world_size), ("--dry-run-ranks", cfg.dry_run_ranks),
                                      ("--dry-run-init", cfg.dry_run_init)) if value]
    if given:
        raise ValueError(f"{', '.join(given)} applies to --dry-run only: add --dry-run, or launch N ranks with "
                         f"torchrun --nproc_per_node=N")


def _check_tracking(cfg: TrainConfig) -> None:
    for tag in parse_tags(cfg.wandb_tags):
        if len(tag) > WANDB_TAG_MAX:
            raise ValueError(f"--wandb-tags: {tag[:20]!r}... is {len(tag)} characters; W&B takes tags of at most "
                             f"{WANDB_TAG_MAX}")


WANDB_TAG_MAX = 64  # W&B refuses longer tags


def _hsdp_shard(cfg: TrainConfig, shape: MeshShape, world_size: int) -> int | None:
    if cfg.dp_mode != "hsdp":
        if cfg.dp_shard:
            raise ValueError(f"--dp-shard {cfg.dp_shard} applies to --dp-mode hsdp only (now {cfg.dp_mode})")
        return None
    return hsdp_shard_size(shape, cfg.dp_shard, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


# (option, test, what it must be): numeric options whose bad values would fail late or silently.
RANGES = (
    ("steps", lambda v: v >= 1, ">= 1"),
    ("global_batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum_steps", lambda v: v >= 1, ">= 1"),
    ("seq_len", lambda v: v >= 1, ">= 1"),
    ("microbatches", lambda v: v >= 0, ">= 0 (0: 2 * pp)"),
    ("dp_shard", lambda v: v >= 0, ">= 0 (0: one node's worth)"),
    ("fsdp_unit_params", lambda v: v >= 0, ">= 0 (0: one FSDP unit per block)"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_eps", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("max_grad_norm", lambda v: v > 0, "> 0 (inf: no clipping)"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("dist_timeout_s", lambda v: v >= 1, ">= 1"),
    ("preemption_deadline_s", lambda v: v > 0, "> 0"),
    ("checkpoint_every", lambda v: v >= 0, ">= 0 (0: never save)"),
    ("keep_checkpoints", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("eval_every", lambda v: v >= 0, ">= 0 (0: never evaluate)"),
    ("eval_batches", lambda v: v >= 1, ">= 1"),
    ("sample_every", lambda v: v >= 0, ">= 0 (0: never sample)"),
    ("sample_tokens", lambda v: v >= 1, ">= 1"),
)


def _check_ranges(cfg: TrainConfig) -> None:
    for name, ok, requirement in RANGES:
        value = getattr(cfg, name)
        if not ok(value):  # NaN fails every comparison, so it lands here too
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be {requirement}")


def _check_choices(cfg: TrainConfig) -> None:
    """The fixed value sets (argparse checks flags; these also catch TOML values)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    if cfg.dp_mode not in DP_MODES:
        raise ValueError(f"--dp-mode {cfg.dp_mode!r}: use one of {', '.join(DP_MODES)}")
    check_activation_checkpoint(cfg.activation_checkpoint)
    cp_attention(cfg.cp_method)  # a typo fails at once, also where cp = 1
    schedule_spec(cfg.pp_schedule)  # likewise where pp = 1
    check_profiling(cfg.profile_steps, cfg.memory_snapshot, device_type(cfg.device), cfg.steps)


def _check_files(cfg: TrainConfig, model_config, tokenizer: Tokenizer) -> None:
    """What the run reads and writes: initial weights, tokenizer, dataset, output folder."""
    if cfg.dataset != "synthetic":
        _check_vocab_fits_model(cfg.tokenizer, tokenizer.vocab_size, model_config, cfg.init_from)
        _check_dataset_options(cfg, local=check_local_dataset(cfg.dataset) is not None)
    if cfg.eval_dataset:
        check_local_dataset(cfg.eval_dataset)
    if cfg.eval_every and cfg.streaming and not cfg.eval_dataset:
        raise ValueError("--eval-every with --streaming data: a stream has no held-out split; pass --eval-dataset")
    _check_output_dir(requested_run_dir(cfg) or RUNS_ROOT)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' in the "
                         "Meshtron folder (or pip install tensorboard)")


def _check_dataset_options(cfg: TrainConfig, local: bool) -> None:
    if not cfg.text_column.strip():
        raise ValueError("--text-column is empty: name the field that holds the text (e.g. text, content)")
    if not cfg.dataset_split.strip():
        raise ValueError("--dataset-split is empty: name a split of the hub dataset (e.g. train)")
    if local and (cfg.dataset_config or cfg.dataset_split != "train"):
        flag = "--dataset-config" if cfg.dataset_config else "--dataset-split"
        raise ValueError(f"{flag} applies to Hugging Face hub datasets; --dataset {cfg.dataset or 'default'} is "
                         f"local files, one split: point --dataset at that split's files instead")


def _check_output_dir(path: Path) -> None:
    """Create ``--output-dir`` and write a probe file in it. Every rank checks for itself: all of
    them write checkpoint shards there (and on a cluster the folder may be node-local)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        reason = "a file of that name exists" if isinstance(err, FileExistsError) else (err.strerror or str(err))
        raise ValueError(f"--output-dir {path} cannot be created or written ({reason}): "
                         f"pick a folder this user can write") from None


def _check_vocab_fits_model(tokenizer: str, vocab: int, model_config, init_from: str) -> None:
    if vocab <= model_config.vocab_size:
        return
    fix = "pass the model's own tokenizer with --tokenizer" if init_from else \
        f"use a model with vocab_size >= {vocab} or a smaller tokenizer"
    raise ValueError(f"tokenizer {tokenizer!r} has {vocab} tokens but the model's vocab_size is "
                     f"{model_config.vocab_size}: {fix}")


def check_model_fits_mesh(model_config, shape: MeshShape) -> None:
    try:
        family_of(model_config).check_mesh(model_config, shape.tp, shape.ep)
    except ValueError as err:
        raise MeshConfigError(str(err)) from None
    if model_config.n_layers < shape.pp:
        raise MeshConfigError(f"model has {model_config.n_layers} layers but pp={shape.pp} stages need at least one "
                              f"layer each: use pp <= {model_config.n_layers} or a deeper model")


def check_batch(cfg: TrainConfig, shape: MeshShape) -> None:
    batch_ranks = shape.dp * shape.ep
    check_divisible("--global-batch-size", cfg.global_batch_size, "dp*ep", batch_ranks,
                    f"use a multiple of {batch_ranks} sequences (every data-parallel rank needs whole sequences)")
    local_batch = cfg.global_batch_size // batch_ranks
    if local_batch % cfg.grad_accum_steps:
        raise MeshConfigError(f"the per-rank batch ({local_batch} sequences = global {cfg.global_batch_size} / dp*ep "
                              f"{batch_ranks}) is not divisible by --grad-accum-steps {cfg.grad_accum_steps}")
    check_divisible("--seq-len", cfg.seq_len, "2*cp", 2 * shape.cp if shape.cp > 1 else 1,
                    f"zigzag context parallel cuts the sequence into 2*cp={2 * shape.cp} equal chunks; "
                    f"use a multiple of {2 * shape.cp}")
    if shape.tp > 1:
        local_seq = cfg.seq_len // shape.cp
        check_divisible("the per-rank sequence length (seq_len/cp)", local_seq, "tp", shape.tp,
                        "sequence parallel splits each rank's sequence over tp: make seq_len a multiple of cp*tp")


def _check_pipeline(cfg: TrainConfig, model_config, shape: MeshShape) -> None:
    """Only when pp > 1 (the schedule name is checked with the other choices)."""
    if shape.pp == 1:
        return
    if cfg.document_masking:
        raise PipelineConfigError(f"--document-masking with pp={shape.pp}: pipeline stages pass only hidden "
                                  f"states between them, not the documents; use a mesh without pp")
    if cfg.eval_every and cfg.pp_schedule == "zbv":
        raise PipelineConfigError("--eval-every with --pp-schedule zbv: torch's zero-bubble V schedule has no "
                                  "forward-only mode (its eval runs backward actions); use 1f1b, gpipe or "
                                  "interleaved-1f1b for runs that evaluate")
    if cfg.grad_accum_steps != 1:
        raise PipelineConfigError(f"--grad-accum-steps {cfg.grad_accum_steps} with pp={shape.pp}: a pipeline "
                                  f"already accumulates over its microbatches; use --microbatches instead")
    check_pipeline(model_config.n_layers, shape.pp, cfg.pp_schedule, default_microbatches(shape.pp, cfg.microbatches),
                   cfg.global_batch_size // (shape.dp * shape.ep))
