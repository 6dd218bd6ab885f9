"""Windows cut from a document stream, for hub datasets too big to tokenize up front.

Behaviour, stated honestly:

* **Mesh-invariant, by redundancy.** Every batch rank reads and tokenizes the WHOLE stream,
  in the same order, cuts the same windows (``seq_len + 1`` tokens, stride ``seq_len``, as
  in the cached mode) and keeps only its own rows of each global batch. The global batches
  are therefore the same for any ``batch_world``, but each rank does the tokenization work
  of all of them.
* **Order.** The stream's own order, shuffled only by ``datasets``' buffered shuffle
  (``IterableDataset.shuffle(seed, buffer_size)``, reseeded each epoch). The windows are
  not globally shuffled, so neighbouring windows of one long document land in one batch.
  It is NOT the same sample order as the cached mode for the same data.
* **Epochs.** When the stream ends it restarts with the next epoch; the leftover tokens of
  the last document carry over into the first window of the next epoch.
* **Resume** replays the stream from the start and skips the consumed windows: exact, but
  it costs the tokenization of everything consumed so far.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .data_sources import Source, encode_documents
from .tokenizer import Tokenizer


class StreamingWindows:
    """Global window sequence of a streamed :class:`~train.data_sources.Source`, read in order."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_len: int):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.epoch = 0
        self._windows: Iterator[np.ndarray] | None = None
        self._position = 0  # index of the window that self._windows yields next

    def rows(self, first_sample: int, count: int, rows: range) -> np.ndarray:
        """Windows ``rows`` (global sample indices) of the batch ``[first_sample, first_sample + count)``.

        Returns ``[len(rows), seq_len + 1]``. The whole batch is read; only ``rows`` are kept.
        """
        self._seek(first_sample)
        batch = [next(self._windows) for _ in range(count)]
        self._position += count
        return np.stack([batch[g - first_sample] for g in rows])

    def _seek(self, sample: int) -> None:
        """Move to window ``sample``: replay from the start when going back (or on first use), skip forward."""
        if self._windows is None or sample < self._position:
            self._windows, self._position = self._generate(), 0
        for _ in range(sample - self._position):
            next(self._windows)
        self._position = sample

    def _generate(self) -> Iterator[np.ndarray]:
        """Endless windows: documents + EOS, joined across documents and epochs."""
        buffer = np.empty(0, dtype=np.int64)
        epoch = 0
        while True:
            self.epoch = epoch
            documents = 0
            for ids in encode_documents(self.tokenizer, self.source.texts(epoch)):
                documents += 1
                buffer = np.concatenate([buffer, np.asarray(ids, dtype=np.int64)])
                count = (len(buffer) - 1) // self.seq_len
                for i in range(count):
                    yield buffer[i * self.seq_len:(i + 1) * self.seq_len + 1]
                buffer = buffer[count * self.seq_len:]
            if documents == 0:
                raise ValueError(f"{self.source.description} yielded no documents")
            epoch += 1
