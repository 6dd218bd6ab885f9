"""Distributed checkpoints: save / find / load flat tensor dicts as safetensors shards, with resharding.

What is stored: a FLAT dict ``name -> Tensor | DTensor`` (``model_tensors`` +
``optimizer_tensors``) through ``torch.distributed.checkpoint`` (DCP) with
``HuggingFaceStorageWriter(save_distributed=True)``: every rank writes the chunks it owns
(replicated chunks are written once) into its own ``.safetensors`` file, whose header
records each chunk's offset in the global tensor. Loading reads those headers, so a
checkpoint saved on one mesh loads into DTensors on any other mesh (or plain tensors on
one process). Next to the shards: ``meta.json`` (the caller's JSON dict) and
``COMPLETE.json`` (manifest, written last). See ``checkpoint_layout`` for the layout and the
atomic commit.

Loading never unpickles a file: ``HuggingFaceStorageReader`` builds DCP's metadata from
the safetensors JSON headers (it does not open DCP's pickled ``.metadata`` file, which this
writer does not even create), and our own files are JSON. DCP still exchanges its load
*plans* between ranks with ``all_gather_object`` (pickle over the process group), but that
is data our own processes create in memory, never bytes from the checkpoint.

Collectives: a ``Checkpointer``'s ``save``, ``load`` and ``wait`` are collective: every rank
calls them on its own Checkpointer, in the same order. They run on the checkpointer's own
gloo groups (created on first use), so an async save can talk in a background thread
without interleaving with the training's collectives, and so NCCL jobs work too. The module
functions (``find_latest_checkpoint``, ``read_checkpoint_meta``, the ``*_tensors`` views)
only read and issue none.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core import checkpoint_layout as layout
from core.checkpoint_layout import CheckpointError, step_dir_name
from core.checkpoint_state import model_tensors, optimizer_tensors
from core.failures import checkpoint_failure_message, is_collective_timeout
from core.tensor_parallel import local_tensor

__all__ = ["CheckpointError", "Checkpointer", "AsyncCheckpoint", "find_latest_checkpoint", "read_checkpoint_meta",
           "model_tensors", "optimizer_tensors"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _attempt(what: str, fn, *args) -> tuple[Any, str | None]:
    """Run ``fn`` and turn any failure into a one-line message for ``Checkpointer._raise_together``
    (a full disk: ``writing checkpoint step 8 into DIR failed on rank 0: No space left on device ...``).

    DCP raises ``CheckpointException``, which derives from BaseException (it would slip
    through ``except Exception``); it carries every rank's failure. A timed-out collective is
    re-raised as it is: a peer is unreachable, so no agreement on the error is possible.
    """
    from torch.distributed.checkpoint.api import CheckpointException  # _attempt wraps checkpoint I/O only

    try:
        return fn(*args), None
    except CheckpointError as e:
        return None, str(e)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        causes = [e, *(failure[0] for failure in (getattr(e, "failures", None) or {}).values())]
        if any(is_collective_timeout(cause) for cause in causes):
            raise
        return None, checkpoint_failure_message(what, e)


def _dcp():
    """``core.checkpoint_dcp`` (torch.distributed.checkpoint and its storage classes), imported on
    the first save or load: importing it is a noticeable share of start-up, which runs that never
    save should not pay."""
    from core import checkpoint_dcp

    return checkpoint_dcp


class Checkpointer:
    """Saves and loads the checkpoints of one job; every rank holds one and makes the same calls.

    It owns what checkpoint I/O needs across calls: two gloo process groups (created on
    first use; creating groups is collective, so it happens inside calls every rank makes)
    and the async save still in flight, which the next save or load commits first.
    ``timeout`` bounds each of their collectives, as the trainer's ``--dist-timeout-s`` does
    the training's: a peer that stops mid-save fails the save instead of hanging it.
    """

    def __init__(self, timeout: datetime.timedelta | None = None, checksums: bool = True):
        self._groups: dict[str, dist.ProcessGroup] = {}
        self.pending: AsyncCheckpoint | None = None
        self.timeout = timeout  # of every collective on its groups (None: torch's default, 30 minutes)
        self.checksums = checksums  # record each shard's CRC-32 in the manifest (verified on load)

    def _group(self, role: str) -> dist.ProcessGroup | None:
        """A gloo group of all ranks for ``role``: "io" (DCP's own collectives, possibly in the
        async-save thread) or "control" (our checks, always on the main thread).

        Two groups because a process group needs its collectives in the same order on every
        rank: with one, an async save's background collectives and our main-thread checks
        would interleave differently per rank and deadlock.
        """
        if not _distributed():
            return None
        if not self._groups:
            self._groups["io"] = dist.new_group(backend="gloo", timeout=self.timeout)
            self._groups["control"] = dist.new_group(backend="gloo", timeout=self.timeout)
        return self._groups[role]

    def _raise_together(self, error: str | None) -> None:
        """Raise CheckpointError on EVERY rank if ANY rank has an error (message of the lowest such rank).

        Collective (one all_reduce, and two broadcasts if something failed). Checks that some
        ranks skip or that differ per rank (rank 0 validates files; each rank its own keys) go
        through here, so either all ranks continue into DCP's collectives or none does.
        Tensors, not broadcast_object_list, so nothing is unpickled.
        """
        if not _distributed():
            if error is not None:
                raise CheckpointError(error)
            return
        group, world = self._group("control"), dist.get_world_size()
        first = torch.tensor([_rank() if error is not None else world], dtype=torch.int64)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
        src = int(first.item())
        if src == world:
            return
        payload = (error or "unknown error").encode()  # never empty: frombuffer rejects b""
        length = torch.tensor([len(payload)], dtype=torch.int64)
        dist.broadcast(length, src=src, group=group)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if _rank() == src else \
            torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(data, src=src, group=group)
        message = bytes(data.tolist()).decode()
        raise CheckpointError(message if _rank() == src else f"(reported by rank {src}) {message}")

    def wait(self) -> Path | None:
        """Commit the async save in flight, if any (collective); its path, or None."""
        pending, self.pending = self.pending, None
        return pending.wait() if pending is not None else None

    def save(self, root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
             keep_last: int | None = None, async_save: bool = False) -> Path | AsyncCheckpoint:
        """Save ``tensors`` and ``meta`` as ``root/step_{step:08d}``; return its path (or a handle).

        Stores each tensor's chunks as safetensors (DTensors: each rank its own shards, any mesh;
        plain tensors: treated as replicated, written once; with pipeline parallel each rank may
        pass different keys), ``meta`` as ``meta.json`` (rank 0's), then the manifest. Atomic: the
        files go to ``root/.tmp-step_...``, rank 0 renames that into place only after every rank's
        shards are fsynced, so a crash at any point leaves older checkpoints usable and the
        partial one ignored. Then keeps the newest ``keep_last`` complete checkpoints. A state
        holding NaN or infinity is refused (CheckpointError on every rank; nothing written or pruned).

        ``async_save=True``: returns after copying the tensors to CPU memory (training may then
        modify them); the writes run in a background thread; ``.wait()`` (on every rank) commits.

        Collectives: a pre-check all_reduce, barriers, DCP's plan exchange and write gather, the
        commit's all_reduce. All ranks must call it with the same ``root`` and ``step``.
        """
        self.wait()
        root = Path(root)
        self._raise_together(_check_save_args(step, tensors, meta, keep_last))
        group = self._group("io")
        tmp = layout.tmp_dir(root, step)

        _, error = _attempt("preparing " + str(tmp), _prepare_tmp, root, tmp, meta) if _rank() == 0 else (None, None)
        self._raise_together(error)  # also the barrier: nobody writes into tmp before it is fresh

        dcp_io = _dcp()
        writer = dcp_io.ShardWriter(str(tmp), save_distributed=True)
        planner = dcp_io.DefaultSavePlanner()
        commit = lambda metadata: self._commit(root, tmp, step, writer, metadata, keep_last)  # noqa: E731
        if async_save:
            future, error = _attempt(f"staging checkpoint step {step} for {tmp}", lambda: dcp_io.dcp.async_save(
                tensors, storage_writer=writer, planner=planner, process_group=group))
            self._raise_together(error)
            self.pending = AsyncCheckpoint(future, commit, self._raise_together)
            return self.pending
        # dcp.save returns on every rank only after the coordinator gathered all ranks' write
        # results, i.e. every shard is written and fsynced (FileSystemWriter sync_files=True).
        metadata, error = _attempt(f"writing checkpoint step {step} into {tmp}", lambda: dcp_io.dcp.save(
            tensors, storage_writer=writer, planner=planner, process_group=group))
        self._raise_together(error)
        return commit(metadata)

    def _commit(self, root: Path, tmp: Path, step: int, writer, metadata, keep_last: int | None) -> Path:
        """Each rank checksums the shards it wrote; rank 0 writes the manifest with them, renames tmp
        into place, prunes; then all ranks agree.

        Collectives: a gather of the checksums, then one all_reduce (``_raise_together``), which
        also makes every rank wait until the checkpoint is published before save returns.
        """
        final = root / step_dir_name(step)
        checksums = self._gather_checksums(tmp, writer.local_files()) if self.checksums else None

        def publish():
            manifest = layout.build_manifest(tmp, step, writer.written, metadata, checksums)
            layout.write_json(tmp / layout.MANIFEST, manifest)
            layout.publish(tmp, final)
            if keep_last is not None:
                layout.prune(root, keep_last, just_saved=final)

        _, error = _attempt("committing " + str(final), publish) if _rank() == 0 else (None, None)
        self._raise_together(error)
        return final

    def _gather_checksums(self, tmp: Path, local_files: list[str]) -> dict[str, str] | None:
        """Rank 0: every shard's checksum, each computed by the rank that wrote it (the bytes are
        still in its page cache), gathered on the control group. Other ranks: None."""
        mine, error = _attempt(f"checksumming the shards in {tmp}",
                               lambda: {name: layout.file_checksum(tmp / name) for name in local_files})
        self._raise_together(error)
        if not _distributed():
            return mine
        gathered = [None] * dist.get_world_size() if _rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=self._group("control"))
        return {name: crc for part in gathered for name, crc in part.items()} if _rank() == 0 else None

    def verify(self, path: Path) -> str | None:
        """Whether every shard of the checkpoint at ``path`` still has the checksum saved with it: None,
        or the first mismatch's message, the same on every rank. Each rank reads its share of the
        files (a second read of the checkpoint, spread over the ranks). Collective: one all_reduce,
        two broadcasts if something failed.
        """
        path = Path(path)
        manifest = layout.read_manifest(path)
        names = sorted(manifest["files"])[_rank()::dist.get_world_size() if _distributed() else 1]
        found, error = _attempt(f"verifying {path}", layout.checksum_mismatch, path, manifest, names)
        try:
            self._raise_together(error or found)
        except CheckpointError as mismatch:
            return str(mismatch)
        return None

    def load(self, path: Path, tensors: dict[str, torch.Tensor], verified: bool = False) -> dict:
        """Load the checkpoint at ``path`` IN PLACE into ``tensors``; return its meta dict.

        ``tensors`` may be any subset of the saved keys (e.g. the model only), as DTensors on
        any mesh or plain tensors: DCP reads each rank's chunks from whichever shards hold them.
        Values are cast to the target dtype by ``copy_``.

        Before any data is read: rank 0 checks every shard (present, size as saved, valid
        safetensors header); each rank checks meta.json, its keys and global shapes against the
        manifest; unless ``verified``, the shards' checksums (``verify``). Any failure raises
        CheckpointError on all ranks.

        Collectives: a pre-check all_reduce, DCP's plan exchange, DCP's final gather.
        """
        self.wait()
        path = Path(path)
        shapes = {key: tuple(t.shape) for key, t in tensors.items()}  # DTensor.shape is the global shape
        _, error = _attempt("validating " + str(path), _validate, path, shapes)
        self._raise_together(error)
        mismatch = None if verified else self.verify(path)
        if mismatch:
            raise CheckpointError(mismatch)

        dcp_io = _dcp()
        reader = dcp_io.HuggingFaceStorageReader(str(path))
        _, error = _attempt(f"reading checkpoint {path}", lambda: dcp_io.dcp.load(
            tensors, storage_reader=reader, planner=dcp_io.DefaultLoadPlanner(), process_group=self._group("io")))
        self._raise_together(error)
        return layout.read_json(path / layout.META)


class AsyncCheckpoint:
    """Handle of an async save. ``wait()`` (collective: call it on every rank) waits for the
    shard writes, then commits (rename into place, prune) and returns the checkpoint path.
    The checkpointer's next save, load or ``wait`` calls it for you if you have not."""

    def __init__(self, future, commit, raise_together):
        self._future, self._commit, self._raise_together, self._result = future, commit, raise_together, None

    def done(self) -> bool:
        """True when the shards are written (the commit still needs ``wait()``)."""
        return self._result is not None or self._future.done()

    def wait(self) -> Path:
        if self._result is None:
            metadata, error = _attempt("writing an async checkpoint", self._future.result)
            self._raise_together(error)
            self._result = self._commit(metadata)
        return self._result


