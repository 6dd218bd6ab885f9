"""Train ``packages/train/train/assets/tokenizer.json``, the default tokenizer, on the bundled corpus.

A byte-level BPE (the GPT-2 / Llama 3 family of tokenizers) trained with Hugging Face
``tokenizers``: any text encodes (unknown characters fall back to bytes), and decoding gives
the text back exactly. 4096 tokens suit a laptop-sized model on 5 MB of text: the embedding
and output layers stay small, and a token is ~3.5 characters. ``<|endoftext|>`` is the one
special token, the EOS the data pipeline puts after every document. Rebuild with::

    python tools/corpus/make_tokenizer.py [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS = Path(__file__).resolve().parents[2] / "packages" / "train" / "train" / "assets"
EOS = "<|endoftext|>"


def corpus_texts(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ASSETS / "shakespeare.jsonl.gz")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--output", type=Path, default=ASSETS / "tokenizer.json")
    args = parser.parse_args()
    tokenizer = train_tokenizer(corpus_texts(args.corpus), args.vocab_size)
    tokenizer.save(str(args.output))
    sample = next(corpus_texts(args.corpus))
    ids = tokenizer.encode(sample).ids
    assert tokenizer.decode(ids) == sample, "byte-level BPE must round-trip"
    print(f"{args.output}: {tokenizer.get_vocab_size()} tokens, {len(sample) / len(ids):.2f} characters per token "
          f"on the first document")


if __name__ == "__main__":
    main()
