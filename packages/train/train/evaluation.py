"""Held-out evaluation: the mean token loss of a fixed set of batches, forward only, on any mesh.

The evaluation set is ``--eval-batches`` global batches (``global_batch_size`` sequences of
``seq_len`` tokens each), the same at every evaluation:

* by default, the held-out windows of the training data (``TokenBatches.held_out_windows``:
  the last 1%, which training never reads), in order, repeated if there are fewer;
* with ``--eval-dataset``, the windows of that dataset from its start;
* for ``--dataset synthetic``, random tokens from a generator training never uses.

Each batch rank reads its rows of every evaluation batch, exactly as in training, so the
loss is mesh-invariant like the training loss: summed token losses over the ranks that
hold different tokens (dp x ep x cp), divided by the tokens of the whole set. Modules run
in eval mode, which keeps MoE load statistics (and their collectives) out of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from core.pipeline import broadcast_from_last_stage
from core.tensor_parallel import loss_context, local_tensor, token_loss_sum

from .data import SyntheticBatches, TokenBatches

# Synthetic evaluation batches come from generator seeds training never draws (see SyntheticBatches).
SYNTHETIC_EVAL_SEED_OFFSET = 2**32


class HeldOutBatches:
    """One batch rank's rows of the evaluation set: ``n_batches`` global batches of ``windows``
    (window ids of ``data``'s token array, cycled), each ``[global_batch_size // batch_world, seq_len]``."""

    def __init__(self, data: TokenBatches, windows: np.ndarray, n_batches: int):
        if len(windows) == 0:
            raise ValueError(f"the data has only {data.num_windows} window(s) of --seq-len {data.seq_len}: too little "
                             f"for a held-out split; pass --eval-dataset or use more data")
        self.data, self.windows, self.n_batches = data, windows, n_batches

    def __iter__(self):
        data = self.data
        for batch in range(self.n_batches):
            first = batch * data.global_batch_size + data.batch_rank * data.local_batch_size
            rows = [self.windows[sample % len(self.windows)] for sample in range(first, first + data.local_batch_size)]
            tokens = torch.from_numpy(np.stack([data.window_tokens(int(w)) for w in rows]).astype(np.int64))
            yield tokens[:, :-1], tokens[:, 1:]


def build_eval_batches(cfg, tokenizer, train_batches, batch_rank: int, batch_world: int, vocab_size: int):
    """This batch rank's evaluation set (module docstring); iterable any number of times."""
    if (cfg.eval_dataset or cfg.dataset) == "synthetic":
        return _SyntheticEvalBatches(vocab_size, cfg, batch_rank, batch_world)
    if cfg.eval_dataset:  # a dataset of its own: every window of it is evaluation data
        data = TokenBatches(cfg.eval_dataset, tokenizer, cfg.seq_len, cfg.global_batch_size,
                            batch_rank, batch_world, cfg.seed)
        return HeldOutBatches(data, np.arange(data.num_windows + len(data.held_out_windows)), cfg.eval_batches)
    return HeldOutBatches(train_batches, train_batches.held_out_windows, cfg.eval_batches)


class _SyntheticEvalBatches:
    def __init__(self, vocab_size: int, cfg, batch_rank: int, batch_world: int):
        self.args = (vocab_size, cfg.seq_len, cfg.global_batch_size, batch_rank, batch_world,
                     cfg.seed + SYNTHETIC_EVAL_SEED_OFFSET)
        self.n_batches = cfg.eval_batches

    def __iter__(self):
        batches = SyntheticBatches(*self.args)
        return (next(batches) for _ in range(self.n_batches))


@torch.no_grad()
def evaluate(t, batches) -> dict[str, float]:
    """``eval_loss`` (mean token loss of the set) and ``eval_perplexity``, the same on every rank.

    Collectives: the forward passes' own (TP, CP, EP, FSDP gathers; pipeline P2P), one
    all-reduce over dp x ep x cp and, under pp, one broadcast from the last stage.
    """
    tokens_per_batch = t.cfg.global_batch_size * t.cfg.seq_len
    for part in t.model_parts:
        part.eval()
    loss_share = torch.zeros((), device=t.device)
    try:
        for inputs, labels in batches:
            documents = t.documents_of(inputs)
            with loss_context(t.pm.size("tp") > 1), t.compute_context():
                loss_share += _forward_loss_share(t, t.local_tokens(inputs), t.local_tokens(labels), documents,
                                                  tokens_per_batch)
    finally:
        for part in t.model_parts:
            part.train()
    if t.pipeline:
        broadcast_from_last_stage(loss_share, t.pm["pp"].get_group(), t.pm.size("pp"), t.pipeline.schedule_name)
    dist.all_reduce(loss_share, group=t.pm["dense_grad"].get_group())
    loss = loss_share.item() / batches.n_batches
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def _forward_loss_share(t, inputs: torch.Tensor, labels: torch.Tensor, documents, tokens_per_batch: int) -> torch.Tensor:
    """This rank's share of one batch's mean token loss; under pp, the last stage's (0 elsewhere)."""
    if t.pipeline is None:
        logits = t.model(inputs, documents=documents)
        return local_tensor(token_loss_sum(logits, labels)).float() / tokens_per_batch
    pipe, losses = t.pipeline, []
    args = (inputs.contiguous(),) if pipe.has_first else ()
    pipe.schedule.eval(*args, target=labels if pipe.has_last else None, losses=losses)
    return sum((local_tensor(loss).float() for loss in losses), torch.zeros((), device=t.device))
