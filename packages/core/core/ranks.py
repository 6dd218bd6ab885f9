"""Run a function on N gloo ranks in forked processes and collect what each returns.

Tests and benchmarks use this instead of torchrun when they want Python objects back (a
parity check of your own: ``train.parity``). Ranks are forked from a forkserver that imports
``preload`` once per calling process, so a rank starts in milliseconds instead of the seconds
a fresh interpreter spends importing torch; it gets the caller's environment as it is at the
call, as a spawned process would. Each rank:
  - gets RANK/WORLD_SIZE/MASTER_* in its environment and one intra-op thread,
  - joins a gloo process group (timeout bounded, so a broken test fails instead of hanging),
  - runs ``fn(*args)`` and writes the result (or its traceback) to a file,
  - destroys the process group and leaves with ``os._exit`` (gloo can abort at normal
    interpreter exit, see shared/TORCH-CPU-NOTES.md).
The parent kills every rank as soon as one fails or the deadline passes. (The working folder
follows the caller by itself: multiprocessing sends it with every process it starts.)
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

# Imported once by the forkserver, before it forks any rank (callers add their own heavy imports).
TORCH_PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, environ: dict, fn: Callable,
               args: tuple) -> None:
    import torch.distributed as dist

    os.environ.clear()  # the caller's environment now, not the forkserver's from when it started
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=300))
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"result{rank}.pt")
        # Rank 0 hosts the TCPStore that group creation goes through; leaving before the
        # others are done would reset their connections ("Connection reset by peer").
        dist.barrier()
    except BaseException:  # noqa: BLE001 - CheckpointException derives from BaseException
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def forkserver(preload: tuple[str, ...] = TORCH_PRELOAD):
    """The multiprocessing context whose processes fork from a server that imported ``preload``
    (it takes effect when the server starts: this process's first call)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0,
                 preload: tuple[str, ...] = TORCH_PRELOAD) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    ``fn`` must be importable (a module-level function). Raises RuntimeError carrying the
    first failing rank's traceback, or a timeout error; no process outlives the call.
    """
    ctx = forkserver(preload)
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, out_dir, dict(os.environ), fn, args),
                             daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure = None
        while any(p.is_alive() for p in procs):
            errors = sorted(Path(out_dir).glob("error*.txt"))
            if errors:
                time.sleep(2.0)  # let the other ranks report their own errors
                reports = sorted(Path(out_dir).glob("error*.txt"))
                failure = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in reports)
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {timeout:.0f}s (a rank is probably stuck in a collective)"
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        if failure is None:
            errors = sorted(Path(out_dir).glob("error*.txt"))
            if errors:
                failure = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors)
        if failure is None:
            bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
            if bad:
                failure = f"ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}"
        if failure is not None:
            raise RuntimeError(f"distributed test failed on {world_size} ranks:\n{failure}")
        return [torch.load(Path(out_dir) / f"result{r}.pt", weights_only=False) for r in range(world_size)]
