"""The training loop: build this rank's parallel model, then step.

One step, the same on every mesh (``train_step``):

    inputs, labels = this batch-rank's rows of the global batch   [B/(dp*ep), S]
    forward-backward      loss share = token losses / tokens in the GLOBAL batch, so that the
                          ranks' summed gradients are the gradient of the global mean loss
    finish gradients      every reduction the parallel layout implies
    clip                  by the gradient norm over the whole mesh
    optimizer step        AdamW (a non-finite step never reaches the weights), LR schedule
    after-step            what the layout updates after it (e.g. router biases)
    report                loss summed over the mesh (= global mean token loss), norm, metrics

What each of these means for a mesh (micro-batches or a schedule of stages, context-parallel
slices, TP/FSDP/replicate reductions, routing statistics) is the
``models.parallel_model.ParallelModel``'s business, built once by ``models.distribute.distribute_model``.
"""

from __future__ import annotations

import datetime
import math
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from core.checkpoint import Checkpointer
from core.failures import CollectiveTimeout, dump_flight_record, is_collective_timeout, timeout_message
from core.mesh import build_mesh
from models.distribute import distribute_model
from models.family import ModelConfig
from models.hf_format import load_hf_weights_
from models.parallel_model import ParallelModel, StepRecipe
from models.parallelize import ParallelOptions

from . import checkpointing
from .banner import startup_banner
from .config import TrainConfig
from .data import build_batches
from .distributed import init_distributed, resolve_device, world_size_from_env
from .divergence import StepSettings, TrainingDiverged
from .evaluation import EvalBatches, build_eval_batches, evaluate
from .flops import model_flops_per_token, peak_flops
from .model_source import resolve_sources
from .optim import build_optimizer, build_scheduler
from .precision import enable_tf32
from .preemption import Preempted, PreemptionWatch, signal_name
from .prefetch import PrefetchedBatches
from .profiling import StepProfiler
from .runs import agree_on_run_dir, lock_run_dir, point_latest_at, write_run_config
from .sampling import sample_text
from .tokenizer import Tokenizer
from .tracking import MetricsLogger, WandbOptions, parse_tags
from .validation import validate

# Seconds a rank that timed out waits for the others to report in before naming the silent ones.
SILENT_RANK_WAIT_S = 10.0
# Reported steps whose metrics a Trainer keeps in memory (all of them go to metrics.jsonl).
HISTORY_LENGTH = 1000


