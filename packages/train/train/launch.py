"""``python -m train.launch [torchrun options] -m train [trainer options]``: torchrun, ending in one line.

It takes exactly torchrun's options (it runs torchrun's own ``torch.distributed.run.run``);
what differs is how a launch ends:

* a worker failure ends with one line naming the first failed rank and its exit code (the
  workers' own ``error:`` lines are above it), instead of torchrun's ChildFailedError traceback
  and failure summary; the launcher exits with that worker's code (2 a mistake in the input, 3
  diverged, 4 preempted and saved, 5 preempted past the deadline, 1 anything else);
* a signal to the launcher (SIGTERM from Kubernetes or SLURM, Ctrl-C) is passed to the workers
  as torchrun does (they finish the step, save it and stop), then one line and exit code 4,
  instead of torchrun's SignalException traceback;
* ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` unless set, so ``--max-restarts`` also works across
  nodes (``train.distributed.agent_store_of_this_attempt`` covers one node under plain torchrun).

torchrun's own log lines (the OMP_NUM_THREADS notice, "Sending process ... closing signal")
are silenced; the workers' output is untouched.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from .preemption import EXIT_PREEMPTED

TORCHRUN_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic")
MEANINGS = {1: "failed", 2: "a mistake in the input", 3: "the run diverged", 4: "preempted, saved",
            5: "preempted, the save did not finish in time"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # after the imports: torch's elastic loggers set their own level when their modules load
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(TORCHRUN_LOGGERS) and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
        return 0
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode
        meaning = MEANINGS.get(code) or (f"killed by {signal.Signals(-code).name}" if code < 0 else "failed")
        prefix = "launcher" if code == EXIT_PREEMPTED else "error: launcher"
        _line(f"{prefix}: rank {rank} ended with exit code {code} ({meaning}); its own lines above say more")
        return code if code > 0 else 1
    except SignalException as stop:
        _line(f"launcher: {signal.Signals(stop.sigval).name} passed to the workers, which finish their step and "
              f"save it; their lines above name the checkpoint")
        return EXIT_PREEMPTED


def _line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
