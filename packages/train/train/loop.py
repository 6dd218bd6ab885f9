"""The training loop: build the parallel model on the mesh, then step.

One step on one rank (no pipeline):

    inputs, labels = this batch-rank's rows of the global batch      [B/(dp*ep), S]
    context parallel: keep this cp rank's zigzag slice of S          [B/(dp*ep), S/cp]
    for each of grad_accum_steps micro-batches:
        loss = sum of token losses / tokens in the GLOBAL batch      (so summed grads = grad of the mean)
        loss.backward()                                              (MoE: + the aux loss, via its backward;
                                                                      FSDP reduce-scatters, summing, after
                                                                      the last micro-batch only)
    clip by the norm over the whole mesh, AdamW step, LR schedule step
    MoE: move expert biases by the step's global load
    report: loss summed over dp x ep x cp                           (= global mean token loss)

With pipeline parallel (pp > 1) the forward/backward is a pipeline schedule instead
(``train.pipelined``) and ``Trainer.model`` holds this rank's stage(s); the rest of the
step (gradient sync, clipping over the whole mesh, optimizer) is the same.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from core.checkpoint import Checkpointer
from core.data_parallel import all_reduce_gradients
from core.documents import Documents, document_ids, document_positions
from core.grad_norm import clip_grad_norm_
from core.mesh import ParallelMesh, build_mesh
from core.zigzag import zigzag_shard
from core.tensor_parallel import loss_context, reduce_partial_gradients, local_tensor, token_loss_sum
from models.hf_format import load_hf_weights_
from models.moe import (MoEConfig, active_parameter_count, expert_load_metrics,
                        set_sequences_per_step, sum_step_load, update_expert_bias)
from models.parallelize import (ParallelOptions, dense_and_expert_parameters, parallelize_and_initialize,
                                token_split_parameters)
from models.registry import build_model

from . import checkpointing
from .config import TrainConfig
from .data import build_batches
from .divergence import TrainingDiverged, check_dropped_steps
from .evaluation import build_eval_batches, evaluate
from .flops import peak_flops, transformer_flops_per_token
from .optim import build_optimizer, build_scheduler
from .profiling import StepProfiler
from .tracking import MetricsLogger
from .distributed import init_distributed, resolve_device, world_size_from_env
from .pipelined import ModelParts, Pipeline, build_pipeline, pipeline_forward_backward
from .validation import validate

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Trainer:
    cfg: TrainConfig
    pm: ParallelMesh
    device: torch.device
    model_config: object
    model: nn.Module                     # the whole model, or under pp > 1 this rank's ModelParts
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: object
    flops_per_token: float = 0.0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0               # updates dropped by --skip-nonfinite-steps
    checkpointer: Checkpointer = field(default_factory=Checkpointer)  # its groups and the async save in flight
    pipeline: Pipeline | None = None     # set when pp > 1
    eval_batches: object = None          # this rank's evaluation set, with --eval-every
    eos_id: int = 0                      # the tokenizer's end-of-text id: documents end there
    unchecked_nonfinite: torch.Tensor | None = None  # steps dropped on the device since the last report
    last_report: tuple[int, float] = (0, 0.0)         # (step, time) of the last reported step

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def model_parts(self) -> list[nn.Module]:
        """The model pieces this rank holds: [model], or its pipeline stages in stage order."""
        return list(self.model) if isinstance(self.model, ModelParts) else [self.model]

    def named_parameters(self):
        """(name, parameter) with the whole model's names (``layers.3.attention.wq.weight``) on any mesh."""
        for part in self.model_parts:
            yield from part.named_parameters()

    def named_buffers(self):
        """(name, buffer) with the whole model's names, like ``named_parameters``."""
        for part in self.model_parts:
            yield from part.named_buffers()

    def compute_context(self) -> contextlib.AbstractContextManager:
        """bf16 compute for models FSDP does not manage (FSDP casts parameters itself via its
        MixedPrecisionPolicy, which also all-gathers them in bf16: half the bytes)."""
        if self.cfg.dtype == "float32" or all(isinstance(part, FSDPModule) for part in self.model_parts):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPE[self.cfg.dtype])

    def documents_of(self, inputs: torch.Tensor) -> Documents | None:
        """With --document-masking: the document ids of whole sequences ``inputs`` [b, S] and the
        rotary positions of this rank's tokens (its zigzag slice under cp); else None."""
        if not self.cfg.document_masking:
            return None
        ids = document_ids(inputs, self.eos_id)
        return Documents(ids.to(self.device), self.local_tokens(document_positions(ids)))

    def local_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's part of a batch on its device: [b, S] -> [b, S/cp], the cp rank's zigzag
        chunks r and 2cp-1-r (all of S when cp = 1)."""
        if self.pm.size("cp") > 1:
            tokens = zigzag_shard(tokens, 1, self.pm.local_rank("cp"), self.pm.size("cp"))
        return tokens.to(self.device)


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Validate, join the process group, build mesh, model, optimizer, data. Collective."""
    checked = validate(cfg, world_size_from_env())
    device = resolve_device(cfg.device)
    init_distributed(device, cfg.dist_timeout_s)
    pm = build_mesh(checked.shape, device.type, checked.dp_shard)
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = build_model(checked.model_config)
    flops_per_token = model_flops_per_token(model, checked.model_config, cfg.seq_len)
    options = parallel_options(cfg)
    pipeline = None
    if pm.size("pp") > 1:  # this rank's stage(s) replace the whole meta model
        model, pipeline = build_pipeline(cfg, pm, checked.model_config, device, options)
    else:
        parallelize_and_initialize(model, pm, device, cfg.seed, options)
    if cfg.init_from:
        for part in (model if pipeline else [model]):
            load_hf_weights_(part, cfg.init_from)  # each rank copies its own shards; no collective
    set_sequences_per_step(model, cfg.global_batch_size)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    vocab_size, tokenizer = checked.model_config.vocab_size, checked.tokenizer
    batches = build_batches(cfg, tokenizer, pm.local_rank("batch"), pm.size("batch"), vocab_size)
    eval_batches = build_eval_batches(cfg, tokenizer, batches, pm.local_rank("batch"), pm.size("batch"),
                                      vocab_size) if cfg.eval_every else None
    return Trainer(cfg, pm, device, checked.model_config, model, optimizer, scheduler, batches, flops_per_token,
                   pipeline=pipeline, eval_batches=eval_batches, eos_id=tokenizer.eos_id)


