"""What models that ignore (most of) the context score on a dataset: the bar a trained model must clear.

    python tools/corpus/baselines.py [--dataset default] [--tokenizer default] [--seq-len 128]

Reads the dataset as the trainer does (same token cache, same held-out split: the last 1% of
the windows) and prints, in nats per token like the trainer's loss:

* unigram: the token frequencies alone. In-sample it is the entropy of the training tokens
  (the best loss any model that ignores context can reach on them); held out, the training
  frequencies with add-one smoothing scored on the held-out tokens.
* bigram: the previous token only. In-sample, the conditional entropy H(next | previous) of
  the training tokens (its best case: the counts are the model); held out, the training counts
  with add-k smoothing (k = 0.01, over the whole vocabulary) scored on the held-out tokens.

The trainer's ``loss`` compares with the in-sample figures, ``eval_loss`` with the held-out ones.
"""

from __future__ import annotations

import argparse

import numpy as np

from train.data import TokenBatches, load_tokenizer

ADD_K = 0.01


def unigram(train: np.ndarray, held_out: np.ndarray, vocab: int) -> tuple[float, float]:
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    in_sample = float(-(p * np.log(p)).sum())
    smoothed = (counts + 1) / (counts.sum() + vocab)
    return in_sample, float(-np.log(smoothed[held_out]).mean())


def bigram(train: np.ndarray, held_out: np.ndarray, vocab: int) -> tuple[float, float]:
    pairs = train[:-1].astype(np.int64) * vocab + train[1:]
    keys, counts = np.unique(pairs, return_counts=True)
    previous = np.bincount(train[:-1], minlength=vocab).astype(np.float64)
    in_sample = float(-(counts * np.log(counts / previous[keys // vocab])).sum() / counts.sum())
    held_pairs = held_out[:-1].astype(np.int64) * vocab + held_out[1:]
    index = np.searchsorted(keys, held_pairs)
    found = (index < len(keys)) & (keys[np.minimum(index, len(keys) - 1)] == held_pairs)
    pair_counts = np.where(found, counts[np.minimum(index, len(keys) - 1)], 0)
    p = (pair_counts + ADD_K) / (previous[held_out[:-1]] + ADD_K * vocab)
    return in_sample, float(-np.log(p).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--tokenizer", default="default")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    data = TokenBatches(args.dataset, tokenizer, args.seq_len, 1, 0, 1, seed=0)
    tokens = np.asarray(data.tokens, dtype=np.int64)
    boundary = data.num_windows * args.seq_len  # held-out windows start here
    train, held_out = tokens[:boundary + 1], tokens[boundary:]
    vocab = tokenizer.vocab_size
    print(f"{data.description}: {len(train):,} training tokens, {len(held_out):,} held out, vocab {vocab}")
    print(f"{'model':<10}{'in-sample':>12}{'held-out':>12}   (nats per token)")
    for name, fn in (("unigram", unigram), ("bigram", bigram)):
        inside, outside = fn(train, held_out, vocab)
        print(f"{name:<10}{inside:>12.3f}{outside:>12.3f}")


if __name__ == "__main__":
    main()
