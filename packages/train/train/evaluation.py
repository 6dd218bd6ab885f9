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

from models.parallel_model import ParallelModel

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


def build_eval_batches(cfg, tokenizer, train_batches, batch_rank: int, batch_world: int,
                       vocab_size: int) -> EvalBatches:
    """This batch rank's evaluation set (module docstring); iterable any number of times."""
    if (cfg.eval_dataset or cfg.dataset) == "synthetic":
        return _SyntheticEvalBatches(vocab_size, cfg, batch_rank, batch_world)
    if cfg.eval_dataset:  # a dataset of its own: every window of it is evaluation data
        data = TokenBatches(cfg.eval_dataset, tokenizer, cfg.seq_len, cfg.global_batch_size, batch_rank,
                            batch_world, cfg.seed, text_column=cfg.text_column, hub_config=cfg.dataset_config,
                            split=cfg.dataset_split)
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


# This batch rank's rows of the evaluation set, iterable any number of times (``n_batches`` global batches).
EvalBatches = HeldOutBatches | _SyntheticEvalBatches


def evaluate(model: ParallelModel, batches: EvalBatches) -> dict[str, float]:
    """``eval_loss`` (mean token loss of the set) and ``eval_perplexity``, the same on every rank.

    Collectives: those of ``ParallelModel.evaluate`` (the forwards' own, one all-reduce over
    dp x ep x cp and, under pp, one broadcast from the last stage).
    """
    loss = model.evaluate(batches, batches.n_batches)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
