"""A run's folder: ``outputs/<run name>``, one run per folder, and the file that reruns it.

* ``--run-name NAME`` puts the run in ``outputs/NAME`` (``--output-dir`` names any folder
  instead). Without either, a run gets a new folder, ``outputs/<model>-<date>-<time>``, unless
  ``--resume PATH`` points into an earlier run's ``checkpoints/``: that run continues in its
  own folder. ``--resume auto`` (the default) looks for checkpoints only inside the run's folder,
  so a new run never picks up an unrelated one's state.
* ``outputs/latest`` is a symbolic link to the newest run started under ``outputs/``.
* ``config.toml`` in the folder holds every option of the run except its name and folder;
  ``python -m train --config outputs/NAME/config.toml`` trains the same run again, in a new folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from .config import TrainConfig, to_toml

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


def agree_on_run_dir(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``output_dir`` and ``run_name`` filled in, the same on every rank.

    A new name is drawn on rank 0 and sent to the others (one ``broadcast_object_list``):
    ranks start a moment apart, so each drawing its own name from the clock could disagree.
    """
    run_dir = requested_run_dir(cfg)
    if run_dir is None:
        chosen = [str(new_run_dir(cfg.model)) if dist.get_rank() == 0 else None]
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