@dataclass
class Trainer:
    cfg: TrainConfig
    model: ParallelModel                  # this rank's part of the model and its step rules
    model_config: ModelConfig             # the whole model's architecture (an MoEConfig for MoE)
    device: torch.device
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: PrefetchedBatches            # this batch rank's rows of every global batch, one read ahead
    compute_dtype: torch.dtype = torch.float32  # what forward and backward compute in (--dtype, resolved)
    eval_batches: EvalBatches | None = None  # this rank's evaluation set, with --eval-every
    tokenizer: Tokenizer | None = None    # the data's tokenizer (--sample-every decodes with it)
    flops_per_token: float = 0.0
    step: int = 0
    history: deque[dict] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))  # the latest reports
    skipped_steps: int = 0               # updates dropped by --skip-nonfinite-steps
    checkpointer: Checkpointer = field(default_factory=Checkpointer)  # its groups and the async save in flight
    unchecked_nonfinite: torch.Tensor | None = None  # steps dropped on the device since the last report
    last_report: tuple[int, float] = (0, 0.0)         # (step, time) of the last reported step


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Validate, join the process group, build mesh, model, optimizer, data. Collective."""
    cfg = resolve_sources(cfg)  # a hub id becomes its cached folder, before anything reads it
    checked = validate(cfg, world_size_from_env())
    device = resolve_device(cfg.device)
    enable_tf32(device)
    init_distributed(device, cfg.dist_timeout_s)
    cfg = agree_on_run_dir(cfg)
    pm = build_mesh(checked.shape, device.type, checked.dp_shard)
    torch.manual_seed(cfg.seed)
    tokenizer, model_config = checked.tokenizer, checked.model_config
    dtype = checked.compute_dtype
    model = distribute_model(model_config, pm, device, parallel_options(cfg, dtype),
                             step_recipe(cfg, tokenizer.eos_id, dtype), cfg.seed)
    if cfg.init_from:
        for part in model.parts:
            load_hf_weights_(part, cfg.init_from)  # each rank copies its own shards; no collective
    optimizer = build_optimizer(cfg, model.module)
    scheduler = build_scheduler(cfg, optimizer)
    batch_rank, batch_world = model.batch_shard
    vocab_size = model_config.vocab_size
    batches = build_batches(cfg, tokenizer, batch_rank, batch_world, vocab_size)
    eval_batches = build_eval_batches(cfg, tokenizer, batches, batch_rank, batch_world,
                                      vocab_size) if cfg.eval_every else None
    batches = PrefetchedBatches(batches, device)
    return Trainer(cfg, model, model_config, device, optimizer, scheduler, batches, dtype, eval_batches, tokenizer,
                   flops_per_token=model_flops_per_token(model_config, cfg.seq_len),
                   checkpointer=Checkpointer(datetime.timedelta(seconds=cfg.dist_timeout_s)))


def wandb_options(cfg: TrainConfig) -> WandbOptions | None:
    """The W&B run's project, entity, name (default: the run's) and tags; None without ``--wandb``."""
    if not cfg.wandb:
        return None
    return WandbOptions(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_run_name or cfg.run_name,
                        parse_tags(cfg.wandb_tags))


def parallel_options(cfg: TrainConfig, dtype: torch.dtype) -> ParallelOptions:
    """The run's flags as ``models.parallelize`` takes them (``dtype``: the compute dtype)."""
    return ParallelOptions(dp_mode=cfg.dp_mode, param_dtype=dtype if dtype != torch.float32 else None,
                           fsdp_unit_params=cfg.fsdp_unit_params, cp_method=cfg.cp_method,
                           activation_checkpoint=cfg.activation_checkpoint, compile=cfg.compile,
                           pp_schedule=cfg.pp_schedule, microbatches=cfg.microbatches, float8=cfg.float8)


def step_recipe(cfg: TrainConfig, eos_id: int, dtype: torch.dtype) -> StepRecipe:
    """What each step computes: batch, micro-batches, document masking, compute dtype."""
    return StepRecipe(cfg.global_batch_size, cfg.seq_len, cfg.grad_accum_steps,
                      document_eos=eos_id if cfg.document_masking else None, compute_dtype=dtype)


def model_flops_utilization(t: Trainer, tokens_per_sec: float) -> float | None:
    """Achieved FLOP/s over the peak of all devices in the mesh; None where the peak is unknown (CPU)."""
    peak = peak_flops(t.device, t.compute_dtype)
    return None if peak is None else t.flops_per_token * tokens_per_sec / (peak * dist.get_world_size())


def compute_gradients(t: Trainer) -> tuple[torch.Tensor, float]:
    """Fetch the next batch, forward-backward, finish the gradients.

    Returns (this rank's loss share, seconds spent waiting for data). Afterwards every
    parameter's ``.grad`` holds its part of the gradient of the global mean loss.
    """
    start = time.perf_counter()
    inputs, labels = next(t.batches)
    data_time = time.perf_counter() - start
    loss_share = t.model.forward_backward(inputs, labels)
    t.model.finish_gradients()
    return loss_share, data_time