def parallel_options(cfg: TrainConfig) -> ParallelOptions:
    """The run's flags as ``models.parallelize`` takes them."""
    return ParallelOptions(dp_mode=cfg.dp_mode, param_dtype=DTYPE[cfg.dtype] if cfg.dtype != "float32" else None,
                           fsdp_unit_params=cfg.fsdp_unit_params, cp_method=cfg.cp_method,
                           activation_checkpoint=cfg.activation_checkpoint, compile=cfg.compile)


def model_flops_per_token(model: nn.Module, model_config, seq_len: int) -> float:
    """Training FLOPs per token of the whole (unsharded) model: see ``train.flops``."""
    embedding = sum(p.numel() for name, p in model.named_parameters() if "tok_embeddings" in name)
    non_embedding = active_parameter_count(model) - embedding  # the embedding is a lookup, not a matmul
    return transformer_flops_per_token(non_embedding, model_config.n_layers, model_config.dim, seq_len)


def model_flops_utilization(t: Trainer, tokens_per_sec: float) -> float | None:
    """Achieved FLOP/s over the peak of all devices in the mesh; None where the peak is unknown (CPU)."""
    peak = peak_flops(t.device, DTYPE[t.cfg.dtype])
    return None if peak is None else t.flops_per_token * tokens_per_sec / (peak * dist.get_world_size())


def forward_backward(t: Trainer, inputs: torch.Tensor, labels: torch.Tensor,
                     documents: Documents | None) -> torch.Tensor:
    """Run the micro-batches of one step; return this rank's share of the global mean loss.

    inputs, labels: [local_batch, local_seq] on ``t.device``; ``documents`` for their rows, or None.
    """
    tokens_in_global_batch = t.cfg.global_batch_size * t.cfg.seq_len
    loss_share = torch.zeros((), device=t.device)
    micro = t.cfg.grad_accum_steps
    micro_documents = [None] * micro if documents is None else \
        [Documents(ids, pos) for ids, pos in zip(documents.ids.chunk(micro), documents.positions.chunk(micro))]
    batches = zip(inputs.chunk(micro), labels.chunk(micro), micro_documents)
    for index, (micro_inputs, micro_labels, micro_docs) in enumerate(batches):
        if micro > 1:  # FSDP reduce-scatters only after the last micro-batch; before it, grads accumulate unsharded
            set_gradient_sync(t, index == micro - 1)
        with loss_context(t.pm.size("tp") > 1), t.compute_context():
            logits = t.model(micro_inputs, documents=micro_docs)
            loss = token_loss_sum(logits, micro_labels) / tokens_in_global_batch
            loss.backward()
        loss_share += local_tensor(loss).detach()
    return loss_share


