"""The torch.distributed.checkpoint pieces ``core.checkpoint`` uses, in one module it imports on
the first save or load (importing DCP is a noticeable share of start-up, which runs that never
save should not pay)."""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter

__all__ = ["dcp", "DefaultLoadPlanner", "DefaultSavePlanner", "HuggingFaceStorageReader", "ShardWriter"]


class ShardWriter(HuggingFaceStorageWriter):
    """HuggingFaceStorageWriter that remembers which files all ranks wrote.

    ``finish`` runs on the coordinator (rank 0) with every rank's write results. With
    ``save_distributed=True`` the base class writes no index there, and the Metadata that
    ``dcp.save`` returns has no storage_data, so this is where the shard list is known.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()
        self._local_writes = None  # this rank's write future

    def write_data(self, plan, planner):
        """The base class's writes; the future is kept so ``local_files`` can name this rank's files."""
        self._local_writes = super().write_data(plan, planner)
        return self._local_writes

    def local_files(self) -> list[str]:
        """The shard files THIS rank wrote (after the save returned), for their checksums."""
        if self._local_writes is None:
            return []
        return sorted({result.storage_data.relative_path for result in self._local_writes.value()})

    def finish(self, metadata, results) -> None:
        self.written = {result.storage_data.relative_path for rank in results for result in rank}
        return super().finish(metadata, results)
