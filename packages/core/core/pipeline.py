"""Pipeline parallel with ``torch.distributed.pipelining``: which layers a stage holds, which
stages a rank runs, the schedule by name, and the checks that must pass before any collective.

Model-agnostic: a stage is any ``nn.Module`` the caller cut from its model. Vocabulary:

  - ``pp`` ranks form one pipeline (the ``pp`` mesh axis); ``v`` virtual stages per rank make
    ``S = pp * v`` stages in all. Stage ``s`` holds a contiguous run of layers; stage 0 also
    holds the embedding, stage ``S-1`` the final norm and output.
  - Looped schedules (1F1B, GPipe: v=1; interleaved 1F1B: v=2) put stage ``s`` on rank
    ``s % pp``; the V schedule (ZBV) puts stages ``r`` and ``2*pp-1-r`` on rank ``r``, so the
    first and last stage share rank 0.
  - A step's per-rank batch is cut into ``m`` microbatches along dim 0. The schedule streams
    them through the stages: activations go forward and their gradients backward by P2P
    send/recv over the ``pp`` group, one [b/m, s(/tp), dim] tensor per microbatch per hop.

Our loss is already divided by the tokens of the *global* batch and gradients are summed,
so the schedules are built with ``scale_grads=False`` (their default would divide by ``m``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# torch.distributed.pipelining is imported only where a pipeline is built: importing it
# pulls in torch._dynamo, slow to import, which runs without pp never need.
PIPELINING = "torch.distributed.pipelining"


@dataclass(frozen=True)
class ScheduleSpec:
    class_name: str        # in torch.distributed.pipelining
    stages_per_rank: int   # virtual stages v
    style: str             # "loop" or "v": how stages map to ranks
    needs_m_ge_pp: bool    # 1F1B-style warmup needs at least one microbatch in flight per stage


SCHEDULES: dict[str, ScheduleSpec] = {
    "1f1b": ScheduleSpec("Schedule1F1B", 1, "loop", True),
    "gpipe": ScheduleSpec("ScheduleGPipe", 1, "loop", False),
    "interleaved-1f1b": ScheduleSpec("ScheduleInterleaved1F1B", 2, "loop", True),
    "zbv": ScheduleSpec("ScheduleZBVZeroBubble", 2, "v", False),
}


class PipelineConfigError(ValueError):
    """The model, batch or schedule cannot be pipelined as asked. The message says how to fix it."""


def schedule_spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise PipelineConfigError(f"unknown --pp-schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def default_microbatches(pp: int, requested: int) -> int:
    """``--microbatches 0`` means 2 * pp: enough to fill a 1F1B pipeline and halve its bubble."""
    return requested if requested > 0 else 2 * pp


def check_pipeline(n_layers: int, pp: int, schedule: str, microbatches: int, local_batch: int) -> None:
    """Raise ``PipelineConfigError`` unless the run can be pipelined. No collective; pp > 1 only.

    ``local_batch``: sequences per data-parallel rank per step, which the schedule cuts into
    ``microbatches`` equal pieces.
    """
    spec = schedule_spec(schedule)
    n_stages = pp * spec.stages_per_rank
    if n_layers < n_stages:
        raise PipelineConfigError(
            f"model has {n_layers} layers but pp={pp} x {spec.stages_per_rank} virtual stage(s) per rank "
            f"({schedule}) = {n_stages} stages need at least one layer each: lower pp, use a schedule with "
            f"fewer stages per rank, or a deeper model")
    if microbatches < 1:
        raise PipelineConfigError(f"--microbatches {microbatches} must be >= 1 (0 means 2*pp)")
    if spec.needs_m_ge_pp and microbatches < pp:
        raise PipelineConfigError(
            f"--pp-schedule {schedule} needs at least pp={pp} microbatches (got --microbatches {microbatches}) "
            f"so that every stage has work in its warm-up: use --microbatches >= {pp}")
    if local_batch % microbatches:
        raise PipelineConfigError(
            f"the per-rank batch of {local_batch} sequences is not divisible into --microbatches {microbatches}: "
            f"make global_batch_size / (dp*ep) a multiple of the microbatch count")
    if schedule == "interleaved-1f1b":
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise PipelineConfigError(
                f"interleaved 1F1B runs microbatches in rounds of pp={pp}: --microbatches {microbatches} must be "
                f"a multiple of {rounds} (e.g. a multiple of pp)")


def layers_per_stage(layer_costs: list[float], n_stages: int, last_cost: float = 0.0) -> list[list[int]]:
    """Contiguous layer indices per stage (at least one layer each) that make the slowest
    stage as fast as possible, and the stages as even as possible.

    ``layer_costs``: each layer's compute (any unit); ``last_cost``: what the last stage
    runs besides its layers (final norm, output projection, loss; the first stage's
    embedding is a lookup and costs next to nothing). A pipeline's steady state moves at
    the pace of its slowest stage and every other stage waits out the difference for every
    microbatch: on Llama 3 8B the output projection costs about two layers, so an even
    split of 32 layers over 4 stages makes the last one ~25% slower than the rest. Among
    the splits with the smallest maximum, the most even one (least sum of squared stage
    costs) is taken; on a tie, later stages take the extra layer: in 1F1B an earlier stage
    holds more microbatches' activations at once.

    >>> layers_per_stage([1.0] * 5, 2)
    [[0, 1], [2, 3, 4]]
    >>> layers_per_stage([1.0] * 8, 2, last_cost=2.0)
    [[0, 1, 2, 3, 4], [5, 6, 7]]
    """
    n = len(layer_costs)
    prefix = [0.0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)

    def stage_cost(start: int, end: int) -> float:  # layers [start, end) as one stage
        return prefix[end] - prefix[start] + (last_cost if end == n else 0.0)

    return _most_even_split(n, n_stages, stage_cost, _least_slowest_stage(n, n_stages, stage_cost))


def _split_ends(n: int, n_stages: int, stage: int) -> range:
    """Where ``stage`` may end (exclusive layer index): after one layer per earlier stage,
    leaving one per later stage."""
    return range(stage + 1, n - (n_stages - 1 - stage) + 1)


def _least_slowest_stage(n: int, n_stages: int, stage_cost) -> float:
    """The smallest possible cost of the slowest stage, by dynamic programming over where
    each stage ends: slowest[j] = the best slowest stage for layers [0, j) so far."""
    slowest = {0: 0.0}
    for stage in range(n_stages):
        slowest = {end: min(max(before, stage_cost(start, end)) for start, before in slowest.items() if start < end)
                   for end in _split_ends(n, n_stages, stage)}
    return slowest[n]


def _most_even_split(n: int, n_stages: int, stage_cost, bound: float) -> list[list[int]]:
    """The split with every stage costing at most ``bound`` and the least sum of squared
    stage costs (dynamic programming as above; ``bound`` is reachable by construction)."""
    best: dict[int, tuple[float, list[list[int]]]] = {0: (0.0, [])}
    for stage in range(n_stages):
        reachable = {}
        for end in _split_ends(n, n_stages, stage):
            options = [(squares + stage_cost(start, end) ** 2, split + [list(range(start, end))])
                       for start, (squares, split) in best.items() if start < end and stage_cost(start, end) <= bound]
            if options:
                reachable[end] = min(options, key=lambda option: option[0])
        best = reachable
    return best[n][1]


def stages_of_rank(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stage indices rank ``pp_rank`` runs, in pipeline order (what the schedules expect)."""
    spec = schedule_spec(schedule)
    if spec.style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(spec.stages_per_rank)]


