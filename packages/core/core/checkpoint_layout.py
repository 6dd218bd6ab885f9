"""On-disk layout of Meshtron checkpoints: names, the completion manifest, atomic commit, pruning.

Everything here is plain file-system work done by ONE process (rank 0, or the only process);
no function in this file issues a collective. ``checkpoint.py`` decides who calls what.

Layout under a checkpoint root::

    root/
      step_00000100/                      a COMPLETE checkpoint (it has COMPLETE.json)
        shard-00001-model-00001-of-00001.safetensors   one file per rank that wrote data
        shard-00002-model-00001-of-00001.safetensors   (DCP's HuggingFaceStorageWriter names)
        meta.json                         the caller's JSON meta (step, data position, RNG, ...)
        COMPLETE.json                     written last: the manifest (files + sizes + CRC-32s, tensor shapes)
      .tmp-step_00000200/                 a save in progress, or one that crashed: ignored
      .trash-step_00000050/               a checkpoint being deleted by pruning: ignored

A checkpoint becomes visible in ONE atomic step: ``rename(.tmp-step_N, step_N)``. Its
COMPLETE.json is written (and fsynced) inside the tmp dir before that rename, so a
directory called ``step_N`` with a COMPLETE.json always holds every file the manifest lists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

FORMAT = "meshtron-dcp-safetensors/1"
MANIFEST = "COMPLETE.json"
META = "meta.json"
SHARD_SUFFIX = ".safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded. The message says what is wrong and how to fix it.

    Raised on every rank together (see ``checkpoint._raise_together``), so no rank is left
    waiting in a collective.
    """


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def step_of(path: Path) -> int | None:
    """The step of a ``step_N`` directory name, else None."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return step_of(path) is not None and (path / MANIFEST).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


# ---- durable writes ---------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    """Make the directory's entries (created / renamed files) durable, not just the files' bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it. ``allow_nan=False``: NaN/inf is not JSON other tools can read."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- the manifest -----------------------------------------------------------------------

CHECKSUM = "crc32"  # zlib's: catches flipped bits and torn copies cheaply (not tampering)
CHECKSUM_CHUNK = 8 * 2**20


def file_checksum(path: Path) -> str:
    """CRC-32 of a file's bytes, read in 8 MiB chunks, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_mismatch(path: Path, manifest: dict, names: list[str]) -> str | None:
    """The first of ``names`` (shards of the checkpoint at ``path``) whose bytes no longer match the
    checksum saved with them, as an error message; None when they all match. A manifest from before
    checksums (none recorded) passes."""
    saved = manifest.get("checksums", {})
    for name in names:
        if name in saved and file_checksum(path / name) != saved[name]:
            return (f"checkpoint {path}: shard {name} does not match the checksum saved with it: its bytes changed "
                    f"after the save (bit rot, a partial copy); restore it or resume from an older checkpoint")
    return None


def build_manifest(directory: Path, step: int, files: set[str], dcp_metadata: Any,
                   checksums: dict[str, str] | None = None) -> dict:
    """Describe what ``dcp.save`` wrote into ``directory``: shard files (with sizes) and tensors.

    ``files`` comes from DCP's write results (every rank's, gathered by the coordinator),
    not from listing the directory, so a shard that is not (yet) visible to rank 0 fails the
    save here instead of producing a silently incomplete checkpoint. Shapes and dtypes come
    from the global Metadata that ``dcp.save`` returns.
    """
    sizes = {}
    for name in sorted(files):
        shard = directory / name
        if not shard.is_file():
            raise CheckpointError(
                f"shard {name} that DCP reports as written is not visible in {directory}: "
                f"the checkpoint directory must be on a file system shared by all ranks")
        sizes[name] = shard.stat().st_size
    tensors = {key: {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
               for key, md in dcp_metadata.state_dict_metadata.items()}
    manifest = {"format": FORMAT, "step": step, "files": sizes, "tensors": tensors}
    if checksums is not None:
        manifest.update(checksum=CHECKSUM, checksums=dict(sorted(checksums.items())))
    return manifest


def read_manifest(path: Path) -> dict:
    """The manifest of a complete checkpoint, or CheckpointError saying why ``path`` is not one."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (find_latest_checkpoint(root) "
                              f"returns the newest complete checkpoint, or None)")
    if step_of(path) is None or not (path / MANIFEST).is_file():
        hint = ""
        if complete_checkpoints(path):
            hint = f"; it looks like a checkpoint ROOT: pass find_latest_checkpoint({str(path)!r}) instead"
        elif path.name.startswith(".tmp-"):
            hint = "; this is an unfinished save (the job stopped before the commit)"
        raise CheckpointError(f"{path} is not a complete checkpoint (no step_N directory with {MANIFEST}){hint}")
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST} is unreadable ({e}): the checkpoint is damaged, "
                              f"load an older one") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest


