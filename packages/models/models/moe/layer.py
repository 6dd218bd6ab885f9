"""A mixture-of-experts decoder: the Llama block with its feed-forward replaced by an MoE layer.

MoE layer, for tokens x [T, dim] (T = batch * seq on this rank):

    router     scores = softmax or sigmoid(x @ gate)  [T, E]; top-k experts per token
               (+ an expert bias that only steers the choice, DeepSeek-V3's aux-loss-free balancing)
    experts    each token's k choices run through SwiGLU experts, weighted by their scores
               (expert parallel: the experts live on different ranks, see core.expert_parallel)
    shared     optionally, a dense SwiGLU every token goes through (DeepSeek's shared experts)

Load balancing is *mesh-invariant*: the aux loss is computed per sequence (its
statistics summed over the cp ranks that share the sequence), so it does not depend on
how the batch is split over ranks, micro-batches or pipeline stages; the load that
drives the expert bias and the metrics is summed over every rank holding different
tokens (dp x ep x cp) and over the step, so every mesh sees the global batch's load.

The layer is a plain single-device module. Two attributes let the parallel layer spread
it over ranks from outside, as ``Attention.attention_fn`` does for context parallel:
``routed_ffn`` (expert parallel swaps in the all-to-all dispatch over its ep group) and
``balancing`` (the step's bookkeeping: sequence statistics summed over ranks, the aux
loss's share of the step, the load kept for the expert bias; ``models.moe.load.StepLoad``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Shard, distribute_tensor

from core.activation_checkpoint import is_recomputing
from core.expert_parallel import expert_parallel_ffn
from core.tensor_parallel import local_tensor

from ..llama.model import FeedForward
from .config import MoEConfig
from .plan import token_split_plan


class Router(nn.Module):
    """x [T, dim] -> (scores [T, E] float32, expert ids [T, k] int64, weights [T, k] float32)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        # Added to the scores only to *choose* experts; it never scales an output, so it
        # gets no gradient and is moved by ``models.moe.load.StepLoad.update_expert_bias`` instead.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.gate(x).float()  # routing in float32: ties and bf16 noise would flip choices
        scores = logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.cfg.bias_update_rate > 0 else scores
        expert_ids = choice.topk(self.cfg.top_k, dim=-1).indices
        weights = scores.gather(-1, expert_ids)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return scores, expert_ids, weights


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as three [E, ...] tensors (``w1``/``w3``: [E, dim, hidden], ``w2``: [E, hidden, dim]).

    One tensor per projection, not E Linear modules, so expert parallel can shard them on
    dim 0 (``shard``) and initialization draws the same full tensor on every mesh.
    """

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def shard(self, ep_mesh) -> None:
        """Keep only this ep rank's experts: each weight becomes a DTensor ``Shard(0)`` over ``ep_mesh``.

        No communication (``src_data_rank=None``: every rank slices its own part; works on meta).
        """
        for name in ("w1", "w2", "w3"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(distribute_tensor(full, ep_mesh, [Shard(0)], src_data_rank=None)))

    def forward(self, rows: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """rows [N, dim] grouped by local expert, ``tokens_per_expert[e]`` rows each -> [N, dim].

        Each projection is one grouped GEMM over all local experts: group e multiplies its
        rows by expert e's weight. The group boundaries are cumulative counts on the device,
        so no count is read on the host (no sync).
        """
        dtype = _matmul_dtype(self.w1)
        rows, w1, w2, w3 = (local_tensor(t).to(dtype) for t in (rows, self.w1, self.w2, self.w3))
        ends = tokens_per_expert.cumsum(0).to(torch.int32)
        hidden = F.silu(grouped_matmul(rows, w1, ends)) * grouped_matmul(rows, w3, ends)
        return grouped_matmul(hidden, w2, ends)


def grouped_matmul(rows: Tensor, weights: Tensor, ends: Tensor) -> Tensor:
    """rows [N, k] in groups ending at ``ends`` [E] (int32, cumulative) @ weights [E, k, n] -> [N, n].

    ``F.grouped_mm``: one kernel for all groups, on the CPU in any float dtype and on CUDA in
    bf16 (SM >= 80), for rows of whole 16-byte units. Otherwise (a float32 debugging run on
    CUDA, an odd width) a loop over the groups, which reads the group sizes on the host once.
    """
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (rows, weights))
    if aligned and (rows.device.type == "cpu" or rows.dtype == torch.bfloat16):
        return F.grouped_mm(rows, weights, offs=ends)
    return looped_matmul(rows, weights, ends)


def looped_matmul(rows: Tensor, weights: Tensor, ends: Tensor) -> Tensor:
    """``grouped_matmul`` as one matmul per group (host sync: the group sizes)."""
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return torch.cat([chunk @ weights[e] for e, chunk in enumerate(rows.split(sizes))])


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a matmul with ``weight`` computes in: autocast's (grouped_mm is not on autocast's
    list, so it is cast by hand), else the weight's own (bf16 when FSDP's mixed precision cast it)."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out`` whose backward also sends gradient 1 into ``aux``.

    The block's forward returns only hidden states, so the aux loss cannot be added to
    the trainer's loss; this makes ``loss.backward()`` differentiate ``loss + aux`` anyway,
    on every pipeline stage, with no plumbing (Megatron's MoEAuxLossAutoScaler).
    """

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class LoadBalancing:
    """What an MoE layer's training forward needs from, and tells, the rest of the step.

    This default is one plain forward on one process: every sequence is whole here, the
    aux loss is the mean over this forward's sequences, and the load is not kept.
    ``models.moe.load.StepLoad`` replaces it when a parallel model trains on a mesh.
    """

    def whole_sequence_counts(self, counts: Tensor) -> Tensor:
        """[b, E] expert counts of this rank's part of each sequence -> of the whole sequences."""
        return counts

    def sequences_in_loss(self, forward_sequences: int) -> int:
        """The number of sequences the aux loss is a mean over (it is summed over this forward's)."""
        return forward_sequences

    def record(self, layer: MoE, load: Tensor, aux_share: Tensor) -> None:
        """This forward's tokens per expert [E] and aux loss share (no gradient); dropped here."""