def set_gradient_sync(t: Trainer, enabled: bool) -> None:
    """Whether FSDP reduce-scatters gradients in the next backward (no-op without FSDP)."""
    for part in t.model_parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled)


def compute_gradients(t: Trainer) -> tuple[torch.Tensor, float]:
    """Fetch the next batch, run forward/backward, sync gradients over dp.

    Returns (this rank's loss share, seconds spent waiting for data). Afterwards every
    parameter's ``.grad`` holds its shard of the gradient of the global mean loss.
    """
    start = time.perf_counter()
    inputs, labels = next(t.batches)
    documents = t.documents_of(inputs)
    inputs, labels = t.local_tokens(inputs), t.local_tokens(labels)
    data_time = time.perf_counter() - start
    if t.pipeline:
        loss = pipeline_forward_backward(t, inputs, labels, t.compute_context())
    else:
        loss = forward_backward(t, inputs, labels, documents)
    sum_step_load(t.model)  # MoE: the step's expert load over every rank's tokens
    reduce_partial_gradients(t.params)
    if t.pm.size("tp") > 1:  # MoE layers run on each tp rank's own tokens: add up their gradients
        all_reduce_gradients(token_split_parameters(t.model), t.pm["tp"].get_group())
    if t.cfg.dp_mode == "replicate":
        dense, experts = dense_and_expert_parameters(t.model)
        all_reduce_gradients(dense, t.pm["dense_grad"].get_group())
        all_reduce_gradients(experts, t.pm["expert_grad"].get_group())
    return loss, data_time


def apply_gradients(t: Trainer, loss: float | torch.Tensor) -> tuple:
    """Clip over the whole mesh, step AdamW and the LR schedule (and MoE expert biases).

    Returns (grad norm, lr used, whether the update was applied). The norm adds each
    pipeline stage's sum of squares over pp (one all-reduce), so every stage clips by the
    same global factor. A non-finite loss or norm never reaches the weights:

    - ``loss`` a float (a reported step): the norm is read on the host; a non-finite step
      raises ``TrainingDiverged`` before anything changes, or with ``--skip-nonfinite-steps``
      drops this step's update (the schedule and the data still move on);
    - ``loss`` a device tensor (a step between reports, fused AdamW only): nothing is read
      on the host; the fused kernel skips the update when told the step is not finite
      (``found_inf``, as for a gradient scaler), and the norm and "applied" come back as
      device tensors for ``train_step`` to check at the next report.
    """
    norm = clip_grad_norm_(t.params, t.cfg.max_grad_norm, t.pm["pp"].get_group())
    lr = t.scheduler.get_last_lr()[0]
    if isinstance(loss, torch.Tensor):
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        t.optimizer.found_inf = (~finite).float()
        t.optimizer.step()
        t.optimizer.found_inf = None
        grad_norm = norm
    else:
        grad_norm = norm.item()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite and not t.cfg.skip_nonfinite_steps:
            raise TrainingDiverged(t, loss, grad_norm)
        if finite:
            t.optimizer.step()
    update_expert_bias(t.model, apply=finite)
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, finite


def reports_step(t: Trainer, step: int) -> bool:
    """Whether ``step`` reads its results on the host: a logging step (every ``--log-every``),
    the last one, one that evaluates or saves, or every step when the optimizer cannot skip a
    non-finite update on the device (not fused)."""
    cfg = t.cfg
    return (step % cfg.log_every == 0 or step == cfg.steps or not t.optimizer.defaults.get("fused")
            or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
            or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0))


