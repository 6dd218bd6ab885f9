"""Pipeline parallel: this rank's stages and the schedule that drives them, as a ``ParallelModel``.

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

The gradient reductions, clipping and MoE bookkeeping after it are ``ParallelModel``'s,
the same as without a pipeline (the norm adds the stages' sums of squares over pp).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from core.documents import Documents
from core.grad_norm import clip_grad_norm_
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
from core.tensor_parallel import local_tensor

from .init import init_parameter_
from .moe.load import StepLoad
from .parallel_model import GradientRules, ParallelModel, StepRecipe
from .parallelize import ParallelOptions, gradient_rules, shard_and_initialize, step_load
from .registry import build_model, family_of
from .stats import ModelStats
from .tied_output import EMBEDDING, TiedOutput, tied_output


class ModelParts(nn.ModuleList):
    """This rank's pipeline stages, in stage order (``PipelinedModel.module``)."""

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
                       device: torch.device, options: ParallelOptions, seed: int | None) -> nn.Module:
    """One stage: cut on the meta device, parallelized on this rank's submesh, initialized by name.

    FSDP keeps parameters gathered after the forward (``reshard_after_forward=False``):
    with m microbatches a resharding stage would all-gather its weights again for every
    microbatch's forward and backward; torch's pipeline stage reshards once after the
    last backward instead.
    """
    with torch.device("meta"):
        model = family_of(model_config).split_stage(build_model(model_config), layer_ids, first, last)
    shard_and_initialize(model, pm, device, seed, dataclasses.replace(options, reshard_after_forward=False))
    if model_config.tie_embeddings and last and not first and seed is not None:
        init_parameter_(model.output.weight, EMBEDDING, model_config.n_layers, seed)  # a replica (models.tied_output)
    return model


def build_pipelined_model(model_config, pm: ParallelMesh, device: torch.device, options: ParallelOptions,
                          recipe: StepRecipe, seed: int | None) -> PipelinedModel:
    """This rank's stage modules and the schedule that drives them. Collective (process groups, FSDP)."""
    pp = pm.size("pp")
    stage_ids = stages_of_rank(pm.local_rank("pp"), pp, options.pp_schedule)
    n_stages = pp * SCHEDULES[options.pp_schedule].stages_per_rank
    stats = ModelStats.of(model_config)  # stages are cut by compute (FLOPs per token), not layer count
    layer_split = layers_per_stage(stats.layer_costs(recipe.seq_len), n_stages, last_cost=stats.head_cost)
    parts = ModelParts(
        build_stage_module(model_config, layer_split[s], s == 0, s == n_stages - 1, pm, device, options, seed)
        for s in stage_ids)
    microbatches = default_microbatches(pp, options.microbatches)
    io = stage_io(recipe, options, pm, model_config, microbatches)
    stages = build_stages(list(parts), stage_ids, n_stages, device, pm["pp"].get_group(), io)
    schedule = build_schedule(options.pp_schedule, stages, microbatches, recipe.step_loss)
    pipeline = Pipeline(options.pp_schedule, schedule, stages, stage_ids, n_stages, microbatches)
    return PipelinedModel(parts, pipeline, pm, device, recipe, gradient_rules(parts, model_config, pm),
                          step_load(parts, model_config, pm, recipe, device),
                          tied_output(list(parts), pm, options.pp_schedule))


