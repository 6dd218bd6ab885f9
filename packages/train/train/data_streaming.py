"""Windows cut from a document stream, for hub datasets too big to tokenize up front.

Behaviour, stated honestly:

* **Mesh-invariant, by redundancy.** Every batch rank reads and tokenizes the WHOLE stream,
  in the same order, cuts the same windows (``seq_len + 1`` tokens, stride ``seq_len``, as
  in the cached mode) and keeps only its own rows of each global batch. The global batches
  are therefore the same for any ``batch_world``, but each rank does the tokenization work
  of all of them.
* **Order: block shuffle.** The stream is read in blocks of ``block_documents`` documents;
  each block is permuted by a generator seeded with (seed, epoch, block). Documents never
  travel between blocks, so shuffling is local (like a shuffle buffer of that size) but, unlike
  ``datasets``' buffered shuffle, it can be resumed exactly: a buffer's contents are not in
  ``datasets``' state, so a resumed buffered shuffle skips the documents it held. This is NOT
  the same sample order as the cached mode for the same data.
* **Epochs.** When the stream ends it restarts with the next epoch; the leftover tokens of
  the last document carry over into the first window of the next epoch.
* **Resume** restores the stream's position with ``datasets``' own ``IterableDataset.state_dict``
  taken at the start of the current block, re-reads that block's text (no tokenization),
  re-tokenizes only the current document and continues at the same window: exact, and the
  cost no longer grows with the data consumed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .data_sources import Source, encode_documents
from .tokenizer import Tokenizer


@dataclass
class StreamPosition:
    """Where the next window comes from. JSON-able: it goes into checkpoints as is.

    ``block_start`` is ``datasets``' state of the stream at the start of block ``block`` (None:
    the epoch's start); ``document`` indexes the block's permuted documents; ``window`` is the
    next window of ``carry + tokens(document)``, where ``carry`` holds the previous documents'
    leftover tokens (fewer than ``seq_len + 1``).
    """

    epoch: int = 0
    block: int = 0
    block_start: dict[str, Any] | None = None
    document: int = 0
    window: int = 0
    carry: list[int] = field(default_factory=list)


class StreamingWindows:
    """Global window sequence of a streamed :class:`~train.data_sources.Source`, read in order."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_len: int, seed: int, block_documents: int):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.seed, self.block_documents = seed, max(1, block_documents)
        self.position = StreamPosition()
        self._windows: Iterator[np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def rows(self, count: int, rows: range) -> np.ndarray:
        """Rows ``rows`` (offsets into the batch) of the next ``count`` windows: ``[len(rows), seq_len + 1]``.

        The whole batch is read; only ``rows`` are kept."""
        if self._windows is None:
            self._windows = self._generate(StreamPosition(**asdict(self.position)))
        batch = [next(self._windows) for _ in range(count)]
        return np.stack([batch[r] for r in rows])

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = StreamPosition(**state)
        self._windows = None  # the next read starts at the loaded position

    def _generate(self, start: StreamPosition) -> Iterator[np.ndarray]:
        """Endless windows from ``start``; ``self.position`` always names the window after the one yielded."""
        epoch, block, block_start = start.epoch, start.block, start.block_start
        document, window, carry = start.document, start.window, list(start.carry)
        while True:
            stream = self.source.records(epoch)
            if block_start is not None:
                stream.load_state_dict(block_start)
            texts = self.source.texts(epoch, stream)
            read_any = block > 0
            while documents := list(itertools.islice(texts, self.block_documents)):
                read_any = True
                order = np.random.default_rng([self.seed, epoch, block]).permutation(len(documents))
                shuffled = [documents[i] for i in order]
                for index in range(document, len(shuffled)):
                    tokens = carry + next(encode_documents(self.tokenizer, [shuffled[index]]))
                    count = (len(tokens) - 1) // self.seq_len
                    for w in range(window, count):
                        self.position = StreamPosition(epoch, block, block_start, index, w + 1, carry)
                        yield np.asarray(tokens[w * self.seq_len:(w + 1) * self.seq_len + 1], dtype=np.int64)
                    carry, window = tokens[count * self.seq_len:], 0
                # the stream's own state after this block's documents: where the next block starts
                block, document, block_start = block + 1, 0, stream.state_dict()
            if not read_any:
                raise ValueError(f"{self.source.description} yielded no documents")
            epoch, block, block_start = epoch + 1, 0, None
