"""When a step's loss or gradient norm is NaN or infinite: the error every rank raises, and the
check, at a report, of the steps in between whose values stayed on the device.

No communication: the loss and the gradient norm are already global (reduced over the mesh),
so every rank finds the same step non-finite and raises at the same point.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import checkpointing

if TYPE_CHECKING:
    from .loop import Trainer


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm of a step is NaN or infinite. Raised on every rank at once
    (both values are global) before the optimizer applies anything."""

    def __init__(self, t: Trainer, loss: float, grad_norm: float, window: tuple[int, int] | None = None):
        super().__init__(divergence_message(t, loss, grad_norm, window))
        self.loss, self.grad_norm, self.window = loss, grad_norm, window


def divergence_message(t: Trainer, loss: float, grad_norm: float, window: tuple[int, int] | None = None) -> str:
    """What happened at which step(s), that nothing was applied or saved, and what to do.

    ``window`` (first, last): found at a report among the steps before it, whose values were
    not read on the host; each non-finite one was dropped on the device.
    """
    latest = checkpointing.latest_checkpoint(t.cfg)
    restart = (f"resume from {latest} (the newest checkpoint)" if latest else
               "restart (no checkpoint was saved before this step)")
    if window:
        what = (f"training diverged between steps {window[0]} and {window[1]} (--log-every {t.cfg.log_every}): "
                f"a step had a non-finite loss or gradient norm; its update was not applied and nothing was "
                f"saved from it")
    else:
        what = (f"training diverged at step {t.step + 1}: loss {loss}, gradient norm {grad_norm}; this step's "
                f"update was not applied and nothing was saved from it")
    return (f"{what}. Lower --lr (now {t.cfg.lr:g}) or raise --warmup-steps (now {t.cfg.warmup_steps}), then "
            f"{restart}; or pass --skip-nonfinite-steps to drop such steps instead")


def check_dropped_steps(t: Trainer) -> None:
    """Before a reported step: count the steps dropped on the device since the previous report,
    and stop the run (``TrainingDiverged``) if there were any and ``--skip-nonfinite-steps`` is off."""
    if t.unchecked_nonfinite is None:
        return
    dropped, t.unchecked_nonfinite = int(t.unchecked_nonfinite.item()), None
    if dropped and not t.cfg.skip_nonfinite_steps:
        raise TrainingDiverged(t, math.nan, math.nan, window=(t.last_report[0] + 1, t.step))
    t.skipped_steps += dropped