# ---- checks and reads without collectives --------------------------------------------------

def _check_save_args(step, tensors, meta, keep_last) -> str | None:
    if not isinstance(step, int) or step < 0:
        return f"step must be an int >= 0, got {step!r}"
    if keep_last is not None and keep_last < 1:
        return f"keep_last must be >= 1 (or None to keep all), got {keep_last}"
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        return f"tensors must be a flat dict str -> Tensor; bad entries: {bad[:5]} (flatten nested state first)"
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        return f"meta is not JSON-serializable ({e}): store RNG states etc. as lists of ints"
    nonfinite = [name for name, value in tensors.items() if not _all_finite(value)]
    if nonfinite:
        return (f"refusing to save step {step}: {len(nonfinite)} tensor(s) hold NaN or infinite values "
                f"(e.g. {nonfinite[:3]}); the existing checkpoints are kept")
    return None


def _all_finite(tensor: torch.Tensor) -> bool:
    """This rank's part of ``tensor`` has no NaN or infinity (integer tensors always pass)."""
    local = local_tensor(tensor)
    return not local.is_floating_point() or bool(torch.isfinite(local).all())


def _prepare_tmp(root: Path, tmp: Path, meta: dict) -> None:
    """Rank 0: a fresh tmp dir with meta.json (leftovers of crashed saves removed)."""
    root.mkdir(parents=True, exist_ok=True)
    layout.remove_stale_tmp(root)
    tmp.mkdir()
    layout.write_json(tmp / layout.META, meta)


