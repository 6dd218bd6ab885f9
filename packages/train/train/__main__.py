"""``python -m train [flags]`` or ``torchrun --nproc_per_node=N -m train --mesh dp=2,tp=4,pp=2 [flags]``."""

from __future__ import annotations

import sys
import traceback

from core.checkpoint import CheckpointError
from core.mesh import MeshConfigError

from .config import parse_config
from .distributed import shutdown_and_exit


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    from .loop import TrainingDiverged, train  # after parsing: --help stays fast

    code = 0
    try:
        train(cfg)
    except (MeshConfigError, CheckpointError, ValueError) as err:
        # configuration and checkpoint errors: one clear line, the same on every rank
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 3
    except BaseException:  # noqa: BLE001 - report, then exit without hanging at interpreter shutdown
        traceback.print_exc()
        code = 1
    shutdown_and_exit(code)


if __name__ == "__main__":
    main()
