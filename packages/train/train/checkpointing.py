"""What the trainer saves and restores, on top of ``core.checkpoint``.

Tensors (safetensors shards, resharded on load): the model's parameters by FQN and the
AdamW state as ``optim.<fqn>.exp_avg`` / ``exp_avg_sq`` / ``step``.
JSON (``meta.json``): step, tokens seen, the data position, the LR schedule, the RNG
state, the model and training config, the mesh it was saved on, the W&B run id.

Resuming restores all of it, so the run continues exactly as if it had never stopped:
the same batches, the same learning rates, the same weights and optimizer moments. On a
different mesh the tensors are resharded by DCP and the data position (a count of global
samples) means the same thing, so the run continues with the same global batches.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    model_tensors,
    optimizer_tensors,
    read_checkpoint_meta,
)
from core.checkpoint_layout import complete_checkpoints, is_complete

from .model_source import model_label
from .optim import build_scheduler, lr_lambda


def checkpoint_root(cfg) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def state_tensors(t) -> dict[str, torch.Tensor]:
    """Flat name -> (D)Tensor view of the model and optimizer; aliases the live storage.

    Under pipeline parallel the names are the whole model's (``layers.5...``), not those of
    the rank's list of stages (``1.layers.5...``), so a checkpoint loads on any pp/schedule.
    """
    module = t.model.module
    return t.model.whole_model_names({**model_tensors(module), **optimizer_tensors(t.optimizer, module)})


def training_meta(t, wandb_run_id: str | None) -> dict:
    """The JSON half of a checkpoint (rank 0's copy is written; it is the same on every rank)."""
    return {
        "step": t.step,
        "skipped_steps": t.skipped_steps,
        "tokens_seen": t.step * t.cfg.global_batch_size * t.cfg.seq_len,
        "data": t.batches.state_dict(),
        "lr_schedule": t.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state().tolist()},
        "model_name": model_label(t.cfg),
        "model_config": dataclasses.asdict(t.model_config),
        "train_config": t.cfg.to_dict(),
        "mesh": str(t.model.mesh.shape),
        "wandb_run_id": wandb_run_id,
    }


def save(t, wandb_run_id: str | None):
    """Save the current state as ``<output_dir>/checkpoints/step_XXXXXXXX`` (collective)."""
    return t.checkpointer.save(checkpoint_root(t.cfg), t.step, state_tensors(t), training_meta(t, wandb_run_id),
                               keep_last=t.cfg.keep_checkpoints or None, async_save=t.cfg.async_checkpoint)


def save_and_report(t, wandb_run_id: str | None):
    """``save``, then one line on global rank 0: the checkpoint's size and the seconds training waited.
    Returns what ``save`` does (a path, or the async save's handle)."""
    start = time.perf_counter()
    try:
        saved = save(t, wandb_run_id)
    except CheckpointError as err:  # every rank raises it together
        raise CheckpointError(f"{err}. The newest complete checkpoint, {latest_checkpoint(t.cfg) or 'none'}, is "
                              f"intact: fix the folder (space, permissions) and resume from it") from None
    seconds = time.perf_counter() - start
    if dist.get_rank() != 0:
        return saved
    if isinstance(saved, Path):
        size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
        print(f"saved {saved} ({size / 2**20:.1f} MiB in {seconds:.2f} s)", flush=True)
    else:
        print(f"saving step {t.step} in the background (training waited {seconds:.2f} s)", flush=True)
    return saved


def should_save(t) -> bool:
    every = t.cfg.checkpoint_every
    return every > 0 and (t.step % every == 0 or t.step == t.cfg.steps)


def latest_checkpoint(cfg) -> Path | None:
    """The newest complete checkpoint of this run's output dir, or None. No collective."""
    return find_latest_checkpoint(checkpoint_root(cfg))


def resolve_resume_path(cfg) -> list[Path]:
    """The checkpoints to try resuming from, newest first, decided on rank 0 and broadcast (the file
    system may lag on others); empty: start fresh.

    ``none``: start fresh. ``auto``: the complete checkpoints in ``<output_dir>/checkpoints``
    (``first_intact`` takes the newest that passes its checksums), or a fresh start if there is
    none. A path: that checkpoint, or the newest complete one under it; an error if there is
    none. A fresh start in a folder whose ``metrics.jsonl`` already holds another run's steps is
    an error: two runs' rows must never mix. Collective: one broadcast_object_list.
    """
    decision: list = [[], None]  # [paths, error message or None]
    if dist.get_rank() == 0:
        decision = _find_resume_target(cfg)
        if decision == [[], None]:
            decision[1] = _another_run_in(Path(cfg.output_dir))
    dist.broadcast_object_list(decision, src=0)
    paths, error = decision
    if error:
        raise CheckpointError(error)
    return [Path(p) for p in paths]