def find_latest_checkpoint(root: Path) -> Path | None:
    """The newest COMPLETE checkpoint under ``root`` (``step_N`` with COMPLETE.json), else None.

    Reads the directory only; no collective. Unfinished (``.tmp-``) and half-pruned
    (``.trash-``) directories are ignored.
    """
    found = layout.complete_checkpoints(Path(root))
    return found[-1] if found else None


def read_checkpoint_meta(path: Path) -> dict:
    """The ``meta.json`` of the complete checkpoint at ``path``, read without loading any tensor.

    No collective (every rank may read it). CheckpointError says why ``path`` is not a
    complete checkpoint, or names the meta file when it is missing or not JSON, so a caller
    can check a checkpoint before loading it.
    """
    path = Path(path)
    layout.read_manifest(path)  # a complete checkpoint, or a CheckpointError saying why not
    return _read_meta(path)


def _read_meta(path: Path) -> dict:
    meta_file = path / layout.META
    try:
        return layout.read_json(meta_file)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing: the checkpoint's training state (step, data position, "
                              f"LR schedule) is lost; resume from another checkpoint") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_file} cannot be read as JSON ({err}); resume from another checkpoint") from None


def _validate(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    manifest = layout.read_manifest(path)
    _read_meta(path)
    if _rank() == 0:
        layout.check_shard_files(path, manifest)
    layout.check_requested(path, manifest, shapes)
