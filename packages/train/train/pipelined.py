"""The trainer's pipeline-parallel path: build this rank's stages, run one step's schedule.

With ``pp > 1`` a rank builds only its own stage(s) (one, or two for the interleaved and V
schedules), each cut from the whole model on the meta device, parallelized with TP/SP and
FSDP on the rank's own (dp, ep, cp, tp) submesh, then materialized and initialized by
parameter name, so its weights equal the single-process model's layers.

One step on one rank:

    inputs, labels = this batch-rank's rows of the global batch       [B/(dp*ep), S]
    schedule.step: cut into m microbatches [B/(dp*ep)/m, S], stream them through the stages
        first stage: embedding + its layers; middle: layers; last: layers + norm + output + loss
        loss per microbatch = token loss sum / tokens in the GLOBAL batch   (scale_grads=False)
    loss share = sum of the last stage's microbatch losses, broadcast over pp from that stage
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from core.mesh import ParallelMesh
from core.pipeline import (
    SCHEDULES,
    StageIO,
    broadcast_from_last_stage,
    build_schedule,
    build_stages,
    default_microbatches,
    layers_per_stage,
    stages_of_rank,
)
from core.tensor_parallel import loss_context, local_tensor, token_loss_sum
from models.parallelize import ParallelOptions, parallelize_and_initialize, uses_fsdp
from models.moe import active_parameter_count
from models.pipeline_split import split_stage
from models.registry import build_model


class ModelParts(nn.ModuleList):
    """This rank's pipeline stages, in stage order (what ``Trainer.model`` holds under pp > 1)."""

    @staticmethod
    def whole_model_name(name: str) -> str:
        """Drop the list index ModuleList puts in front: ``1.layers.5.w`` -> ``layers.5.w``,
        ``optim.1.layers.5.w.exp_avg`` -> ``optim.layers.5.w.exp_avg`` (its first numeric part)."""
        parts = name.split(".")
        index = next(i for i, part in enumerate(parts) if part.isdigit())
        return ".".join(parts[:index] + parts[index + 1:])


@dataclass
class Pipeline:
    schedule_name: str
    schedule: object          # a torch.distributed.pipelining schedule
    stages: list              # this rank's PipelineStage objects
    stage_ids: list[int]
    n_stages: int
    microbatches: int

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids


def build_stage_module(model_config, layer_ids: list[int], first: bool, last: bool, pm: ParallelMesh,
                       device: torch.device, options: ParallelOptions, seed: int) -> nn.Module:
    """One stage: cut on the meta device, parallelized on this rank's submesh, initialized by name.

    FSDP keeps parameters gathered after the forward (``reshard_after_forward=False``):
    with m microbatches a resharding stage would all-gather its weights again for every
    microbatch's forward and backward; torch's pipeline stage reshards once after the
    last backward instead.
    """
    with torch.device("meta"):
        model = split_stage(build_model(model_config), layer_ids, first, last)
    parallelize_and_initialize(model, pm, device, seed, dataclasses.replace(options, reshard_after_forward=False))
    return model


def compute_per_token(model_config, seq_len: int) -> tuple[list[float], float]:
    """Forward FLOPs per token of each layer, and of the last stage's head (final norm,
    output projection; the loss is a few element-wise ops per logit, left out). The
    embedding is a lookup: no FLOPs. What ``layers_per_stage`` balances the stages by.

    A layer: 2 FLOPs per active weight (MoE: the experts a token is routed to) plus causal
    attention, 2 * seq_len * width (QK^T and PV over half the s x s scores, on average).
    """
    with torch.device("meta"):
        model = build_model(model_config)
    attention = 2.0 * seq_len * model_config.n_heads * model_config.head_dim
    layers = [2.0 * active_parameter_count(layer) + attention for layer in model.layers.values()]
    return layers, 2.0 * (active_parameter_count(model.norm) + active_parameter_count(model.output))


