"""The MoE layers' step state on a mesh: load statistics over the whole step and the expert bias.

An MoE layer's training forward reports its tokens per expert and its aux loss share to
its ``balancing`` object (``models.moe.layer.LoadBalancing``). On a mesh the parallel model
gives every layer one ``StepLoad``, which:

  - sums each sequence's expert counts over the ranks holding its parts (cp x tp), so the
    sequence-wise aux loss sees whole sequences;
  - makes the aux loss the mean over the *global* batch's sequences (every micro-batch,
    rank and stage adds its sequences' terms; their gradients sum to the exact one);
  - keeps the step's load per layer, sums it over every rank holding different tokens
    once per step (``sum_over_ranks``), and with it moves the expert biases
    (``update_expert_bias``) and reports the metrics.

The layers themselves keep no process group and no step state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .layer import LoadBalancing, MoE


class StepLoad(LoadBalancing):
    """The step's expert load of ``layers`` (this rank's MoE layers, in module order; a pipeline
    stage may have none) of a model with ``n_experts`` experts per layer.

    ``sequence_group``: the ranks holding other parts of this rank's sequences (cp x tp), or None.
    ``token_group``: every rank routing different tokens (dp x ep x cp x tp), or None.
    ``sequences_per_step``: the global batch size.
    """

    def __init__(self, layers: list[MoE], n_experts: int, sequence_group: dist.ProcessGroup | None,
                 token_group: dist.ProcessGroup | None, sequences_per_step: int, device: torch.device):
        self.layers = layers
        self.sequence_group, self.token_group = sequence_group, token_group
        self.sequences_per_step = sequences_per_step
        self._row = {id(layer): row for row, layer in enumerate(layers)}
        # Per layer: tokens per expert [E] and the aux loss [1], float64 so that counts stay exact.
        self.totals = torch.zeros(len(layers), n_experts + 1, dtype=torch.float64, device=device)
        for layer in layers:
            layer.balancing = self

    def whole_sequence_counts(self, counts: Tensor) -> Tensor:
        """Collective: an all-reduce of the [b, E] counts over ``sequence_group`` (cp x tp > 1)."""
        if self.sequence_group is not None:
            dist.all_reduce(counts, group=self.sequence_group)
        return counts

    def sequences_in_loss(self, forward_sequences: int) -> int:
        return self.sequences_per_step

    # Kept out of torch.compile's graph: bookkeeping on the host's per-layer index, which
    # compiled code would specialize on (one recompile per layer).
    @torch.compiler.disable
    @torch.no_grad()
    def record(self, layer: MoE, load: Tensor, aux_share: Tensor) -> None:
        row = self.totals[self._row[id(layer)]]
        row[:-1] += load.double()
        row[-1] += aux_share.double()

    def clear(self) -> None:
        """Start a new step's count (the previous one's stays readable until then)."""
        self.totals.zero_()

    @torch.no_grad()
    def sum_over_ranks(self) -> None:
        """After a step's forwards: make every layer's load and aux loss global.

        Collective: one all-reduce of [layers, E + 1] float64 over ``token_group``, once per
        step rather than once per layer and micro-batch. Every rank of the group must call it.
        """
        if self.token_group is not None and self.layers:  # the group is within one pipeline stage
            dist.all_reduce(self.totals, group=self.token_group)

    @torch.no_grad()
    def update_expert_bias(self, applied: bool | Tensor = True) -> None:
        """After an optimizer step: nudge each expert's bias toward balance.

        bias_e += rate * sign(mean load - load_e) (DeepSeek-V3): overloaded experts get chosen
        less. The load is already global (``sum_over_ranks``), so every rank makes the same
        update and the biases never diverge. ``applied=False`` (a skipped update; a bool, or a
        device tensor so that nothing is read on the host) moves nothing. No communication.
        """
        for layer, row in zip(self.layers, self.totals):
            rate = layer.cfg.bias_update_rate
            if rate > 0:  # a step with no load moves nothing: sign(0) = 0
                load = row[:-1]
                step = rate * torch.sign(load.mean() - load) * applied
                layer.router.expert_bias += step.to(layer.router.expert_bias.dtype)

    def metrics(self, stage_group: dist.ProcessGroup | None) -> dict:
        """This step's global load summed over all MoE layers (after ``sum_over_ranks``).

        Returns ``moe_tokens_per_expert`` (list of E routed pairs), ``moe_load_max_over_mean``
        (1.0 = perfectly balanced) and ``moe_aux_loss`` (summed over layers). Collective: one
        all-reduce over ``stage_group`` (pipeline stages hold different layers); every rank of
        the group must call it.
        """
        totals = self.totals.sum(0)  # [E + 1]; zeros on a stage without MoE layers
        if stage_group is not None:
            dist.all_reduce(totals, group=stage_group)
        load = totals[:-1]
        balance = (load.max() / load.mean()).item() if load.sum() > 0 else 1.0
        return {"moe_tokens_per_expert": [int(c) for c in load.tolist()], "moe_load_max_over_mean": balance,
                "moe_aux_loss": totals[-1].item()}
