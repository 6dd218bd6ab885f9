"""Training batches that do not depend on the mesh: the data half of Meshtron's promise.

The global order
----------------
Documents are tokenized once (:mod:`train.data_sources`), each followed by one EOS, into one
flat token array ``T`` of ``n`` tokens. Window ``w`` is ``T[w*s : w*s + s + 1]`` (``s`` =
``seq_len``): consecutive windows share one token, so every token after the first is a label
exactly once. There are ``W = (n - 1) // s`` windows.

The last ``H = max(1, W // 100)`` windows (1%, none when ``W == 1``) are the held-out split:
training never reads them, evaluation reads only them (``held_out_windows``). Training reads
an endless sequence of *samples* over the other ``W' = W - H`` windows. Sample ``g`` lies in
epoch ``e = g // W'`` and is window ``perm_e[g % W']``, where ``perm_e`` is a permutation of
``range(W')`` drawn from ``numpy.random.default_rng([seed, e])``. Step ``k`` trains on the
global batch of samples ``[k*B, (k+1)*B)`` (``B`` = ``global_batch_size``); a batch may
straddle two epochs.

Sharding over the batch mesh
----------------------------
Batch rank ``r`` of ``R`` (``R`` = dp x ep) gets rows ``[r*B/R, (r+1)*B/R)`` of that global
batch and reads only those windows from the memory-mapped cache. Concatenating the ranks'
rows gives the same global batch for every ``R``; that is what the trainer's parity tests
rely on. The state is one number, the samples consumed, so a run may resume on a
different ``R`` and continue exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .data_sources import default_corpus_path, load_token_cache, open_source
from .data_streaming import StreamingWindows
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_fingerprint

__all__ = ["TokenBatches", "SyntheticBatches", "build_batches", "Tokenizer", "ByteTokenizer", "load_tokenizer",
           "default_corpus_path", "unigram_entropy_nats"]

STATE_VERSION = 2  # 2: a streamed run also records the stream's position


def unigram_entropy_nats(path_or_tokens: str | Path | Iterable[int]) -> float:
    """Entropy, in nats per token, of the token frequencies: the loss of the best model that ignores context.

    A path is read as bytes (the :class:`ByteTokenizer` view, EOS aside); anything else is a
    sequence of token ids. A language model that learned anything scores well below it.
    """
    if isinstance(path_or_tokens, (str, Path)):
        counts = np.bincount(np.frombuffer(Path(path_or_tokens).read_bytes(), dtype=np.uint8), minlength=256)
    else:
        counts = np.array(list(Counter(int(t) for t in np.asarray(path_or_tokens).ravel()).values()))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class TokenBatches:
    """Iterator over the training batches of ONE batch rank (module docstring: the global order).

    Yields ``(inputs, labels)``, int64 tensors of shape ``[global_batch_size // batch_world, seq_len]``,
    with ``labels[:, t] == inputs[:, t + 1]`` inside one window of ``seq_len + 1`` tokens.

    ``streaming=True`` reads documents as a stream instead of through the token cache; see
    :class:`train.data_streaming.StreamingWindows` for what that costs and guarantees.
    ``text_column`` names the text field of .jsonl/.json/.parquet/hub records; ``hub_config`` and
    ``split`` pick a hub dataset's configuration and split; ``block_documents`` is the streamed
    mode's shuffle block.
    """

    def __init__(self, dataset: str, tokenizer: Tokenizer, seq_len: int, global_batch_size: int,
                 batch_rank: int, batch_world: int, seed: int, streaming: bool = False,
                 cache_dir: Path | None = None, text_column: str = "text", hub_config: str = "",
                 split: str = "train", block_documents: int = 10_000):
        _check_shape(seq_len, global_batch_size, batch_rank, batch_world)
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.batch_rank, self.batch_world = batch_rank, batch_world
        self.local_batch_size = global_batch_size // batch_world
        self.streaming = streaming
        self.samples_consumed = 0  # the whole state: position in the global sample sequence
        self._permutations: dict[int, np.ndarray] = {}
        source = open_source(dataset, text_column, streaming, hub_config, split)
        self.description = source.description
        if streaming:
            self._stream = StreamingWindows(source, tokenizer, seq_len, seed, block_documents)
            self.fingerprint = f"{source.fingerprint}|{tokenizer_fingerprint(tokenizer)}|block{block_documents}"
            return
        self.tokens, meta = load_token_cache(source, tokenizer, cache_dir, report=_print_line)
        self.fingerprint, self.n_documents = meta["sha256"][:16], meta["n_documents"]
        all_windows = (len(self.tokens) - 1) // seq_len
        if all_windows < 1:
            raise ValueError(f"{source.description} has {len(self.tokens)} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}: use a smaller seq_len or more data")
        held_out = max(1, all_windows // 100) if all_windows > 1 else 0
        self.num_windows = all_windows - held_out  # the windows training reads
        self.held_out_windows = np.arange(self.num_windows, all_windows)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample (cached mode; streaming mode counts passes over the stream)."""
        return self._stream.epoch if self.streaming else self.samples_consumed // self.num_windows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, labels)``, each ``[local_batch_size, seq_len]`` int64."""
        first = self.samples_consumed + self.batch_rank * self.local_batch_size
        rows = range(first, first + self.local_batch_size)  # this rank's slice of the global batch
        if self.streaming:
            windows = self._stream.rows(self.global_batch_size, range(rows.start - self.samples_consumed,
                                                                      rows.stop - self.samples_consumed))
        else:
            windows = np.stack([self._window(g) for g in rows])
        self.samples_consumed += self.global_batch_size
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def _window(self, sample: int) -> np.ndarray:
        """Tokens of global sample ``sample``: shape ``[seq_len + 1]``."""
        epoch, position = divmod(sample, self.num_windows)
        return self.window_tokens(int(self._permutation(epoch)[position]))

    def window_tokens(self, window: int) -> np.ndarray:
        """Tokens of window ``window`` of the token array: shape ``[seq_len + 1]``."""
        start = window * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1])

    def _permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch. A batch usually touches one or two epochs: keep the last two."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def state_dict(self) -> dict:
        """JSON-able position. It does not mention the rank count: any batch_world may load it."""
        state = {"version": STATE_VERSION, "samples_consumed": self.samples_consumed, "epoch": self.epoch,
                 "seed": self.seed, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                 "streaming": self.streaming, "fingerprint": self.fingerprint}
        if self.streaming:
            state["stream"] = self._stream.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position. The seed, seq_len, mode and data must be the same.

        A different global_batch_size is allowed: the next batch starts at the same sample.
        """
        if state.get("version") not in (1, STATE_VERSION):  # 1 differs only for streamed runs (checked below)
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for name in ("seed", "seq_len", "streaming", "fingerprint"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"data state was saved with {name}={state[name]!r} but this run has "
                    f"{name}={getattr(self, name)!r}: "
                    f"resuming would not continue the same sample order; use the original {name} (or start afresh)")
        self.samples_consumed = int(state["samples_consumed"])
        if self.streaming:
            if "stream" not in state:
                raise ValueError("this streamed run's checkpoint predates stream positions (data state version 1): "
                                 "resume it with the Meshtron version that wrote it, or start afresh")
            self._stream.load_state_dict(state["stream"])


def _print_line(line: str) -> None:
    print(line, flush=True)


def _check_shape(seq_len: int, global_batch_size: int, batch_rank: int, batch_world: int) -> None:
    """Reject shapes that cannot split evenly, before any data is read."""
    for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size), ("batch_world", batch_world)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if global_batch_size % batch_world:
        lower = global_batch_size // batch_world * batch_world
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by batch_world={batch_world} (= dp x ep): "
            f"use a multiple of {batch_world}, e.g. {lower or batch_world} or {lower + batch_world}, "
            f"or change the mesh")
    if not 0 <= batch_rank < batch_world:
        raise ValueError(f"batch_rank={batch_rank} is outside [0, batch_world={batch_world})")


class SyntheticBatches:
    """Random tokens, the same global batch on every mesh: rank r takes rows [r*b, (r+1)*b).

    For benchmarks and parity tests that must not depend on files. Batch k is drawn from
    a generator seeded by (seed, k), so it is reproducible after a restart.
    """

    def __init__(self, vocab_size: int, seq_len: int, global_batch_size: int, batch_rank: int, batch_world: int,
                 seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.global_batch_size = global_batch_size
        self.local = global_batch_size // batch_world
        self.rows = slice(batch_rank * self.local, (batch_rank + 1) * self.local)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        tokens = torch.randint(0, self.vocab_size, (self.global_batch_size, self.seq_len + 1), generator=generator)
        self.position += 1
        window = tokens[self.rows]
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


# What the trainer draws its batches from: next() gives this batch rank's (inputs, labels), state_dict()
# its position for a checkpoint.
Batches = TokenBatches | SyntheticBatches


def build_batches(cfg, tokenizer: Tokenizer, batch_rank: int, batch_world: int, vocab_size: int) -> Batches:
    """The trainer's batches: this batch rank's (dp x ep coordinate's) rows of every global batch."""
    if cfg.dataset == "synthetic":
        return SyntheticBatches(vocab_size, cfg.seq_len, cfg.global_batch_size, batch_rank, batch_world, cfg.seed)
    return TokenBatches(cfg.dataset, tokenizer, cfg.seq_len, cfg.global_batch_size, batch_rank, batch_world,
                        cfg.seed, streaming=cfg.streaming, text_column=cfg.text_column,
                        hub_config=cfg.dataset_config, split=cfg.dataset_split)