def _find_resume_target(cfg) -> list:
    if cfg.resume == "none":
        return [[], None]
    if cfg.resume == "auto":
        return [[str(p) for p in reversed(complete_checkpoints(checkpoint_root(cfg)))], None]
    path = Path(cfg.resume)
    if path.is_dir() and is_complete(path):
        return [[str(path)], None]
    latest = find_latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        return [[], f"--resume {cfg.resume}: no complete checkpoint there (a step_XXXXXXXX folder with "
                    f"COMPLETE.json, or a folder holding some); use --resume auto or none to start fresh"]
    return [[str(latest)], None]


def first_intact(t, candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` whose shards match their checksums (collective: each check reads the
    checkpoint once, spread over the ranks). With ``--resume auto`` a damaged one is skipped, with a
    line saying so; a checkpoint named by ``--resume PATH`` must verify."""
    for candidate in candidates:
        problem = t.checkpointer.verify(candidate)
        if problem is None:
            return candidate
        if t.cfg.resume != "auto":
            raise CheckpointError(problem)
        if dist.get_rank() == 0:
            print(f"warning: {problem}; falling back to the next older checkpoint", file=sys.stderr, flush=True)
    if candidates:
        raise CheckpointError(f"no checkpoint in {checkpoint_root(t.cfg)} passes its checksums (see the warnings "
                              f"above): restore a shard, or start afresh with --resume none in a new run folder")
    return None


def _another_run_in(run_dir: Path) -> str | None:
    """The error for a fresh start in a folder that already logged a run, else None."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    return (f"{run_dir} already holds a run's metrics.jsonl but no checkpoint this run resumes from, so two runs "
            f"would mix there: pick a new --run-name (or leave it out for a new folder), or delete {run_dir} to "
            f"start over")


# The options that define the LR at every step: a resumed run must agree with its checkpoint on them.
LR_SCHEDULE_OPTIONS = ("lr", "min_lr_ratio", "warmup_steps", "steps")


def restore(t, path: Path, verified: bool = False) -> dict:
    """Load ``path`` into the trainer in place (collective) and return its meta. ``verified``: its
    checksums were just checked (``first_intact``), so loading does not read it twice.

    The checkpoint's meta.json is read and checked first (same model; the same LR at every
    remaining step unless ``--override-lr-schedule``), so a mismatch fails before any
    tensor is loaded.
    """
    meta = read_checkpoint_meta(path)
    saved_model = meta.get("model_config")
    if saved_model != dataclasses.asdict(t.model_config):
        raise CheckpointError(f"{path} holds a different model ({meta.get('model_name')}: {saved_model}) than "
                              f"--model {model_label(t.cfg)} ({dataclasses.asdict(t.model_config)}); "
                              f"resume with the same model")
    changed = schedule_changes(meta.get("train_config", {}), t.cfg, int(meta["step"]))
    if changed and not t.cfg.override_lr_schedule:
        raise CheckpointError(f"{path} was trained with {', '.join(changed)}: resuming would silently change the "
                              f"learning-rate schedule; pass the saved values, or --override-lr-schedule to "
                              f"continue on this run's schedule from step {meta['step']} (the LR may jump)")
    t.checkpointer.load(path, state_tensors(t), verified=verified)
    t.step = int(meta["step"])
    t.skipped_steps = int(meta.get("skipped_steps", 0))
    t.batches.load_state_dict(meta["data"])
    if changed:
        t.scheduler = build_scheduler(t.cfg, t.optimizer, t.step)
    else:
        t.scheduler.load_state_dict(meta["lr_schedule"])
    for group, lr in zip(t.optimizer.param_groups, t.scheduler.get_last_lr()):
        group["lr"] = lr  # the lr the next optimizer step uses
    torch.set_rng_state(torch.tensor(meta["rng"]["torch"], dtype=torch.uint8))
    return meta


def schedule_changes(saved: dict, cfg, from_step: int) -> list[str]:
    """``--lr 0.003 (now 0.001)``-style notes for the LR-schedule options this run changes, or []
    when the changes leave the LR of every remaining step as it was (e.g. more --steps while
    still inside the warmup)."""
    saved = {name: saved[name] for name in LR_SCHEDULE_OPTIONS if name in saved}
    changed = [name for name, value in saved.items() if value != getattr(cfg, name)]
    if not changed:
        return []
    old = dataclasses.replace(cfg, **saved)
    old_factor, new_factor = lr_lambda(old), lr_lambda(cfg)
    if all(old.lr * old_factor(s) == cfg.lr * new_factor(s) for s in range(from_step, cfg.steps)):
        return []
    return [f"--{name.replace('_', '-')} {saved[name]} (now {getattr(cfg, name)})" for name in changed]
