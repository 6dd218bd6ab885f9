"""What a run is about to do, printed once by global rank 0 before the first step.

A newcomer should not have to read the code to know the model's size, what each mesh
dimension splits, how many tokens a step and the run consume, how many times the run will
see its data, and where and how often it saves.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from core.mesh import MeshShape
from models.stats import ModelStats

from .model_source import model_label
from .runs import RUN_IDENTITY, RUNS_ROOT


def startup_banner(t, resumed_from: Path | None) -> str:
    """The banner's lines (``t`` is the Trainer; no collective)."""
    cfg = t.cfg
    rows = [("run", _run_line(cfg)), ("model", _model_line(cfg, t.model_config, t.device, t.compute_dtype)),
            ("mesh", _mesh_line(cfg, t.model.mesh.shape)), ("step", _step_line(cfg)),
            ("data", _data_line(cfg, t.batches.source)), ("checkpoints", _checkpoint_line(cfg, resumed_from, t.step))]
    return "\n".join(f"{name:<12}{text}" for name, text in rows)


def _run_line(cfg) -> str:
    config_file = Path(cfg.output_dir) / "config.toml"
    named = Path(cfg.output_dir).parent == RUNS_ROOT
    resume_flag = f"--run-name {cfg.run_name}" if named else f"--output-dir {cfg.output_dir}"
    return (f"{cfg.output_dir}  (continue it: {resume_flag}; rerun it elsewhere: --config {config_file}, which "
            f"holds every option but {' and '.join(RUN_IDENTITY)})")


def parameter_counts(model_config) -> tuple[int, int, int]:
    """(total, active per token, non-embedding) parameters of the whole model, counted from the config
    (``models.stats``). Non-embedding leaves out the token embedding and the output projection."""
    stats = ModelStats.of(model_config)
    return stats.total, int(stats.active), stats.non_embedding


def _model_line(cfg, model_config, device: torch.device, dtype: torch.dtype) -> str:
    total, active, non_embedding = parameter_counts(model_config)
    active_text = f", {_count(active)} active per token" if active != total else ""
    return (f"{model_label(cfg)}: {_count(total)} parameters{active_text}, {_count(non_embedding)} outside the "
            f"embedding and output layers; {model_config.n_layers} layers, dim {model_config.dim}, vocab "
            f"{model_config.vocab_size}; {_precision(cfg, dtype)} on {device.type}{_speed_options(cfg)}")


def _precision(cfg, dtype: torch.dtype) -> str:
    """E.g. "bfloat16 compute (--dtype auto), float8 matmuls", master weights always being float32."""
    text = f"{str(dtype).removeprefix('torch.')} compute"
    if cfg.dtype == "auto":
        text += " (--dtype auto)"
    return text + (", float8 matmuls" if cfg.float8 else "")


def _speed_options(cfg) -> str:
    """Activation checkpointing and compile, which change a step's memory and time (not its result)."""
    parts = [f"activation checkpointing {cfg.activation_checkpoint}"] if cfg.activation_checkpoint != "none" else []
    if cfg.compile:
        parts.append("torch.compile (step 1 includes the compiling)")
    return "".join(f", {part}" for part in parts)


def _mesh_line(cfg, shape: MeshShape) -> str:
    world = dist.get_world_size()
    dp_kind = {"fsdp": "FSDP: parameters, gradients and AdamW state sharded",
               "hsdp": "HSDP: sharded within groups, replicated across them",
               "replicate": "replicated, gradients all-reduced"}[cfg.dp_mode]
    roles = {"dp": f"data parallel ({dp_kind}; each rank takes its share of the batch)",
             "pp": f"pipeline: the layers cut into stages ({cfg.pp_schedule})",
             "cp": f"context parallel: each sequence split over ranks ({cfg.cp_method} attention)",
             "tp": "tensor parallel: heads, FFN and vocabulary split, sequence parallel between them",
             "ep": "expert parallel: the experts split, tokens sent to them by all-to-all"}
    used = [f"{dim}={getattr(shape, dim)} {role}" for dim, role in roles.items() if getattr(shape, dim) > 1]
    ranks = f"{world} rank{'s' * (world > 1)}"
    return f"{ranks}: " + ("; ".join(used) if used else "one process, no parallelism")


def _step_line(cfg) -> str:
    tokens = cfg.global_batch_size * cfg.seq_len
    return (f"{cfg.global_batch_size} sequences x {cfg.seq_len} tokens = {tokens:,} tokens per step; "
            f"{cfg.steps:,} steps = {tokens * cfg.steps:,} tokens")


def _data_line(cfg, batches) -> str:
    if cfg.dataset == "synthetic":
        return "synthetic: random tokens (nothing to learn; for speed and parity checks)"
    tokenizer = f"tokenizer: {cfg.tokenizer}"
    if cfg.streaming:
        return f"{batches.description}, streamed (its size is not known ahead), {tokenizer}"
    windows = batches.num_windows
    epochs = cfg.steps * cfg.global_batch_size / windows
    return (f"{batches.description}: {batches.n_documents:,} documents, {len(batches.tokens):,} tokens "
            f"({tokenizer}); {windows:,} training windows of {cfg.seq_len} tokens (+{len(batches.held_out_windows)} "
            f"held out) -> {epochs:.2f} epochs")


def _checkpoint_line(cfg, resumed_from: Path | None, step: int) -> str:
    start = f"resumed from {resumed_from} at step {step}" if resumed_from else "starting at step 0"
    if cfg.checkpoint_every == 0:
        return f"none saved (--checkpoint-every 0); {start}"
    keep = f"keeping the newest {cfg.keep_checkpoints}" if cfg.keep_checkpoints else "keeping all"
    return (f"every {cfg.checkpoint_every} steps and at step {cfg.steps}, {keep}, in "
            f"{Path(cfg.output_dir) / 'checkpoints'}{' (async)' if cfg.async_checkpoint else ''}; {start}")


def _count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
