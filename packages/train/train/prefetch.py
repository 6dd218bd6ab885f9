"""The next step's batch, prepared while the current step runs.

Reading a batch is host work (memory-mapped windows stacked into a numpy array, or streamed
documents tokenized) followed, on a GPU, by a host-to-device copy. Done inline, the GPU idles
for both at the start of every step, and a plain ``tensor.to("cuda")`` from pageable memory
also blocks the host until the copy is done. ``PrefetchedBatches`` overlaps them with the step:

    step k on the GPU        | forward-backward k | optimizer k | forward-backward k+1 | ...
    host thread              | read batch k+1, pin it, queue its copy |  read batch k+2 ...
    copy stream (CUDA only)  |      copy k+1 (DMA engine)              |

- one worker thread reads batch k+1 (``next`` on the wrapped ``Batches``) as soon as step k
  has taken batch k; numpy and the tokenizers release the GIL for their heavy parts;
- on CUDA the thread pins the batch (page-locked memory, from torch's caching host allocator)
  and issues a ``non_blocking`` copy on a side stream, then records an event; the step's
  stream waits for that event on the GPU, not on the host (``wait_event``), and the tensors
  are marked as used by that stream (``record_stream``) so the caching allocator does not
  hand their memory to the next copy while the step still reads them;
- on the CPU the batch is used where it is (no copy), and only the read is overlapped.

The batches and their order are exactly those of the wrapped iterator: prefetching changes
when a batch is read, not which. ``state_dict`` is the position after the batches handed
out (not after the one read ahead), so a checkpoint resumes at the right batch.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class _Prefetched:
    """A batch read ahead: the data position before it, the batch, and (CUDA) its copy's event."""

    state_before: dict
    inputs: torch.Tensor
    labels: torch.Tensor
    copied: torch.cuda.Event | None = None


class PrefetchedBatches:
    """Iterator over ``source``'s ``(inputs, labels)`` on ``device`` (each ``[b, S]`` int64), one read ahead.

    ``source``: the trainer's ``Batches`` (anything with ``__next__``, ``state_dict`` and
    ``load_state_dict``), still reachable as ``.source`` for its description. No communication.
    """

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: Future[_Prefetched] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's batch; the next one starts being read before this returns."""
        batch = (self._ahead or self._read_ahead()).result()
        self._ahead = self._read_ahead()
        if batch.copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(batch.copied)  # on the GPU: the host does not wait for the copy
            batch.inputs.record_stream(stream)
            batch.labels.record_stream(stream)
        return batch.inputs, batch.labels

    def _read_ahead(self) -> Future[_Prefetched]:
        return self._worker.submit(self._read_next)

    def _read_next(self) -> _Prefetched:
        """In the worker thread: the data position, then the next batch (copied on CUDA)."""
        state = self.source.state_dict()
        inputs, labels = next(self.source)
        if self._copy_stream is None:
            return _Prefetched(state, inputs, labels)
        # The current CUDA device is per thread: name it, as the main thread's set_device does not reach here.
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            inputs, labels = (t.pin_memory().to(self.device, non_blocking=True) for t in (inputs, labels))
            copied = torch.cuda.Event()
            copied.record()
        return _Prefetched(state, inputs, labels, copied)

    def state_dict(self) -> dict:
        """The position after the batches handed out by ``__next__`` (waits for a read in flight)."""
        return self._ahead.result().state_before if self._ahead is not None else self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``: the batch read ahead, if any, is dropped."""
        self._drop_read_ahead()
        self.source.load_state_dict(state)

    def _drop_read_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.exception()  # wait; a read that failed has nothing to give back
            self._ahead = None

    def close(self) -> None:
        """Stop the worker thread (after the read in flight)."""
        self._drop_read_ahead()
        self._worker.shutdown()