def apply_gradients(t: Trainer, loss: float | torch.Tensor
                    ) -> tuple[float | torch.Tensor, float, bool | torch.Tensor]:
    """Clip over the whole mesh, step AdamW and the LR schedule, then the layout's after-step.

    Returns (grad norm, lr used, whether the update was applied). A non-finite loss or norm
    never reaches the weights:

    - ``loss`` a float (a reported step): the norm is read on the host; a non-finite step
      raises ``TrainingDiverged`` before anything changes, or with ``--skip-nonfinite-steps``
      drops this step's update (the schedule and the data still move on);
    - ``loss`` a device tensor (a step between reports, fused AdamW only): nothing is read
      on the host; the fused kernel skips the update when told the step is not finite
      (``found_inf``, as for a gradient scaler), and the norm and "applied" come back as
      device tensors for ``train_step`` to check at the next report.
    """
    norm = t.model.clip_gradients(t.cfg.max_grad_norm)
    lr = t.scheduler.get_last_lr()[0]
    if isinstance(loss, torch.Tensor):
        applied = torch.isfinite(loss) & torch.isfinite(norm)
        t.optimizer.found_inf = (~applied).float()
        t.optimizer.step()
        t.optimizer.found_inf = None
        grad_norm = norm
    else:
        grad_norm = norm.item()
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if not applied and not t.cfg.skip_nonfinite_steps:
            raise TrainingDiverged(t.step + 1, loss, grad_norm, step_settings(t.cfg))
        if applied:
            t.optimizer.step()
    t.model.after_optimizer_step(applied)
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, applied


def step_settings(cfg: TrainConfig) -> StepSettings:
    return StepSettings(lr=cfg.lr, warmup_steps=cfg.warmup_steps, log_every=cfg.log_every)


def check_dropped_steps(t: Trainer) -> None:
    """Before a reported step: count the steps dropped on the device since the previous report,
    and stop the run (``TrainingDiverged``) if there were any and ``--skip-nonfinite-steps`` is off."""
    if t.unchecked_nonfinite is None:
        return
    dropped, t.unchecked_nonfinite = int(t.unchecked_nonfinite.item()), None
    if dropped and not t.cfg.skip_nonfinite_steps:
        raise TrainingDiverged(t.step, math.nan, math.nan, step_settings(t.cfg), window=(t.last_report[0] + 1, t.step))
    t.skipped_steps += dropped


def reports_step(t: Trainer, step: int) -> bool:
    """Whether ``step`` reads its results on the host: a logging step (every ``--log-every``),
    the last one, one that evaluates or saves, or every step when the optimizer cannot skip a
    non-finite update on the device (not fused)."""
    cfg = t.cfg
    return (step % cfg.log_every == 0 or step == cfg.steps or not t.optimizer.defaults.get("fused")
            or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
            or (cfg.sample_every > 0 and step % cfg.sample_every == 0)
            or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0))


def train_step(t: Trainer) -> dict:
    """One optimizer step. Returns its metrics (identical on every rank) on a reported step
    (``reports_step``), else {}: between reports nothing is read on the host, so the device
    never waits for the Python loop."""
    report = reports_step(t, t.step + 1)
    if report:
        check_dropped_steps(t)  # the steps since the last report, before this one can raise on its own
    step_start = time.perf_counter()
    loss_share, data_time = compute_gradients(t)
    loss = t.model.reduce_loss(loss_share, on_host=report)
    grad_norm, lr, applied = apply_gradients(t, loss)
    t.step += 1
    if not report:
        dropped = (~applied).int()
        t.unchecked_nonfinite = dropped if t.unchecked_nonfinite is None else t.unchecked_nonfinite + dropped
        return {}
    if not applied:
        t.skipped_steps += 1
    return step_report(t, loss, grad_norm, lr, step_start, data_time)


def step_report(t: Trainer, loss: float, grad_norm: float, lr: float, step_start: float, data_time: float) -> dict:
    """The metrics of the step just taken; the layout adds its own (``ParallelModel.metrics``, a
    collective at the same step on every rank)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    now = time.perf_counter()
    last_step, last_time = t.last_report
    steps = t.step - last_step
    # Steps between reports are timed together (the device may still be busy with them).
    step_time = (now - last_time) / steps if last_time and steps > 1 else now - step_start
    t.last_report = (t.step, now)
    tokens_per_sec = t.cfg.global_batch_size * t.cfg.seq_len / step_time
    metrics = {
        "step": t.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_sec": tokens_per_sec,
        "step_time_s": step_time, "data_time_s": data_time, "mem_peak_mib": peak_memory_mib(t.device),
        **t.model.metrics(),
    }
    if t.skipped_steps:
        metrics["skipped_steps"] = t.skipped_steps
    mfu = model_flops_utilization(t, tokens_per_sec)
    if mfu is not None:
        metrics["mfu"] = mfu
    return metrics


def stop_for_preemption(t: Trainer, signum: int, saved, wandb_run_id: str | None) -> None:
    """Every rank, after the same step: make sure this step is saved (and committed), then raise
    ``Preempted``. Saves even with ``--checkpoint-every 0``: a preempted run's work is the point."""
    if saved is None:
        saved = checkpointing.save_and_report(t, wandb_run_id)
    committed = t.checkpointer.wait() or saved  # an async save commits here
    raise Preempted(signal_name(signum), t.step, committed)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS counts bytes, Linux KiB