def check_shard_files(path: Path, manifest: dict) -> None:
    """Every shard is present, has the size it had when saved, and has a valid safetensors header.

    ``safe_open`` parses only the JSON header and checks that the data it describes exactly
    covers the file, so a truncated or overwritten shard fails here, with its name, before DCP
    starts reading (where a failure would surface as an opaque error from one rank).
    """
    from safetensors import safe_open

    on_disk = {p.name for p in path.glob("*" + SHARD_SUFFIX)}
    for name, size in manifest["files"].items():
        shard = path / name
        if name not in on_disk:
            raise CheckpointError(f"shard {name} is missing from {path}: the checkpoint is incomplete "
                                  f"(copied partially?); restore the file or load an older checkpoint")
        actual = shard.stat().st_size
        if actual != size:
            raise CheckpointError(f"shard {shard} has {actual} bytes but was saved with {size}: it is "
                                  f"truncated or corrupt; restore it or load an older checkpoint")
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"shard {shard} is not a valid safetensors file ({e}); "
                                  f"restore it or load an older checkpoint") from None
    extra = on_disk - set(manifest["files"])
    if extra:
        # HuggingFaceStorageReader reads EVERY *.safetensors in the directory.
        raise CheckpointError(f"{path} holds safetensors files the checkpoint did not write: {sorted(extra)}; "
                              f"remove them (the reader would mix them into the checkpoint)")


def check_requested(path: Path, manifest: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every key the caller loads into exists in the checkpoint with the same global shape."""
    saved = manifest["tensors"]
    missing = sorted(set(shapes) - set(saved))
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) to load are not in checkpoint {path}: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; the model config (or parallel wrapping) differs "
            f"from the run that saved it, e.g. a renamed or added layer")
    for key, shape in shapes.items():
        if list(shape) != saved[key]["shape"]:
            raise CheckpointError(
                f"shape mismatch for {key!r}: checkpoint {path.name} has {tuple(saved[key]['shape'])}, "
                f"the tensor to load into has {tuple(shape)}; the model config (hidden size, vocab, "
                f"layers, ...) differs from the run that saved it")


# ---- commit and pruning (rank 0 only) -----------------------------------------------------

def publish(tmp: Path, final: Path) -> None:
    """The commit point: one atomic rename makes the finished tmp dir the checkpoint.

    A complete checkpoint of the same step (a re-save after resume) is moved aside first,
    because rename() cannot replace a non-empty directory; it is deleted afterwards.
    """
    fsync_dir(tmp)
    replaced = None
    if final.exists():
        replaced = final.parent / f".trash-{final.name}-replaced"
        _remove(replaced)
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if replaced is not None:
        _remove(replaced)


def prune(root: Path, keep_last: int, just_saved: Path) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the newest, never
    ``just_saved``), and leftovers of crashed saves/prunes. Returns the deleted checkpoints."""
    complete = complete_checkpoints(root)
    keep = set(complete[-max(keep_last, 1):]) | {just_saved}
    deleted = [p for p in complete if p not in keep]
    for path in deleted:
        # Rename first: a crash during rmtree then leaves an ignored .trash dir, never a
        # step_N dir that still has COMPLETE.json but lost some shards.
        trash = root / f".trash-{path.name}"
        _remove(trash)
        os.rename(path, trash)
        _remove(trash)
    for leftover in root.glob(".trash-*"):
        _remove(leftover)
    return deleted


def remove_stale_tmp(root: Path) -> None:
    """Delete ``.tmp-*`` dirs of saves that crashed (only one save runs at a time)."""
    for leftover in root.glob(".tmp-step_*"):
        _remove(leftover)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
