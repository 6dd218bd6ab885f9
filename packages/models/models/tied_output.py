"""A tied output projection across pipeline stages (Llama 3.2 1B/3B, Qwen3 up to 4B).

A tied model computes its logits with the embedding matrix [vocab, dim]. Pipelined, the
embedding lives on the first stage and the output on the last, usually on different ranks.
As Megatron does, the last stage then holds a *replica*: its own parameter ``output.weight``,
kept equal to the first stage's ``tok_embeddings.weight``:

    init        the replica is drawn under the embedding's name (``models.init`` seeds by name)
    gradients   after each step's backward the two gradients are summed: one all-reduce between
                the rank of the first and the rank of the last stage (for each dp/cp/tp/ep
                coordinate: FSDP and TP shard both [vocab, dim] tensors alike), or an add where
                one rank runs both stages (the V schedule). Same value, same gradient, same
                AdamW state: the copies stay equal.
    grad norm   counted once (the replica is clipped, not counted)
    names       the replica is ``tok_embeddings.weight`` in checkpoints and reports, as in the
                whole tied model: a checkpoint loads on any mesh, pipelined or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from core.mesh import ParallelMesh
from core.pipeline import last_stage_rank
from core.tensor_parallel import local_tensor

EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"


@dataclass
class TiedOutput:
    """This rank's ends of a tied pair: ``embedding`` (first stage) and/or ``replica`` (last stage)."""

    embedding: nn.Parameter | None
    replica: nn.Parameter | None
    group: dist.ProcessGroup | None  # the first and last stage ranks; None where one rank holds both

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """Give both ends the sum of their gradients. Collective: one all-reduce over ``group`` on
        the ranks holding one end (none on a rank holding both, nothing on the others)."""
        grads = [local_tensor(p.grad) for p in (self.embedding, self.replica) if p is not None and p.grad is not None]
        if len(grads) == 2:
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif grads:
            dist.all_reduce(grads[0], group=self.group)

    def whole_model_name(self, name: str) -> str:
        """The replica's names (``output.weight``, ``optim.output.weight.exp_avg``) -> the embedding's."""
        if self.replica is None:
            return name
        if name == OUTPUT:
            return EMBEDDING
        state = f"optim.{OUTPUT}."  # the replica's AdamW state
        return f"optim.{EMBEDDING}." + name[len(state):] if name.startswith(state) else name


def tied_output(parts: list[nn.Module], pm: ParallelMesh, schedule: str) -> TiedOutput | None:
    """The tied pair of a pipelined tied model on this rank (None for an untied model). Collective
    on the first and last stage ranks only: the group of the two (``use_local_synchronization``)."""
    if not parts[0].config.tie_embeddings:
        return None
    embedding = next((p.tok_embeddings.weight for p in parts if p.tok_embeddings is not None), None)
    replica = next((p.output.weight for p in parts if p.output is not None and p.tok_embeddings is None), None)
    pp_ranks = dist.get_process_group_ranks(pm["pp"].get_group())
    pair = sorted({pp_ranks[0], pp_ranks[last_stage_rank(len(pp_ranks), schedule)]})
    group = None
    if len(pair) == 2 and (embedding is None) != (replica is None):
        group = pm["pp"].get_group() if len(pp_ranks) == 2 else dist.new_group(pair, use_local_synchronization=True)
    return TiedOutput(embedding, replica, group)
