"""When a step's loss or gradient norm is NaN or infinite: the error every rank raises.

No communication: the loss and the gradient norm are already global (reduced over the mesh),
so every rank finds the same step non-finite and raises at the same point. The error carries
what happened and the settings that matter; the message naming the checkpoint to resume from
is written where it is caught (``train.__main__``), after the last save has committed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepSettings:
    """The options a diverged run's advice names: --lr, --warmup-steps, --log-every."""

    lr: float
    warmup_steps: int
    log_every: int


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm of step ``step`` is NaN or infinite; raised on every rank at once
    (both values are global) before the optimizer applies anything.

    ``window`` (first, last): found at a report among the steps before it, whose values were not
    read on the host; each non-finite one was dropped on the device (``loss``/``grad_norm`` NaN).
    """

    def __init__(self, step: int, loss: float, grad_norm: float, settings: StepSettings,
                 window: tuple[int, int] | None = None):
        self.step, self.loss, self.grad_norm, self.settings, self.window = step, loss, grad_norm, settings, window
        super().__init__(self.message(None))

    def message(self, latest_checkpoint: str | None) -> str:
        """What happened at which step(s), that nothing was applied or saved, and what to do;
        ``latest_checkpoint`` the newest complete one (None: none was saved)."""
        s = self.settings
        if self.window:
            what = (f"training diverged between steps {self.window[0]} and {self.window[1]} (--log-every "
                    f"{s.log_every}): a step had a non-finite loss or gradient norm; its update was not applied "
                    f"and nothing was saved from it")
        else:
            what = (f"training diverged at step {self.step}: loss {self.loss}, gradient norm {self.grad_norm}; "
                    f"this step's update was not applied and nothing was saved from it")
        restart = (f"resume from {latest_checkpoint} (the newest checkpoint)" if latest_checkpoint else
                   "restart (no checkpoint was saved before this step)")
        return (f"{what}. Lower --lr (now {s.lr:g}) or raise --warmup-steps (now {s.warmup_steps}), then "
                f"{restart}; or pass --skip-nonfinite-steps to drop such steps instead")
