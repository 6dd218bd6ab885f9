"""A run's folder: ``outputs/<run name>``, one run per folder, and the file that reruns it.

* ``--run-name NAME`` puts the run in ``outputs/NAME`` (``--output-dir`` names any folder
  instead). Without either, a run gets a new folder, ``outputs/<model>-<date>-<time>``, unless
  ``--resume PATH`` points into an earlier run's ``checkpoints/``: that run continues in its
  own folder. Under torchrun the new name is ``<model>-<rendezvous id>`` instead, the same
  in every restart attempt of the launch, so a restarted group resumes its own run.
  ``--resume auto`` (the default) looks for checkpoints only inside the run's folder, so a new
  run never picks up an unrelated one's state.
* ``outputs/latest`` is a symbolic link to the newest run started under ``outputs/``.
* One run per folder: ``RunLock`` refuses a second concurrent run, naming the first one's host
  and pid; a dead run's lock does not block a resume.
* ``config.toml`` in the folder holds every option of the run except its name and folder;
  ``python -m train --config outputs/NAME/config.toml`` trains the same run again, in a new folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from .config import TrainConfig, to_toml
from .model_source import model_label

RUNS_ROOT = Path("outputs")
LATEST = "latest"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# the options that say where a run lives, not what it computes: config.toml leaves them out
RUN_IDENTITY = ("run_name", "output_dir")


def check_run_name(name: str) -> None:
    """ValueError unless ``--run-name`` is a plain folder name (no collective)."""
    if name and (not RUN_NAME.fullmatch(name) or name == LATEST):
        raise ValueError(f"--run-name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or "
                         f"digit), not a path and not {LATEST!r}")


def requested_run_dir(cfg: TrainConfig) -> Path | None:
    """The folder the options name, or None when the run needs a new one."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.run_name:
        return RUNS_ROOT / cfg.run_name
    if cfg.resume not in ("auto", "none"):
        return run_dir_of_checkpoint(Path(cfg.resume))
    return None


def run_dir_of_checkpoint(path: Path) -> Path | None:
    """``RUN/checkpoints`` or ``RUN/checkpoints/step_X`` -> ``RUN``; None for a checkpoint kept elsewhere."""
    path = path.expanduser()
    if path.name == "checkpoints":
        return path.parent
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def new_run_dir(model: str) -> Path:
    """``outputs/<model>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... if that exists already."""
    base = f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = RUNS_ROOT / base, 1
    while candidate.exists():
        n += 1
        candidate = RUNS_ROOT / f"{base}-{n}"
    return candidate


def launch_id() -> str | None:
    """torchrun's rendezvous id (``--rdzv-id``, or the uuid ``--standalone`` draws) as a folder-name
    part, the same for every rank and every restart attempt; None outside torchrun or without an id."""
    raw = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if raw in ("", "none"):
        return None
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", raw)
    return cleaned[:8] if len(cleaned) > 16 else cleaned  # a uuid's first 8 characters tell launches apart


def agree_on_run_dir(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``output_dir`` and ``run_name`` filled in, the same on every rank.

    Under torchrun a new run is named after the launch (``launch_id``). Otherwise a new name is
    drawn on rank 0 and sent to the others (one ``broadcast_object_list``): ranks start a moment
    apart, so each drawing its own name from the clock could disagree.
    """
    run_dir = requested_run_dir(cfg)
    if run_dir is None and launch_id():
        run_dir = RUNS_ROOT / f"{model_label(cfg)}-{launch_id()}"
    if run_dir is None:
        chosen = [str(new_run_dir(model_label(cfg))) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        run_dir = Path(chosen[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    return replace(cfg, output_dir=str(run_dir), run_name=cfg.run_name or run_dir.name)


def write_run_config(cfg: TrainConfig) -> Path:
    """Write ``<output_dir>/config.toml`` (atomically): every option that defines the run."""
    path = Path(cfg.output_dir) / "config.toml"
    header = (f"# Meshtron run {cfg.run_name!r}. Rerun it in a new folder with:\n"
              f"#   python -m train --config {path}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + to_toml(cfg, leave_out=RUN_IDENTITY), encoding="utf-8")
    os.replace(tmp, path)
    return path


def point_latest_at(run_dir: Path) -> None:
    """Make ``outputs/latest`` a link to ``run_dir`` when the run lives under ``outputs/`` (best effort:
    a file system without symbolic links just has no ``latest``)."""
    if run_dir.resolve().parent != RUNS_ROOT.resolve():
        return
    link, tmp = RUNS_ROOT / LATEST, RUNS_ROOT / f".{LATEST}.{os.getpid()}"
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)  # atomic: a reader sees the old link or the new one


LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0     # the lock holder touches the lock this often
STALE_AFTER_S = 180.0  # a lock untouched this long, from another host, belongs to a dead run


class RunLock:
    """One run per folder: ``<run folder>/.lock``, created exclusively by global rank 0.

    The file holds the holder's host, pid, launch (torchrun's rendezvous id) and start time,
    and a heartbeat thread touches it every ``HEARTBEAT_S``. A lock is stale, and is taken
    over, when its pid is dead on this host, when it belongs to this same torchrun launch (a
    restart attempt), or when it has not been touched for ``STALE_AFTER_S`` (a holder on a
    host that is gone). Exclusive creation (``O_CREAT | O_EXCL``) is atomic on local disks,
    NFSv3+, Lustre and GPFS; on a file system where it is not, two runs starting in the same
    instant could both pass.
    """

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def try_acquire(self) -> str | None:
        """Take the lock (no collective); None, or why not as the error a user sees."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "launch": launch_id(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    return (f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                            f"{holder.get('pid')}, since {holder.get('started')}): pick another --run-name, or wait "
                            f"for it to end; if that run is dead, delete {self.path}")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as out:
                json.dump(me, out)
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()
            return None
        return f"{self.path} keeps reappearing: another run is starting in {self.path.parent} right now"

    def release(self) -> None:
        if self._heartbeat is not None:
            self._stop.set()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._heartbeat = None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _holder(self) -> dict | None:
        try:
            return {**json.loads(self.path.read_text()), "touched": self.path.stat().st_mtime}
        except (OSError, ValueError):
            return None  # vanished or half-written: treat as free

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("launch") and holder.get("launch") == launch_id():
            return True  # an earlier attempt of this same torchrun launch
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", 0)))
        return time.time() - holder["touched"] > STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return pid > 0


def lock_run_dir(cfg: TrainConfig) -> RunLock:
    """Rank 0 takes the run folder's lock; every rank learns the outcome (one ``broadcast_object_list``)
    and raises the same ValueError if another run holds it. Release it with ``.release()`` (rank 0)."""
    lock = RunLock(Path(cfg.output_dir) / LOCK_FILE)
    refusal = [lock.try_acquire() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise ValueError(refusal[0])
    return lock