def build_pipeline(cfg, pm: ParallelMesh, model_config, device: torch.device,
                   options: ParallelOptions) -> tuple[ModelParts, Pipeline]:
    """This rank's stage modules and the schedule that drives them. Collective (process groups, FSDP)."""
    pp = pm.size("pp")
    stage_ids = stages_of_rank(pm.local_rank("pp"), pp, cfg.pp_schedule)
    n_stages = pp * SCHEDULES[cfg.pp_schedule].stages_per_rank
    layer_costs, head_cost = compute_per_token(model_config, cfg.seq_len)
    layer_split = layers_per_stage(layer_costs, n_stages, last_cost=head_cost)
    parts = ModelParts(
        build_stage_module(model_config, layer_split[s], s == 0, s == n_stages - 1, pm, device, options, cfg.seed)
        for s in stage_ids)
    microbatches = default_microbatches(pp, cfg.microbatches)
    io = stage_io(cfg, pm, model_config, microbatches, options.param_dtype)
    stages = build_stages(list(parts), stage_ids, n_stages, device, pm["pp"].get_group(), io)
    tokens_in_global_batch = cfg.global_batch_size * cfg.seq_len

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The same normalization as the non-pipeline path: summed over microbatches, stages
        # and data-parallel ranks, the gradients are those of the global mean token loss.
        return token_loss_sum(logits, labels) / tokens_in_global_batch

    schedule = build_schedule(cfg.pp_schedule, stages, microbatches, loss_fn)
    return parts, Pipeline(cfg.pp_schedule, schedule, stages, stage_ids, n_stages, microbatches)


def stage_io(cfg, pm: ParallelMesh, model_config, microbatches: int, param_dtype) -> StageIO:
    """The tensors at this run's stage boundaries, per microbatch and local to this rank.

    rows = global_batch / (dp*ep) / microbatches; seq = seq_len / cp
      first stage in:  token ids   [rows, seq]               int64
      between stages:  hidden      [rows, seq/tp, dim]       (sequence parallel: a slice per tp rank)
      last stage out:  logits      [rows, seq, vocab/tp]     (the local shard loss_parallel reads)
    Between stages the dtype is FSDP's compute dtype where FSDP casts the parameters;
    under autocast (or float32) the residual stream stays float32.
    """
    rows = cfg.global_batch_size // (pm.size("dp") * pm.size("ep")) // microbatches
    seq, tp = cfg.seq_len // pm.size("cp"), pm.size("tp")
    compute_dtype = param_dtype or torch.float32
    hidden_dtype = compute_dtype if uses_fsdp(pm, cfg.dp_mode) else torch.float32
    with torch.device("meta"):
        return StageIO(
            first_input=torch.empty(rows, seq, dtype=torch.int64),
            activation=torch.empty(rows, seq // tp, model_config.dim, dtype=hidden_dtype, requires_grad=True),
            last_output=torch.empty(rows, seq, model_config.vocab_size // tp, dtype=compute_dtype, requires_grad=True))


def pipeline_forward_backward(t, inputs: torch.Tensor, labels: torch.Tensor,
                              compute_context: contextlib.AbstractContextManager) -> torch.Tensor:
    """Run one step's schedule; return this rank's share of the global mean loss (on every stage).

    inputs, labels: [local_batch, local_seq]. Only the rank running the first stage feeds
    ``inputs``, only the one running the last stage feeds ``labels``. ``compute_context``
    wraps the schedule too (bf16 autocast for stages FSDP does not cast, else a no-op).
    Collectives: the schedule's P2P over pp (plus TP/FSDP inside the stages); one broadcast
    over pp for the loss.
    """
    pipe: Pipeline = t.pipeline
    losses: list[torch.Tensor] = []
    args = (inputs.contiguous(),) if pipe.has_first else ()  # dense, as the static stage metadata says
    target = labels if pipe.has_last else None
    # loss_parallel must cover the last stage's loss forward and backward, which the
    # schedule interleaves with other microbatches: wrap the whole step.
    with loss_context(t.pm.size("tp") > 1), compute_context:
        pipe.schedule.step(*args, target=target, losses=losses, return_outputs=False)
    loss_share = torch.zeros((), device=t.device)
    for loss in losses:
        loss_share += local_tensor(loss).detach()
    return broadcast_from_last_stage(loss_share, t.pm["pp"].get_group(), t.pm.size("pp"), pipe.schedule_name)
