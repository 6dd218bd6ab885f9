"""Every check that can reject a run, done before the first collective.

All ranks run the same checks on the same inputs, so a bad configuration raises the
same clear error on every rank at once, and no rank is left waiting in a collective
for a peer that has already failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.context_parallel import cp_attention
from core.mesh import MeshConfigError, MeshShape, check_divisible
from core.pipeline import PipelineConfigError, check_pipeline, default_microbatches, schedule_spec
from models.hf_format import check_hf_config_matches
from models.moe import MoEConfig, check_expert_parallel
from models.plans import check_tensor_parallel
from models.registry import get_config, parse_model_args

from .config import TrainConfig
from .tokenizer import load_tokenizer

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ValidatedRun:
    shape: MeshShape
    model_config: object


def validate(cfg: TrainConfig, world_size: int) -> ValidatedRun:
    """Resolve the mesh against ``world_size`` and check that model, batch and sequence fit it."""
    shape = MeshShape.parse(cfg.mesh).resolve(world_size)
    model_config = get_config(cfg.model, **parse_model_args(cfg.model, cfg.model_args))
    _check_model_fits_mesh(model_config, shape)
    _check_batch(cfg, shape)
    _check_pipeline(cfg, model_config, shape)
    cp_attention(cfg.cp_method)  # a typo fails at once, also where cp = 1
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype!r}: use one of {DTYPES}")
    if cfg.steps < 1 or cfg.seq_len < 1:
        raise ValueError(f"--steps ({cfg.steps}) and --seq-len ({cfg.seq_len}) must be >= 1")
    if cfg.init_from:
        check_hf_config_matches(cfg.init_from, model_config)
    if cfg.dataset != "synthetic":
        _check_tokenizer_fits_model(cfg.tokenizer, model_config)
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")
    return ValidatedRun(shape, model_config)


def _check_tokenizer_fits_model(tokenizer: str, model_config) -> None:
    vocab = load_tokenizer(tokenizer).vocab_size
    if vocab > model_config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {vocab} tokens but the model's vocab_size is "
                         f"{model_config.vocab_size}: use a model with vocab_size >= {vocab} or a smaller tokenizer")


def _check_model_fits_mesh(model_config, shape: MeshShape) -> None:
    try:
        check_tensor_parallel(model_config, shape.tp)
        if isinstance(model_config, MoEConfig):
            check_expert_parallel(model_config, shape.ep)
    except ValueError as err:
        raise MeshConfigError(str(err)) from None
    if model_config.n_layers < shape.pp:
        raise MeshConfigError(f"model has {model_config.n_layers} layers but pp={shape.pp} stages need at least one "
                              f"layer each: use pp <= {model_config.n_layers} or a deeper model")


def _check_batch(cfg: TrainConfig, shape: MeshShape) -> None:
    batch_ranks = shape.dp * shape.ep
    check_divisible("--global-batch-size", cfg.global_batch_size, "dp*ep", batch_ranks,
                    f"use a multiple of {batch_ranks} sequences (every data-parallel rank needs whole sequences)")
    local_batch = cfg.global_batch_size // batch_ranks
    if cfg.grad_accum_steps < 1 or local_batch % cfg.grad_accum_steps:
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
    """Schedule name always (a typo should not pass silently); the rest only when pp > 1."""
    schedule_spec(cfg.pp_schedule)
    if shape.pp == 1:
        return
    if cfg.grad_accum_steps != 1:
        raise PipelineConfigError(f"--grad-accum-steps {cfg.grad_accum_steps} with pp={shape.pp}: a pipeline "
                                  f"already accumulates over its microbatches; use --microbatches instead")
    check_pipeline(model_config.n_layers, shape.pp, cfg.pp_schedule, default_microbatches(shape.pp, cfg.microbatches),
                   cfg.global_batch_size // (shape.dp * shape.ep))
