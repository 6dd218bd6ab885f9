"""Process-group start and clean exit, the same under torchrun, srun + torchrun, or plain python.

Backend and device are chosen from the hardware: NCCL and one GPU per rank where CUDA
is available, gloo on the CPU elsewhere. ``python -m train`` without torchrun runs as a
world of one, so the code path is the same as on a cluster.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from core.failures import enable_flight_recorder

from .config import DEVICES


def check_device(choice: str) -> None:
    """ValueError unless ``--device choice`` can run here (no CUDA call beyond availability)."""
    if choice not in DEVICES:
        raise ValueError(f"--device {choice!r}: use one of {', '.join(DEVICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible: use --device cpu (or auto)")


def device_type(choice: str) -> str:
    """``"cuda"`` or ``"cpu"``: what ``--device choice`` runs on here."""
    check_device(choice)
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(choice: str) -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is available, else the CPU."""
    if device_type(choice) == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def world_size_from_env() -> int:
    """The world size torchrun announced, known before any process group exists (for early validation)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def _single_process_env() -> None:
    """Let ``python -m train`` (no torchrun) form a world of one on a free local port."""
    if "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def cpu_threads_per_rank() -> int:
    """Intra-op threads for a CPU rank: ``OMP_NUM_THREADS`` when set, else this machine's usable
    cores shared evenly by the ranks on it (torchrun's LOCAL_WORLD_SIZE), so one process uses
    every core and N ranks do not oversubscribe them."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_distributed(device: torch.device, timeout_s: int) -> None:
    """Join the default process group (no-op if already joined, e.g. inside tests).

    ``timeout_s`` bounds every collective: a rank whose peer died fails with an error
    instead of waiting forever (torchrun then stops the remaining ranks).
    """
    if dist.is_initialized():
        return
    _single_process_env()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank())
    backend = "nccl" if device.type == "cuda" else "gloo"
    enable_flight_recorder()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = agent_store_of_this_attempt(timeout)
    rank_and_size = {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])} if store else {}
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                            store=store, **rank_and_size)


def agent_store_of_this_attempt(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun's shared rendezvous store, this restart attempt's own namespace of it; else None
    (``init_process_group`` reads MASTER_ADDR/PORT itself).

    torchrun (c10d rendezvous) lets the workers share its agent's TCPStore
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and that store outlives a restart: the workers of
    attempt 1 find the keys attempt 0 wrote, such as the gloo/NCCL addresses of ranks that are
    dead, and init fails connecting to them (pytorch/pytorch#135712). Prefixing the keys with
    the attempt keeps attempts apart. The attempt number (``TORCHELASTIC_RESTART_COUNT``) is
    each agent's own count, consistent only when one agent started every worker; on several
    nodes a restart is refused with the fix: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (what
    examples/slurm/train.sbatch sets), which gives every attempt a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt > 0 and int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        raise ValueError(f"this is torchrun restart attempt {attempt} on several nodes sharing torchrun's rendezvous "
                         "store, which keeps the dead attempt's addresses (pytorch/pytorch#135712) and whose "
                         "restart counts differ per node: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                         "torchrun's environment (examples/slurm/train.sbatch does)")
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"meshtron/attempt_{attempt}", shared)


def shutdown_and_exit(code: int) -> None:
    """Destroy the process group and leave with ``os._exit``.

    Normal interpreter exit after gloo sometimes aborts ("terminate called without an
    active exception"), turning a good run into a failed one; this exit is clean.
    """
    if dist.is_initialized():
        try:
            if code == 0:
                # Rank 0 hosts the rendezvous store; a rank still talking to it would
                # see "connection reset" if rank 0 left first.
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - we are leaving anyway
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