def global_loss(t: Trainer, loss_share: torch.Tensor, on_host: bool = True) -> float | torch.Tensor:
    """Sum the ranks' shares over dp x ep x cp: the mean token loss of the global batch
    (a float, or with ``on_host=False`` the device tensor: no host sync)."""
    dist.all_reduce(loss_share, group=t.pm["dense_grad"].get_group())
    return loss_share.item() if on_host else loss_share


def train_step(t: Trainer) -> dict:
    """One optimizer step. Returns its metrics (identical on every rank) on a reported step
    (``reports_step``), else {}: between reports nothing is read on the host, so the device
    never waits for the Python loop."""
    report = reports_step(t, t.step + 1)
    if report:
        check_dropped_steps(t)  # the steps since the last report, before this one can raise on its own
    step_start = time.perf_counter()
    loss_share, data_time = compute_gradients(t)
    moe = moe_metrics(t) if report else {}  # before apply_gradients clears the step's expert load
    loss = global_loss(t, loss_share, on_host=report)
    grad_norm, lr, applied = apply_gradients(t, loss)
    t.step += 1
    if not report:
        dropped = (~applied).int()
        t.unchecked_nonfinite = dropped if t.unchecked_nonfinite is None else t.unchecked_nonfinite + dropped
        return {}
    if not applied:
        t.skipped_steps += 1
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
        "step_time_s": step_time, "data_time_s": data_time, "mem_peak_mib": peak_memory_mib(t.device), **moe,
    }
    if t.skipped_steps:
        metrics["skipped_steps"] = t.skipped_steps
    mfu = model_flops_utilization(t, tokens_per_sec)
    if mfu is not None:
        metrics["mfu"] = mfu
    return metrics


def moe_metrics(t: Trainer) -> dict:
    """Tokens per expert over the global batch, summed over MoE layers, and the aux loss ({} for dense models)."""
    if not isinstance(t.model_config, MoEConfig):
        return {}
    return expert_load_metrics(t.model, t.model_config.n_experts, t.pm["pp"].get_group())


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: TrainConfig) -> Trainer:
    """Build, resume if asked, and run to ``cfg.steps``; every rank returns its Trainer.

    Global rank 0 writes ``metrics.jsonl``, the console line and W&B; the metrics are the
    same on every rank (the loss is reduced over the mesh), so which rank logs is arbitrary.
    """
    t = build_trainer(cfg)
    resume_from = checkpointing.resolve_resume_path(cfg)
    meta = checkpointing.restore(t, resume_from) if resume_from else {}
    t.last_report = (t.step, 0.0)  # a resumed run reports from its own first step on
    if resume_from and dist.get_rank() == 0:
        print(f"resumed from {resume_from} at step {t.step}", flush=True)
    logger = MetricsLogger(Path(cfg.output_dir), cfg.to_dict(), is_logging_rank=dist.get_rank() == 0,
                           wandb=cfg.wandb, wandb_project=cfg.wandb_project,
                           wandb_run_id=meta.get("wandb_run_id"), total_steps=cfg.steps,
                           tensorboard=cfg.tensorboard, first_step=t.step + 1)
    profiler = StepProfiler(cfg.profile_steps, cfg.memory_snapshot, Path(cfg.output_dir), dist.get_rank(), t.device)
    with logger:
        try:
            while t.step < cfg.steps:
                profiler.before_step(t.step + 1)
                metrics = train_step(t)
                profiler.after_step(t.step)
                if cfg.eval_every and (t.step % cfg.eval_every == 0 or t.step == cfg.steps):
                    metrics.update(evaluate(t, t.eval_batches))
                if metrics:
                    t.history.append(metrics)
                    logger.log(t.step, {k: v for k, v in metrics.items() if k != "step"})
                if checkpointing.should_save(t):
                    checkpointing.save(t, logger.run_id)
                if metrics:  # the next report times training only, not this one's eval, logging or save
                    t.last_report = (t.step, time.perf_counter())
        except TrainingDiverged as err:
            # Every rank raised at the same step, so the collective commit below is safe:
            # the last good checkpoint, still being written, must not be lost (and the
            # message should name it).
            t.checkpointer.wait()
            raise TrainingDiverged(t, err.loss, err.grad_norm, err.window) from None
        t.checkpointer.wait()  # an async save commits only once every rank has waited
    return t
