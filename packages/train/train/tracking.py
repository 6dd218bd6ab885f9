"""Experiment tracking: one JSON line per step, one readable console line, Weights & Biases, TensorBoard.

Only the logging rank (usually global rank 0) writes anything. W&B is optional and can never
stop training: if it cannot be imported, started or written to, the logger warns once and
keeps writing ``metrics.jsonl``. TensorBoard (``tensorboard=True``) gets the same scalars
under ``output_dir/tensorboard``; a resumed run continues the same event stream.

Metric names the console line knows how to format (others are printed as ``name value``):
``loss``, ``grad_norm``, ``lr``, ``tokens_per_sec``, ``mfu`` (a fraction), ``mem_peak_mib``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# console formats of the known metrics, in the order they are printed
CONSOLE_FORMATS = {
    "loss": lambda v: f"loss {v:.4f}",
    "grad_norm": lambda v: f"grad_norm {v:.3f}",
    "lr": lambda v: f"lr {v:.2e}",
    "tokens_per_sec": lambda v: f"tok/s {_si(v)}",
    "mfu": lambda v: f"mfu {100 * v:.1f}%",
    "mem_peak_mib": lambda v: f"mem {v / 1024:.2f}GiB",
}


@dataclass(frozen=True)
class WandbOptions:
    """Where a W&B run goes and what it is called (``--wandb-project`` etc.; empty: W&B's default)."""

    project: str = "meshtron"
    entity: str = ""
    name: str = ""
    tags: tuple[str, ...] = ()


def parse_tags(text: str) -> tuple[str, ...]:
    """``--wandb-tags "a, b,,c"`` -> ("a", "b", "c")."""
    return tuple(tag.strip() for tag in text.split(",") if tag.strip())


class MetricsLogger:
    """Writes ``output_dir/metrics.jsonl``, a console line per step, and, with ``wandb`` options,
    a W&B run whose files live in ``output_dir/wandb``.

    ``metrics.jsonl`` holds one run: given ``first_step`` (the trainer's next step), the logger first
    drops the rows of that step and later ones (what a stopped run logged after the checkpoint
    this one resumes from), then appends, so every step appears once.
    W&B decides online or offline itself (``wandb login`` or ``WANDB_API_KEY``, ``WANDB_MODE``).
    Store :attr:`run_id` in checkpoints and pass it back as ``wandb_run_id`` on restart:
    the run is resumed (``resume="allow"``) instead of a new one being started.
    """

    def __init__(self, output_dir: Path, config: dict, is_logging_rank: bool, wandb: WandbOptions | None = None,
                 wandb_run_id: str | None = None, total_steps: int | None = None,
                 tensorboard: bool = False, first_step: int | None = None):
        self.output_dir, self.is_logging_rank, self.total_steps = Path(output_dir), is_logging_rank, total_steps
        self._run_id = wandb_run_id
        self._run = None  # the wandb Run, while it works
        self._file = None
        self._tensorboard = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first log: the ETA's origin
        if not is_logging_rank:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.output_dir / "metrics.jsonl"
        if first_step is not None:
            _drop_rows_from(metrics, first_step)
        self._file = open(metrics, "a", encoding="utf-8")
        if wandb is not None:
            self._guard("start", self._start_wandb, config, wandb)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what the stopped one logged after its checkpoint,
            # so the event stream reads as one run, like metrics.jsonl.
            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=first_step)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (None without W&B); save it with the checkpoint to resume the same run."""
        return self._run.id if self._run is not None else self._run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of one optimizer step (values may be floats, ints or 0-d tensors)."""
        if not self.is_logging_rank:
            return
        now = time.time()
        values = {name: _plain(value) for name, value in metrics.items()}
        row = {"step": step, "time": now, **{name: _json_safe(value) for name, value in values.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()  # a crash loses no logged step
        print(self.console_line(step, values, now), flush=True)
        if self._run is not None:
            self._guard("log", self._run.log, values, step=step)
        if self._tensorboard is not None:
            for name, value in values.items():
                if _is_number(value):
                    self._tensorboard.add_scalar(name, value, step)

    def console_line(self, step: int, values: dict[str, Any], now: float) -> str:
        """``step 120/1000 | loss 2.3140 | ... | eta 5m12s``; the ETA extrapolates the rate since the first log."""
        if self._first is None:
            self._first = (step, now)
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        parts += [fmt(values[name]) for name, fmt in CONSOLE_FORMATS.items() if _is_number(values.get(name))]
        parts += [f"{name} {value:.4g}" if _is_number(value) else f"{name} {value!r}"
                  for name, value in values.items() if name not in CONSOLE_FORMATS]
        first_step, first_time = self._first
        if self.total_steps and step > first_step and now > first_time:
            rate = (step - first_step) / (now - first_time)
            parts.append(f"eta {_duration((self.total_steps - step) / rate)}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush and close the JSONL file and finish the W&B run. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._run is not None:
            run, self._run_id = self._run, self._run.id
            self._run = None
            self._guard("finish", run.finish)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- W&B

    def _start_wandb(self, config: dict, options: WandbOptions) -> None:
        import wandb

        # No mode here: wandb.init picks online (logged in via `wandb login` or WANDB_API_KEY) or asks
        # for offline itself (WANDB_MODE=offline), as W&B users expect.
        self._run = wandb.init(
            project=options.project, entity=options.entity or None, name=options.name or None,
            tags=list(options.tags) or None, id=self._run_id, resume="allow",  # id None: W&B draws one
            dir=str(self.output_dir), config=config, reinit="create_new",
            # console="off": our own console line is enough, and W&B's stdout capture is one more
            # thing that could interfere with training output
            settings=wandb.Settings(console="off", init_timeout=120, quiet=True))

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        """Run a W&B call; on any error, warn once and drop W&B for the rest of the run."""
        try:
            fn(*args, **kwargs)
        except Exception as error:  # tracking must never stop training
            warnings.warn(f"W&B {what} failed ({type(error).__name__}: {error}); continuing with "
                          f"{self.output_dir / 'metrics.jsonl'} only", RuntimeWarning, stacklevel=3)
            self._run = None


def _drop_rows_from(metrics: Path, first_step: int) -> None:
    """Rewrite ``metrics`` without the rows of steps >= ``first_step`` (atomically; nothing to do when
    there are none): what a stopped run logged after the checkpoint this run resumes from."""
    if not metrics.is_file():
        return
    lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) < first_step]
    if len(kept) == len(lines):
        return
    tmp = metrics.with_name(f".{metrics.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, metrics)


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl row; a torn row (a crash mid-write) counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(value: Any) -> Any:
    """A JSON value: 0-d tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no literal for them (``json.dumps`` would write a bare
    ``NaN``, which strict parsers reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _si(value: float) -> str:
    """12345 -> '12.3k'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    """3725 -> '1h02m'; 312 -> '5m12s'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

