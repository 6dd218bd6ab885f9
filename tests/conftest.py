"""Make the checkout's own packages importable first (also in git worktrees and spawned ranks)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

for path in reversed(PACKAGE_DIRS):
    if path not in sys.path:
        sys.path.insert(0, path)
# Subprocesses (torchrun, python -m train) see the same code through PYTHONPATH.
INHERITED_PATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(PACKAGE_DIRS + [str(ROOT / "tests")] + INHERITED_PATH)
os.environ.setdefault("OMP_NUM_THREADS", "1")
