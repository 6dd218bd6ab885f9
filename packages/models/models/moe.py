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

Nothing here issues a collective unless ``parallelize`` has set the layer's groups;
with the defaults (None) the model is a plain single-device module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Shard, distribute_tensor

from core.activation_checkpoint import is_recomputing
from core.expert_parallel import expert_parallel_ffn
from core.tensor_parallel import local_tensor

from .llama import FeedForward, LlamaConfig, Transformer, TransformerBlock
from .plans import token_split_plan

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig(LlamaConfig):
    n_experts: int = 8
    top_k: int = 2
    moe_ffn_dim: int = 128             # hidden width of each routed expert
    n_shared_experts: int = 0          # a shared expert of width n_shared_experts * moe_ffn_dim
    n_dense_layers: int = 0            # the first layers keep a dense FeedForward (DeepSeek's first_k_dense)
    score_func: str = "softmax"        # softmax (Mixtral, DeepSeek-V2) | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True        # rescale the k chosen weights to sum to 1
    aux_loss_coef: float = 0.01        # Switch-style load-balancing loss; 0 disables it
    bias_update_rate: float = 0.0      # aux-loss-free balancing step (DeepSeek-V3 "gamma"); 0 disables it

    def validate(self) -> None:
        super().validate()
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}: "
                             f"a token cannot be routed to more experts than there are")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={self.score_func!r}: use one of {SCORE_FUNCS}")


def check_expert_parallel(cfg: MoEConfig, ep: int) -> None:
    """Raise ValueError (before any collective) when the experts cannot be split over ``ep`` ranks."""
    cfg.validate()
    if cfg.n_experts % ep:
        choices = [d for d in range(1, cfg.n_experts + 1) if cfg.n_experts % d == 0]
        raise ValueError(f"n_experts={cfg.n_experts} is not divisible by ep={ep}: every ep rank holds "
                         f"n_experts/ep whole experts; use ep in {choices}")


class Router(nn.Module):
    """x [T, dim] -> (scores [T, E] float32, expert ids [T, k] int64, weights [T, k] float32)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        # Added to the scores only to *choose* experts; it never scales an output, so it
        # gets no gradient and is moved by update_expert_bias instead.
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


class MoE(nn.Module):
    """x [b, s, dim] -> [b, s, dim]. Routed experts (+ shared expert), dropless.

    Set by ``models.parallelize`` (None = no communication):
      ``ep_group``: the expert-parallel group the tokens are exchanged over;
      ``seq_group``: the ranks holding the other parts of our sequences (cp x tp);
      ``stats_group``: every rank holding different tokens (dp x ep x cp x tp), over which
      the step's load (for the expert bias and the metrics) is summed by ``sum_step_load``.
    Set by the trainer: ``sequences_per_step``, the global batch size, so that the aux loss
    is the mean over all sequences of the optimizer step.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.moe_ffn_dim)
        shared = cfg.n_shared_experts * cfg.moe_ffn_dim
        self.shared_expert = FeedForward(cfg.dim, shared) if shared else None
        self.ep_group: dist.ProcessGroup | None = None
        self.seq_group: dist.ProcessGroup | None = None
        self.stats_group: dist.ProcessGroup | None = None
        self.sequences_per_step = 1
        # Load of the current optimizer step (all forwards): this rank's until sum_step_load
        # makes it global, for the bias update and the metrics.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)

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
        out, _ = expert_parallel_ffn(tokens, expert_ids, weights, self.cfg.n_experts, self.experts, self.ep_group)
        out = out.to(x.dtype)
        if self.training:  # load statistics and the aux loss belong to training steps, not evaluation
            aux = self._balance_loss_share(scores.view(b, s, -1), expert_ids.view(b, s, -1))
            if aux is not None and torch.is_grad_enabled():
                out = _AttachAuxLoss.apply(out, aux)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(b, s, dim)

    def _balance_loss_share(self, scores: Tensor, expert_ids: Tensor) -> Tensor | None:
        """This rank's share of the load-balancing loss; records the step's global load.

        scores: [b, s, E]; expert_ids: [b, s, k]. Per sequence (DeepSeek-V3's sequence-wise
        loss), aux = coef * E * sum_e f_e * P_e, with f_e the fraction of the sequence's
        (token, choice) pairs that chose e and P_e its mean router probability; the step's
        loss is the mean over all its sequences. Per *sequence*, not per batch, so it does not
        depend on how the batch is cut into ranks, micro-batches or pipeline stages: only cp
        splits a sequence, so f (data, no gradient) is summed over ``seq_group``, and each
        rank returns its own tokens' term of P; the trainer's summed gradients are exact.

        Collective: an all-reduce of [b, E] counts over ``seq_group`` (cp x tp > 1).
        """
        cfg = self.cfg
        probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        b, s, k = expert_ids.shape
        counts = torch.zeros(b, cfg.n_experts, device=scores.device).scatter_add_(
            1, expert_ids.reshape(b, -1), torch.ones(b, s * k, device=scores.device))
        local_load = counts.sum(0)                                           # before cp adds the other parts
        if self.seq_group is not None:
            dist.all_reduce(counts, group=self.seq_group)
        seq_len = counts[0].sum() / k                                        # whole sequence, over cp
        fraction = counts / (seq_len * k)                                    # [b, E], rows sum to 1
        coef = cfg.aux_loss_coef * cfg.n_experts / self.sequences_per_step
        share = coef * (fraction * probs.sum(1) / seq_len).sum()             # sum over our sequences
        if not is_recomputing():  # activation checkpointing replays this forward in backward: count once
            self._record_load(local_load, share.detach())
        return share if cfg.aux_loss_coef > 0 else None

    @torch.no_grad()
    def _record_load(self, load: Tensor, aux_share: Tensor) -> None:
        """Add this forward's tokens per expert and aux loss share to the step's (still local) totals."""
        self.tokens_per_expert += load.double()
        self.aux_loss_sum += aux_share.double()


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of a model or of one pipeline stage of it (in module order)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def active_parameter_count(module: nn.Module) -> float:
    """Parameters of ``module`` that multiply each token: all of them, but of each MoE layer's
    routed experts only the ``top_k`` of ``n_experts`` a token is sent to (on average)."""
    total = float(sum(p.numel() for p in module.parameters()))
    for moe in moe_layers(module):
        routed = sum(p.numel() for p in moe.experts.parameters())
        total -= routed * (1 - moe.cfg.top_k / moe.cfg.n_experts)
    return total


