"""Turning the ways a collective or a checkpoint write fails into one readable sentence.

Nothing here issues a collective: these functions run after one has already failed. The
rendezvous store (the TCPStore torchrun's agent or rank 0 hosts) is the one channel that
still works when a peer rank hangs, so the ranks that are alive mark themselves there and
each names the ranks that did not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

# How gloo and NCCL word a timed-out collective.
TIMEOUT_WORDS = ("Timed out waiting", "timed out", "Watchdog caught collective operation timeout")


def is_collective_timeout(err: BaseException) -> bool:
    """A collective (or its transport) gave up waiting for a peer."""
    return isinstance(err, RuntimeError) and any(words in str(err) for words in TIMEOUT_WORDS)


def silent_ranks(wait_s: float) -> list[int] | None:
    """The ranks that did not reach this point within ``wait_s`` seconds; None if the store is gone too.

    Every rank that hits a timeout calls this: it marks itself alive in the default process
    group's store, then waits for the others' marks. Those still missing are the silent ranks
    (hung, stopped, or dead). No collective.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted group has its own marks
        key = f"meshtron/alive/{attempt}/{{}}".format
        store.set(key(dist.get_rank()), "1")
        deadline = time.monotonic() + wait_s
        missing = list(range(dist.get_world_size()))
        while missing and time.monotonic() < deadline:
            missing = [rank for rank in missing if not store.check([key(rank)])]
            time.sleep(0.1)
        return missing
    except Exception:  # noqa: BLE001 - a diagnosis must never raise
        return None


def timeout_message(err: BaseException, wait_s: float) -> str:
    """One line for a timed-out collective on this rank, naming the silent ranks where the store can tell."""
    silent = silent_ranks(wait_s)
    if silent:
        who = f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} stopped answering (hung, stopped or dead)"
    elif silent == []:
        who = "every rank is still alive, so they wait in different collectives (a desynchronized program)"
    else:
        who = "the rendezvous store is unreachable too (its host, rank 0 or the launcher, is gone)"
    first_line = str(err).strip().splitlines()[0]
    return f"rank {dist.get_rank()}: a collective timed out (--dist-timeout-s): {who}. {first_line}"


def checkpoint_failure_message(what: str, err: BaseException) -> str:
    """``what`` failed, in one line: DCP's CheckpointException carries each rank's exception and a
    traceback; the cause is the first rank's exception (e.g. ``[Errno 28] No space left on device``)."""
    failures = getattr(err, "failures", None)
    if failures:
        rank = min(failures)
        cause = failures[rank][0]
        return f"{what} failed on rank {rank}: {_one_line(cause)}"
    return f"{what} failed: {_one_line(err)}"


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror} [errno {err.errno}]{where}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class CollectiveTimeout(Exception):
    """A collective timed out on this rank; the message is the one line to print."""


# torch's flight recorder keeps the last entries of every process group's collectives (name,
# sequence number, state); set before the process group starts so a timeout can be explained.
FLIGHT_RECORDER_ENTRIES = "2000"


def enable_flight_recorder() -> None:
    """Record collectives (``TORCH_FR_BUFFER_SIZE``) unless the user chose otherwise. Before init."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)


def dump_flight_record(folder: Path) -> Path | None:
    """Write this rank's flight-recorder entries to ``folder/flight_recorder/rank<R>.json``: which
    collective of which group it was in, and each one's state. Compare the ranks' last sequence
    numbers to see where they parted. None if nothing was recorded or the write failed."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        path = Path(folder) / "flight_recorder" / f"rank{dist.get_rank()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_dump_fr_trace_json(True, True))
        return path
    except Exception:  # noqa: BLE001 - a diagnosis must never raise
        return None