def train(cfg: TrainConfig) -> Trainer:
    """Build, resume if asked, and run to ``cfg.steps``; every rank returns its Trainer.

    Global rank 0 writes ``metrics.jsonl``, the console line and W&B; the metrics are the
    same on every rank (the loss is reduced over the mesh), so which rank logs is arbitrary.
    """
    t = build_trainer(cfg)
    cfg = t.cfg  # with the run's folder decided
    lock = lock_run_dir(cfg)
    try:
        return run_training(t, cfg)
    except RuntimeError as err:
        if not is_collective_timeout(err):
            raise
        dump = dump_flight_record(Path(cfg.output_dir))
        where = f"; this rank's flight-recorder dump (its collectives and their states): {dump}" if dump else ""
        raise CollectiveTimeout(timeout_message(err, SILENT_RANK_WAIT_S) + where) from None
    finally:
        t.batches.close()
        lock.release()


def run_training(t: Trainer, cfg: TrainConfig) -> Trainer:
    """``train`` once the run's folder is this run's alone: resume, then step to ``cfg.steps``."""
    resume_from = checkpointing.first_intact(t, checkpointing.resolve_resume_path(cfg))
    meta = checkpointing.restore(t, resume_from, verified=True) if resume_from else {}
    t.last_report = (t.step, 0.0)  # a resumed run reports from its own first step on
    if dist.get_rank() == 0:
        write_run_config(cfg)
        point_latest_at(Path(cfg.output_dir))
        print(startup_banner(t, resume_from), flush=True)
    logger = MetricsLogger(Path(cfg.output_dir), cfg.to_dict(), is_logging_rank=dist.get_rank() == 0,
                           wandb=wandb_options(cfg), wandb_run_id=meta.get("wandb_run_id"), total_steps=cfg.steps,
                           tensorboard=cfg.tensorboard, first_step=t.step + 1)
    profiler = StepProfiler(cfg.profile_steps, cfg.memory_snapshot, Path(cfg.output_dir), dist.get_rank(), t.device)
    watch = PreemptionWatch(cfg.preemption_deadline_s, lambda: checkpointing.latest_checkpoint(cfg), cfg.dist_timeout_s)
    with logger, watch:
        try:
            while t.step < cfg.steps:
                profiler.before_step(t.step + 1)
                metrics = train_step(t)
                profiler.after_step(t.step)
                if cfg.eval_every and (t.step % cfg.eval_every == 0 or t.step == cfg.steps):
                    metrics.update(evaluate(t.model, t.eval_batches))
                if cfg.sample_every and (t.step % cfg.sample_every == 0 or t.step == cfg.steps):
                    metrics["sample"] = sample_text(t.model, t.tokenizer, cfg.sample_prompt, cfg.sample_tokens)
                if metrics:
                    t.history.append(metrics)
                    logger.log(t.step, {k: v for k, v in metrics.items() if k != "step"})
                saved = checkpointing.save_and_report(t, logger.run_id) if checkpointing.should_save(t) else None
                signum = watch.agreed_signal()
                if signum:
                    stop_for_preemption(t, signum, saved, logger.run_id)
                if metrics:  # the next report times training only, not this one's eval, logging or save
                    t.last_report = (t.step, time.perf_counter())
        except TrainingDiverged:
            # Every rank raised at the same step, so the collective commit below is safe:
            # the last good checkpoint, still being written, must not be lost (and the
            # message, written by the caller, names it).
            t.checkpointer.wait()
            raise
        t.checkpointer.wait()  # an async save commits only once every rank has waited
    return t