def stage_io(recipe: StepRecipe, options: ParallelOptions, pm: ParallelMesh, model_config,
             microbatches: int) -> StageIO:
    """The tensors at this run's stage boundaries, per microbatch and local to this rank.

    rows = global_batch / (dp*ep) / microbatches; seq = seq_len / cp
      first stage in:  token ids   [rows, seq]               int64
      between stages:  hidden      [rows, seq/tp, dim]       (sequence parallel: a slice per tp rank)
      last stage out:  logits      [rows, seq, vocab/tp]     (the local shard loss_parallel reads)
    Activations and logits are in the compute dtype (the parameters are cast to it, see
    ``models.parallelize``).
    """
    rows = recipe.global_batch_size // pm.size("batch") // microbatches
    seq, tp = recipe.seq_len // pm.size("cp"), pm.size("tp")
    compute_dtype = options.param_dtype or torch.float32
    with torch.device("meta"):
        return StageIO(
            first_input=torch.empty(rows, seq, dtype=torch.int64),
            activation=torch.empty(rows, seq // tp, model_config.dim, dtype=compute_dtype, requires_grad=True),
            last_output=torch.empty(rows, seq, model_config.vocab_size // tp, dtype=compute_dtype, requires_grad=True))


class PipelinedModel(ParallelModel):
    """This rank's pipeline stage(s) (``parts``, in stage order) and the schedule over them (``pipeline``)."""

    def __init__(self, parts: ModelParts, pipeline: Pipeline, pm: ParallelMesh, device: torch.device,
                 recipe: StepRecipe, rules: GradientRules, moe_load: StepLoad | None, tied: TiedOutput | None):
        super().__init__(parts, list(parts), pm, device, recipe, rules, moe_load)
        self.pipeline, self.tied = pipeline, tied

    @property
    def stage_ids(self) -> list[int]:
        return list(self.pipeline.stage_ids)

    def materialize(self, device: torch.device) -> None:
        super().materialize(device)
        for stage in self.pipeline.stages:
            stage.device = device  # where the schedule allocates its receive buffers

    def declare_static_shapes(self) -> None:
        """Skip the schedule's first-step vote on static shapes and set its answer, STATIC.

        On its first step a ``torch.distributed.pipelining`` schedule has its ranks vote, by P2P,
        on whether every stage was given static shapes, and reads the result on the host
        (``.item()``). Ours always are (``core.pipeline.StageIO``), so the answer is known. This
        sets torch's private stage mode (``_inference_mode``) in place of its ``_warmup_p2p``: the
        one place Meshtron touches pipelining internals, checked by the dry-run tests. No collective.
        """
        from torch.distributed.pipelining._utils import InferenceMode

        def static_mode(stages, has_backward, p2p_done):
            for stage in stages:
                stage._inference_mode = InferenceMode.STATIC

        self.pipeline.schedule._warmup_p2p = static_mode

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run one step's schedule; return this rank's share of the global mean loss (on every stage).

        Only the rank running the first stage feeds ``inputs``, only the one running the last
        stage feeds ``labels``. Collectives: the schedule's P2P over pp (plus TP/FSDP inside
        the stages); one broadcast over pp for the loss.
        """
        self._begin_step()
        inputs, labels, _ = self.local_batch(inputs, labels)  # validation refuses document masking with pp
        pipe, losses = self.pipeline, []
        args = (inputs.contiguous(),) if pipe.has_first else ()  # dense, as the static stage metadata says
        target = labels if pipe.has_last else None
        # loss_parallel must cover the last stage's loss forward and backward, which the
        # schedule interleaves with other microbatches: wrap the whole step.
        with self.loss_context():
            pipe.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        loss_share = torch.zeros((), device=self.device)
        for loss in losses:
            loss_share += local_tensor(loss).detach()
        return self._share_over_stages(loss_share)

    def _eval_loss_share(self, inputs: torch.Tensor, labels: torch.Tensor,
                         documents: Documents | None) -> torch.Tensor:
        pipe, losses = self.pipeline, []
        args = (inputs.contiguous(),) if pipe.has_first else ()
        pipe.schedule.eval(*args, target=labels if pipe.has_last else None, losses=losses)
        return sum((local_tensor(loss).float() for loss in losses), torch.zeros((), device=self.device))

    def _share_over_stages(self, loss_share: torch.Tensor) -> torch.Tensor:
        """Collective: one broadcast over pp from the rank running the last stage."""
        pp = self.mesh.size("pp")
        return broadcast_from_last_stage(loss_share, self._stage_group, pp, self.pipeline.schedule_name)

    def finish_gradients(self) -> None:
        """``ParallelModel.finish_gradients``, then a tied output's two ends summed (``models.tied_output``)."""
        super().finish_gradients()
        if self.tied is not None:
            self.tied.sum_gradients()

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """``ParallelModel.clip_gradients``, counting a tied output's replica once (on the first stage)."""
        replica = self.tied.replica if self.tied is not None else None
        counted = [p for p in self.trainable if p is not replica]
        return clip_grad_norm_(counted, max_norm, self._stage_group, replicas=[replica] if replica is not None else [])

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in super().named_parameters():
            yield self._whole_name(name), param

    def whole_model_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._whole_name(ModelParts.whole_model_name(name)): value for name, value in tensors.items()}

    def _whole_name(self, name: str) -> str:
        return self.tied.whole_model_name(name) if self.tied is not None else name