def set_sequences_per_step(model: nn.Module, global_batch_size: int) -> None:
    """The aux loss is the mean over the step's sequences: tell every MoE layer how many there are."""
    for moe in moe_layers(model):
        moe.sequences_per_step = global_batch_size


@torch.no_grad()
def sum_step_load(model: nn.Module) -> None:
    """After a step's forwards: make every MoE layer's load and aux loss global.

    Collective: one all-reduce of [layers, E + 1] float64 over the layers' ``stats_group``
    (all MoE layers of a rank share it), once per step rather than once per layer and
    micro-batch. Every rank of the group must call it.
    """
    layers = [moe for moe in moe_layers(model) if moe.stats_group is not None]
    if not layers:
        return
    stats = torch.stack([torch.cat([moe.tokens_per_expert, moe.aux_loss_sum.view(1)]) for moe in layers])
    dist.all_reduce(stats, group=layers[0].stats_group)
    for moe, row in zip(layers, stats):
        moe.tokens_per_expert.copy_(row[:-1])
        moe.aux_loss_sum.copy_(row[-1])


@torch.no_grad()
def update_expert_bias(model: nn.Module, apply: bool = True) -> None:
    """After an optimizer step: nudge each expert's bias toward balance, then clear the step's load.

    bias_e += rate * sign(mean load - load_e) (DeepSeek-V3): overloaded experts get chosen
    less. The load is already global (``sum_step_load``), so every rank makes the
    same update and the biases never diverge. ``apply=False`` (a step whose update is
    skipped; a bool, or a device tensor so that nothing is read on the host) only clears the
    load. No communication.
    """
    for moe in moe_layers(model):
        rate = moe.cfg.bias_update_rate
        if rate > 0:  # a step with no load moves nothing: sign(0) = 0
            load = moe.tokens_per_expert
            step = rate * torch.sign(load.mean() - load) * apply
            moe.router.expert_bias += step.to(moe.router.expert_bias.dtype)
        moe.tokens_per_expert.zero_()
        moe.aux_loss_sum.zero_()


def expert_load_metrics(model: nn.Module, n_experts: int, pp_group: dist.ProcessGroup | None) -> dict:
    """This step's global load, summed over all MoE layers (call after ``sum_step_load`` and before
    ``update_expert_bias``).

    Returns ``moe_tokens_per_expert`` (list of E routed pairs), ``moe_load_max_over_mean``
    (1.0 = perfectly balanced) and ``moe_aux_loss`` (summed over layers). Collective: one
    all-reduce over ``pp_group`` (pipeline stages hold different layers); every rank of the
    group must call it.
    """
    layers = moe_layers(model)
    device = layers[0].tokens_per_expert.device if layers else torch.device("cpu")
    totals = torch.zeros(n_experts + 1, dtype=torch.float64, device=device)
    for moe in layers:
        totals[:-1] += moe.tokens_per_expert
        totals[-1] += moe.aux_loss_sum
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(totals, group=pp_group)
    load = totals[:-1]
    balance = (load.max() / load.mean()).item() if load.sum() > 0 else 1.0
    return {"moe_tokens_per_expert": [int(c) for c in load.tolist()], "moe_load_max_over_mean": balance,
            "moe_aux_loss": totals[-1].item()}


class MoETransformer(Transformer):
    """The Llama decoder with MoE feed-forwards (after ``n_dense_layers`` dense ones).

    Same layer ModuleDict and optional embeddings / norm / output as the dense model, so
    pipeline stages are cut the same way.
    """

    config: MoEConfig

    def build_block(self, layer_index: int) -> TransformerBlock:
        if layer_index < self.config.n_dense_layers:
            return TransformerBlock(self.config)
        return TransformerBlock(self.config, MoE(self.config))
