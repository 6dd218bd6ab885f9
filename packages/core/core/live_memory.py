"""Peak bytes of tensors alive at once inside a block of code, on any device (CPU included).

CPU has no allocator statistic like ``torch.cuda.max_memory_allocated``; this counts every
storage an operator creates inside the ``with`` block (seen through a TorchDispatchMode)
until it is freed. Storages that existed before (first seen as an operator's input, e.g.
the arguments, or returned again by a view or detach of one) are not counted. Scratch
memory a kernel allocates internally is not seen either, so it measures what the code's
own tensors cost, e.g. whether a score matrix is materialized.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakLiveBytes(TorchDispatchMode):
    """``peak``: most bytes alive at once; ``largest``: bytes of the largest single storage."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._seen: set[int] = set()
        self._existing: set[int] = set()  # storages from before the block: never counted
        self._refs: list[weakref.ref] = []

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._note_existing(t.untyped_storage())
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _note_existing(self, storage) -> None:
        key = id(storage)
        if key in self._seen or key in self._existing:
            return
        self._existing.add(key)
        # forget it once freed: a later storage may reuse the id
        self._refs.append(weakref.ref(storage, lambda _, k=key: self._existing.discard(k)))

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._seen or key in self._existing:  # views share a storage: count it once
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, nbytes)
        self._refs.append(weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n)))
