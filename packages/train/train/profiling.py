"""Where the time and memory of a few steps go: ``--profile-steps A-B`` and ``--memory-snapshot``.

``--profile-steps 3-5`` records steps 3 to 5 (1-based, inclusive) with ``torch.profiler`` on
every rank (CPU ops, CUDA kernels where there is a GPU, memory, shapes) and writes one
Chrome/Perfetto trace per rank: ``<output-dir>/profile/rank<R>_steps3-5.json``. Open it at
https://ui.perfetto.dev (or chrome://tracing). Skip the first step or two: they include
one-time costs (allocator warm-up, process-group and pipeline setup).

``--memory-snapshot`` (CUDA only) also records the CUDA caching allocator's history over the
same steps and writes ``rank<R>_steps3-5_memory.pickle``: drop it on https://pytorch.org/memory_viz
to see every live tensor over time, with the stack that allocated it.

No collective: each rank records and writes only its own files.
"""

from __future__ import annotations

from pathlib import Path

import torch


def parse_step_range(text: str) -> tuple[int, int] | None:
    """``"3-5"`` -> (3, 5), ``"4"`` -> (4, 4), ``""`` -> None; ValueError names the flag otherwise."""
    if not text:
        return None
    first, sep, last = text.partition("-")
    try:
        start, end = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"--profile-steps {text!r}: expected A-B (e.g. 3-5) or one step number") from None
    if not 1 <= start <= end:
        raise ValueError(f"--profile-steps {text!r}: need 1 <= A <= B (steps are counted from 1)")
    return start, end


def check_profiling(profile_steps: str, memory_snapshot: bool, device_type: str, steps: int) -> None:
    """The flags' errors, before any collective."""
    window = parse_step_range(profile_steps)
    if window and window[1] > steps:
        raise ValueError(f"--profile-steps {profile_steps}: the run ends at --steps {steps}")
    if memory_snapshot and not profile_steps:
        raise ValueError("--memory-snapshot records the --profile-steps window: pass --profile-steps A-B too")
    if memory_snapshot and device_type != "cuda":
        raise ValueError("--memory-snapshot needs CUDA (it records the CUDA caching allocator); on the CPU the "
                         "--profile-steps trace records memory use per op instead")


class StepProfiler:
    """Starts recording before step A and writes the files after step B (see the module docstring)."""

    def __init__(self, profile_steps: str, memory_snapshot: bool, output_dir: Path, rank: int,
                 device: torch.device):
        self.window = parse_step_range(profile_steps)
        self.memory_snapshot = memory_snapshot
        self.device = device
        self.stem = None if self.window is None else \
            Path(output_dir) / "profile" / f"rank{rank}_steps{self.window[0]}-{self.window[1]}"
        self._profile: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run."""
        if self.window is None or step != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self._profile = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profile.start()

    def after_step(self, step: int) -> None:
        """``step``: the 1-based number of the step that just ran."""
        if self._profile is None or step != self.window[1]:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profile.stop()
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(str(self.stem) + ".json")
        self._profile = None
        if self.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(self.stem) + "_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
