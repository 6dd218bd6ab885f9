"""Preemption: a signal asks the whole job to finish its step, save it, and stop.

Clusters end jobs with a signal and a grace period before SIGKILL: Kubernetes and torchrun
send SIGTERM (torchrun forwards its own SIGTERM to the workers and kills them 30 s later),
SLURM sends SIGTERM (or, with ``#SBATCH --signal``, a chosen signal a chosen time before the
limit), Ctrl-C sends SIGINT. On SIGTERM, SIGINT or SIGUSR1 a rank only raises a flag; after
every step all ranks agree on it with one all-reduce (MAX) on a gloo group of CPU tensors, so
a signal that reached a single rank still stops every rank after the same step, with one
checkpoint of that step saved together. The check never touches an accelerator tensor, so it
adds no device synchronization; it costs one small CPU all-reduce per step.

A deadline (``--preemption-deadline-s``, default 20 s, under torchrun's 30 s) bounds the
step and the save: past it the rank prints one line naming the newest complete checkpoint and
exits with ``EXIT_UNSAVED``. Saves are atomic, so a save cut short leaves that checkpoint usable.
A second SIGINT more than ``DEBOUNCE_S`` after the first stops at once without saving (a
terminal's Ctrl-C reaches torchrun and the workers, and torchrun forwards it again: that
double delivery is one request).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_PREEMPTED = 4   # stopped by a signal after saving: rerun the same command to resume
EXIT_UNSAVED = 5     # stopped by a signal, the save did not finish in time
DEBOUNCE_S = 2.0


class Preempted(Exception):
    """Raised on every rank after the agreed step's checkpoint is saved."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step}; saved {checkpoint}: run the same command "
                         f"again to resume from it")


class PreemptionWatch:
    """Signal handlers of this rank plus the per-step agreement; a context manager.

    ``newest_checkpoint`` names the checkpoint a user is left with if the deadline passes.
    """

    def __init__(self, deadline_s: float, newest_checkpoint: Callable[[], object], timeout_s: float):
        self.deadline_s, self.newest_checkpoint = deadline_s, newest_checkpoint
        self.signum = 0
        self._first_at = 0.0
        self._timer: threading.Timer | None = None
        # collective: every rank builds its watch together
        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > DEBOUNCE_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            return
        self.signum, self._first_at = signum, time.monotonic()
        self._start_deadline()
        name = signal_name(signum)
        # One write, newline included: every rank shares the launcher's stderr, and print's separate
        # newline write lets two ranks' lines run together (seen with PYTHONUNBUFFERED).
        sys.stderr.write(f"{name} received: finishing this step and saving it (deadline {self.deadline_s:g} s)\n")
        sys.stderr.flush()

    def _start_deadline(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.deadline_s, self._deadline_passed)
            self._timer.daemon = True
            self._timer.start()

    def _deadline_passed(self) -> None:
        name = signal_name(self.signum)
        sys.stderr.write(f"error: {name}: the step and its save did not finish within --preemption-deadline-s "
                         f"{self.deadline_s:g}; stopping without it. The newest complete checkpoint is "
                         f"{self.newest_checkpoint() or 'none'}\n")
        sys.stderr.flush()
        os._exit(EXIT_UNSAVED)

    def agreed_signal(self) -> int:
        """The signal some rank received (0: none). Collective: every rank calls it after the same step.

        One all-reduce (MAX) of a 1-element CPU tensor on this watch's gloo group."""
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        agreed = int(flag.item())
        if agreed:
            self.signum = self.signum or agreed
            self._start_deadline()  # the ranks the signal did not reach keep the same deadline
        return agreed


def signal_name(number: int) -> str:
    return signal.Signals(number).name