@dataclass(frozen=True)
class StageIO:
    """What one microbatch looks like at the stage boundaries: meta-device example tensors
    (shape, dtype, requires_grad; no storage).

    Handing these to ``PipelineStage`` makes its metadata static. Without them torch infers
    it on the first ``step`` by pushing one extra microbatch forward and backward through
    every stage, on real data at the first stage and on uninitialized memory after it; a
    model whose forward has side effects (MoE load statistics, which move the expert bias)
    would take that pass for training.
    """
    first_input: torch.Tensor    # the first stage's input, e.g. token ids [b/m, s] int64
    activation: torch.Tensor     # what passes between stages, e.g. hidden [b/m, s, dim]
    last_output: torch.Tensor    # the last stage's output, the loss function's input

    def inputs_and_outputs(self, stage: int, n_stages: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = stage == 0, stage == n_stages - 1
        return (self.first_input if first else self.activation), (self.last_output if last else self.activation)


def build_stages(parts: list[nn.Module], stage_ids: list[int], n_stages: int, device: torch.device,
                 pp_group: dist.ProcessGroup, io: StageIO) -> list[PipelineStage]:
    """Wrap each of this rank's model parts as a ``PipelineStage`` talking over ``pp_group``.

    ``io`` gives every stage its input and output metadata up front (see ``StageIO``), so
    receive buffers are allocated at once and no shape-inference pass runs.
    """
    pipeline_stage = importlib.import_module(PIPELINING).PipelineStage
    stages = []
    for part, s in zip(parts, stage_ids):
        inputs, outputs = io.inputs_and_outputs(s, n_stages)
        stages.append(pipeline_stage(part, stage_index=s, num_stages=n_stages, device=device, group=pp_group,
                                    input_args=inputs, output_args=outputs))
    return stages


def build_schedule(schedule: str, stages: list[PipelineStage], microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The named schedule over this rank's stages. ``loss_fn(output, target)`` runs on the last stage."""
    spec = schedule_spec(schedule)
    schedule_class = getattr(importlib.import_module(PIPELINING), spec.class_name)
    if spec.stages_per_rank == 1:
        return schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def rank_of_stage(stage: int, pp: int, schedule: str) -> int:
    """The pp-group rank that runs ``stage``."""
    for r in range(pp):
        if stage in stages_of_rank(r, pp, schedule):
            return r
    raise ValueError(f"stage {stage} is not run by any of the {pp} ranks")


def last_stage_rank(pp: int, schedule: str) -> int:
    """The pp-group rank that runs the last stage and so computes the loss (pp-1 looped, 0 for V)."""
    return rank_of_stage(pp * schedule_spec(schedule).stages_per_rank - 1, pp, schedule)


def broadcast_from_last_stage(value: torch.Tensor, pp_group: dist.ProcessGroup, pp: int, schedule: str) -> torch.Tensor:
    """Overwrite ``value`` in place on every stage with the last stage's value (e.g. the loss).

    Collective: one broadcast over ``pp_group`` (none when pp == 1).
    """
    if pp > 1:
        src = dist.get_global_rank(pp_group, last_stage_rank(pp, schedule))
        dist.broadcast(value, src=src, group=pp_group)
    return value
