"""One rank's share of a model on a mesh, and everything a training step needs from its layout.

``models.distribute.distribute_model`` builds one of two implementations of ``ParallelModel``:

  - ``SingleStageModel``: the whole model on this rank as one stage (no pipeline), sharded by
    TP/SP, FSDP, EP and CP; a step runs its micro-batches one after another;
  - ``models.pipelined.PipelinedModel``: this rank's pipeline stage(s), each sharded the
    same way; a step runs a ``torch.distributed.pipelining`` schedule.

The trainer's step is then the same on every mesh::

    loss_share = model.forward_backward(inputs, labels)  # this batch rank's rows, [b, S]
    model.finish_gradients()                              # every reduction the layout implies
    loss = model.reduce_loss(loss_share)                  # the global batch's mean token loss
    norm = model.clip_gradients(max_norm)                 # over the whole mesh
    optimizer.step()
    model.after_optimizer_step(applied)                   # MoE expert bias
    model.metrics()                                       # MoE load, at a report

Everything that depends on the mesh (which ranks sum which gradients, the context-parallel
slice of a sequence, the loss-parallel context, the MoE load's groups) lives here, built
once; models stay plain single-device modules.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from core.data_parallel import all_reduce_gradients
from core.documents import Documents, document_ids, document_positions
from core.grad_norm import clip_grad_norm_
from core.mesh import ParallelMesh
from core.tensor_parallel import local_tensor, loss_context, reduce_partial_gradients, token_loss_sum
from core.zigzag import zigzag_shard

from .moe.load import StepLoad


@dataclass(frozen=True)
class StepRecipe:
    """What one optimizer step computes, fixed for the run.

    ``global_batch_size`` sequences of ``seq_len`` tokens over the whole mesh, in
    ``grad_accum_steps`` micro-batches (pipeline schedules cut their own microbatches);
    ``document_eos``: with document masking, the token id that ends a document (None: off);
    ``compute_dtype``: what the forward and backward run in; parameters, optimizer state and
    gradient reductions stay float32 (FSDP's or ``replicate``'s mixed precision casts them).
    """

    global_batch_size: int
    seq_len: int
    grad_accum_steps: int = 1
    document_eos: int | None = None
    compute_dtype: torch.dtype = torch.float32

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def step_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A (micro-)batch's token-loss sum over the tokens of the whole step: summed over
        micro-batches, stages and ranks, the gradients are those of the global mean token loss."""
        return token_loss_sum(logits, labels) / self.tokens_per_step


@dataclass(frozen=True)
class GradientRules:
    """The gradient reductions a layout needs beyond what FSDP/``replicate`` and DTensor do themselves.

    ``tp_partial``: plain parameters each tp rank applies to its own part of the work (MoE layers
    to its tokens under sequence parallel, q/k norms to its heads): their gradients are summed over
    ``tp_group`` (None: tp = 1).
    """

    tp_partial: list[nn.Parameter]
    tp_group: dist.ProcessGroup | None = None


