"""``python -m train [flags]`` or ``torchrun --nproc_per_node=N -m train --mesh dp=2,tp=4,pp=2 [flags]``.

Exit codes: 0 done; 2 a bad option, file or checkpoint (one ``error: ...`` line, the same on
every rank); 3 training diverged (a NaN/inf loss or gradient norm); 4 stopped by a signal after
saving (``train.preemption``: rerun the same command to resume); 5 stopped by a signal whose
save did not finish in time; 1 anything else.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch.distributed as dist

from core.checkpoint import CheckpointError
from core.failures import CollectiveTimeout, is_collective_timeout, timeout_message

from . import checkpointing
from .config import parse_config
from .distributed import shutdown_and_exit
from .divergence import TrainingDiverged
from .loop import SILENT_RANK_WAIT_S, train
from .preemption import EXIT_PREEMPTED, Preempted

# Words in the errors gloo/NCCL raise on a rank whose peer has gone away.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def main(argv: list[str] | None = None) -> None:
    shutdown_and_exit(run(argv))


def run(argv: list[str] | None) -> int:
    """Parse, train, and turn every way of ending into an exit code and at most one line."""
    try:
        cfg = parse_config(argv)
        if cfg.dry_run:
            from .dry_run import dry_run  # the fake backend and trackers load only for a dry run

            dry_run(cfg)
        else:
            train(cfg)
        return 0
    except (ValueError, CheckpointError) as err:  # the user's input: options, files, checkpoints
        _error(str(err))
        return 2
    except TrainingDiverged as err:  # every rank, after the last save committed: name it
        _error(err.message(checkpointing.latest_checkpoint(cfg)))
        return 3
    except Preempted as stop:
        if not dist.is_initialized() or dist.get_rank() == 0:
            sys.stderr.write(f"preempted: {stop}\n")
            sys.stderr.flush()
        return EXIT_PREEMPTED
    except CollectiveTimeout as err:
        _error(str(err))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except SystemExit as exit_:  # argparse: --help (0) or a bad flag (2, its line already printed)
        return exit_.code if isinstance(exit_.code, int) else 0
    except BaseException as err:  # noqa: BLE001 - report, then exit without hanging at interpreter shutdown
        if dist.is_initialized() and is_collective_timeout(err):  # before the run folder exists
            _error(timeout_message(err, SILENT_RANK_WAIT_S))
            return 1
        if _peer_failed(err):
            rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "0")
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _error(f"rank {rank} lost contact with a peer rank, which probably failed first (see its error "
                   f"above): {first_line}")
            return 1
        traceback.print_exc()
        return 1


def _error(message: str) -> None:
    """One write per line, so the lines of ranks sharing a terminal do not interleave."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _peer_failed(err: BaseException) -> bool:
    """A communication error caused by another rank leaving (its own error says why)."""
    return isinstance(err, dist.DistNetworkError) or any(words in str(err) for words in PEER_GONE)


if __name__ == "__main__":
    main()