class MoE(nn.Module):
    """x [b, s, dim] -> [b, s, dim]. Routed experts (+ shared expert), dropless.

    ``routed_ffn``: runs the (token, choice) pairs through the experts; by default on this
    process (``expert_parallel_ffn`` with no group), with expert parallel over the ep group.
    ``balancing``: see ``LoadBalancing``. Both are set by ``models.parallelize``.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.moe_ffn_dim)
        shared = cfg.n_shared_experts * cfg.moe_ffn_dim
        self.shared_expert = FeedForward(cfg.dim, shared) if shared else None
        self.routed_ffn: Callable[..., tuple[Tensor, Tensor]] = functools.partial(expert_parallel_ffn, group=None)
        self.balancing: LoadBalancing = LoadBalancing()

    def tensor_parallel_plan(self, prefix: str) -> dict:
        """Under tp, each tp rank runs the MoE on its own sequence-parallel slice of the tokens.

        Tokens, not experts, are split over tp: a routed expert is a small matmul that
        splitting again would make smaller and add a collective to, while the tokens are
        already split by sequence parallel for free. Experts are split by ep.
        """
        return token_split_plan(prefix)

    def forward(self, x: Tensor) -> Tensor:
        b, s, dim = x.shape
        tokens = x.reshape(-1, dim)
        scores, expert_ids, weights = self.router(tokens)
        out, _ = self.routed_ffn(tokens, expert_ids, weights, self.cfg.n_experts, self.experts)
        out = out.to(x.dtype)
        if self.training:  # load statistics and the aux loss belong to training steps, not evaluation
            aux = self._balance_loss_share(scores.view(b, s, -1), expert_ids.view(b, s, -1))
            if aux is not None and torch.is_grad_enabled():
                out = _AttachAuxLoss.apply(out, aux)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(b, s, dim)

    def _balance_loss_share(self, scores: Tensor, expert_ids: Tensor) -> Tensor | None:
        """This rank's share of the load-balancing loss; records the forward's load.

        scores: [b, s, E]; expert_ids: [b, s, k]. Per sequence (DeepSeek-V3's sequence-wise
        loss), aux = coef * E * sum_e f_e * P_e, with f_e the fraction of the sequence's
        (token, choice) pairs that chose e and P_e its mean router probability; the step's
        loss is the mean over all its sequences. Per *sequence*, not per batch, so it does not
        depend on how the batch is cut into ranks, micro-batches or pipeline stages: only cp
        (and tp's sequence slices) split a sequence, so f (data, no gradient) is summed over
        the ranks holding its parts (``balancing.whole_sequence_counts``), and each rank
        returns its own tokens' term of P; the summed gradients are exact.
        """
        cfg = self.cfg
        probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        b, s, k = expert_ids.shape
        counts = torch.zeros(b, cfg.n_experts, device=scores.device).scatter_add_(
            1, expert_ids.reshape(b, -1), torch.ones(b, s * k, device=scores.device))
        local_load = counts.sum(0)                                           # before cp adds the other parts
        counts = self.balancing.whole_sequence_counts(counts)
        seq_len = counts[0].sum() / k                                        # whole sequence, over cp
        fraction = counts / (seq_len * k)                                    # [b, E], rows sum to 1
        coef = cfg.aux_loss_coef * cfg.n_experts / self.balancing.sequences_in_loss(b)
        share = coef * (fraction * probs.sum(1) / seq_len).sum()             # sum over our sequences
        if not is_recomputing():  # activation checkpointing replays this forward in backward: count once
            self.balancing.record(self, local_load, share.detach())
        return share if cfg.aux_loss_coef > 0 else None


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of a model or of one pipeline stage of it (in module order)."""
    return [m for m in model.modules() if isinstance(m, MoE)]