class ParallelModel(ABC):
    """This rank's part of the model (``parts``, held by ``module``) and the step rules of its layout.

    ``module``: the nn.Module the optimizer and checkpoints see; ``parts``: the modules a
    step runs (the whole model, or this rank's pipeline stages in stage order).
    """

    def __init__(self, module: nn.Module, parts: list[nn.Module], pm: ParallelMesh, device: torch.device,
                 recipe: StepRecipe, rules: GradientRules, moe_load: StepLoad | None):
        self.module, self.parts, self.mesh, self.device = module, parts, pm, device
        self.recipe, self.rules, self.moe_load = recipe, rules, moe_load
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self._cp_rank, self._cp = pm.local_rank("cp"), pm.size("cp")
        self._tensor_parallel = pm.size("tp") > 1
        self._loss_group = pm["dense_grad"].get_group()
        self._stage_group = pm["pp"].get_group() if pm.size("pp") > 1 else None
        # Ranks reading different rows of each global batch: dp x ep (ep is data parallel for dense layers).
        self.batch_shard: tuple[int, int] = (pm.local_rank("batch"), pm.size("batch"))

    @property
    def stage_ids(self) -> list[int]:
        """The pipeline stages this rank runs (two per rank with interleaved schedules); [0] without pp."""
        return [0]

    def materialize(self, device: torch.device) -> None:
        """Allocate a meta-device model's shards on ``device`` (values: ``models.init``, or none for a
        dry run's fake tensors) and make it where the step puts batches and buffers. No communication."""
        for part in self.parts:
            part.to_empty(device=device)
        self.device = device

    def declare_static_shapes(self) -> None:
        """Tell the layout every step's tensors have the shapes it was built for (nothing to agree on
        at the first step). Only a pipeline asks (``PipelinedModel``); a dry run on fake tensors,
        which cannot answer such a question, declares it."""
        return None  # without a pipeline there is nothing to agree on

    # --- the step ----------------------------------------------------------------------------

    @abstractmethod
    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run one step's forwards and backwards on this batch rank's rows ``[b, S]`` (whole
        sequences, on any device); return this rank's share of the global mean token loss
        (a device scalar). Afterwards each ``.grad`` holds this rank's part of the gradient,
        before ``finish_gradients``."""

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """Every gradient reduction the layout implies that autograd and FSDP leave undone, so that
        each parameter's ``.grad`` is its part of the gradient of the global mean loss.

        Collectives: the MoE load's all-reduce over the token ranks; one all-reduce per
        layout of ``Partial`` (sequence-parallel norm) gradients; an all-reduce over tp of
        the tp-partial parameters. (Data-parallel sums happen in FSDP's or ``replicate``'s
        backward hooks.)
        """
        if self.moe_load is not None:
            self.moe_load.sum_over_ranks()
        reduce_partial_gradients(self.trainable)
        if self.rules.tp_group is not None:
            all_reduce_gradients(self.rules.tp_partial, self.rules.tp_group)

    def reduce_loss(self, loss_share: torch.Tensor, on_host: bool = True) -> float | torch.Tensor:
        """Sum the ranks' shares over dp x ep x cp: the mean token loss of the global batch (a
        float, or with ``on_host=False`` the device tensor: no host sync). Collective: one all-reduce."""
        dist.all_reduce(loss_share, group=self._loss_group)
        return loss_share.item() if on_host else loss_share

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their norm over the whole mesh is at most ``max_norm``
        (0: no clipping); return the norm before (a device scalar, the same on every rank).

        Collectives: one all-reduce per gradient layout, then one over the pipeline stages.
        """
        return clip_grad_norm_(self.trainable, max_norm, self._stage_group)

    def after_optimizer_step(self, applied: bool | torch.Tensor) -> None:
        """What follows an optimizer step: MoE expert biases move by the step's load (not when the
        update was dropped: ``applied`` False, or a device tensor saying so). No communication."""
        if self.moe_load is not None:
            self.moe_load.update_expert_bias(applied)

    def metrics(self) -> dict:
        """The layout's own metrics of the last step ({} for a dense model). Collective for MoE:
        one all-reduce over the pipeline stages; every rank must call it at the same step."""
        return self.moe_load.metrics(self._stage_group) if self.moe_load is not None else {}

    def _begin_step(self) -> None:
        if self.moe_load is not None:
            self.moe_load.clear()

    # --- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_batches: int) -> float:
        """The mean token loss of ``n_batches`` global batches, forward only, the same on every rank.

        ``batches``: this batch rank's rows of each, as in training. Modules run in eval mode
        (MoE layers then keep no load statistics). Collectives: the forwards' own, the
        pipeline's loss broadcast, one all-reduce over dp x ep x cp.
        """
        for part in self.parts:
            part.eval()
        loss_share = torch.zeros((), device=self.device)
        try:
            for inputs, labels in batches:
                inputs, labels, documents = self.local_batch(inputs, labels)
                with self.loss_context():
                    loss_share += self._eval_loss_share(inputs, labels, documents)
        finally:
            for part in self.parts:
                part.train()
        loss_share = self._share_over_stages(loss_share)
        dist.all_reduce(loss_share, group=self._loss_group)
        return loss_share.item() / n_batches

    @abstractmethod
    def _eval_loss_share(self, inputs: torch.Tensor, labels: torch.Tensor,
                         documents: Documents | None) -> torch.Tensor:
        """This rank's share of one batch's mean token loss (under pp: the last stage's, 0 elsewhere)."""

    def _share_over_stages(self, loss_share: torch.Tensor) -> torch.Tensor:
        """Give every pipeline stage the last stage's loss share (no pipeline: as it is)."""
        return loss_share

    # --- what the step's pieces share --------------------------------------------------------

    def local_batch(self, inputs: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, Documents | None]:
        """This rank's part of its batch rows on its device: [b, S] -> [b, S/cp], the cp rank's
        zigzag chunks r and 2cp-1-r (all of S when cp = 1); with document masking, the
        documents of the whole sequences and the rotary positions of this rank's tokens."""
        documents = None
        if self.recipe.document_eos is not None:
            ids = document_ids(inputs, self.recipe.document_eos)
            documents = Documents(ids.to(self.device), self._local_tokens(document_positions(ids)))
        return self._local_tokens(inputs), self._local_tokens(labels), documents

    def _local_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._cp > 1:
            tokens = zigzag_shard(tokens, 1, self._cp_rank, self._cp)
        return tokens.to(self.device)

    def loss_context(self) -> contextlib.AbstractContextManager:
        """``loss_parallel`` when the logits are vocab-sharded over tp (it must enclose the loss's
        forward and backward), else a no-op."""
        return loss_context(self._tensor_parallel)

    # --- names -------------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) with the whole model's names (``layers.3.attention.wq.weight``) on any mesh."""
        for part in self.parts:
            yield from part.named_parameters()

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, buffer) with the whole model's names, like ``named_parameters``."""
        for part in self.parts:
            yield from part.named_buffers()

    def whole_model_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors keyed by ``module``'s names, re-keyed by the whole model's (what checkpoints store)."""
        return tensors


class SingleStageModel(ParallelModel):
    """The whole model on this rank (sharded by TP/SP, FSDP, EP, CP): a step runs its
    ``grad_accum_steps`` micro-batches one after another."""

    def __init__(self, model: nn.Module, pm: ParallelMesh, device: torch.device, recipe: StepRecipe,
                 rules: GradientRules, moe_load: StepLoad | None):
        super().__init__(model, [model], pm, device, recipe, rules, moe_load)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Micro-batches of [b/accum, S/cp] rows; FSDP reduce-scatters (summing) after the last
        one only, before it gradients accumulate unsharded. Collectives: the forward's and
        backward's own (TP, CP, EP, FSDP)."""
        self._begin_step()
        inputs, labels, documents = self.local_batch(inputs, labels)
        micro = self.recipe.grad_accum_steps
        micro_documents = [None] * micro if documents is None else \
            [Documents(ids, pos) for ids, pos in zip(documents.ids.chunk(micro), documents.positions.chunk(micro))]
        loss_share = torch.zeros((), device=self.device)
        batches = zip(inputs.chunk(micro), labels.chunk(micro), micro_documents)
        for index, (micro_inputs, micro_labels, micro_docs) in enumerate(batches):
            if micro > 1:
                self._set_gradient_sync(index == micro - 1)
            with self.loss_context():
                loss = self.recipe.step_loss(self.module(micro_inputs, documents=micro_docs), micro_labels)
                loss.backward()
            loss_share += local_tensor(loss).detach()
        return loss_share

    def _set_gradient_sync(self, enabled: bool) -> None:
        """Whether FSDP reduce-scatters gradients in the next backward (no-op without FSDP)."""
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(enabled)

    def _eval_loss_share(self, inputs: torch.Tensor, labels: torch.Tensor,
                         documents: Documents | None) -> torch.Tensor:
        return local_tensor(self.recipe.step_loss(self.module(inputs, documents=documents), labels)).float()
