"""The test suite's process harness: ranks and CLI commands forked from one preloaded server.

``run_on_ranks`` is ``core.ranks.run_on_ranks`` with the suite's preload: the forkserver imports
torch, the packages and ``train.parity`` once per test session, so each rank starts in
milliseconds instead of the ~3 s a fresh interpreter spends importing them.

``run_python`` is ``subprocess.run`` for a Python command: the command runs in its own process
(its exit code, signals, process group and files are its own, as the CLI tests need), forked
from the same server instead of a fresh interpreter. Commands that start other interpreters
(torchrun, ``-c``, interpreter flags) go to ``subprocess.run`` unchanged.
"""

from __future__ import annotations

import atexit
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import ranks
from core.ranks import forkserver, free_port  # noqa: F401 - free_port: re-exported for the tests

# What the forkserver imports before forking: what the test modules' own imports cost.
PRELOAD = (*ranks.TORCH_PRELOAD, "torch.distributed.checkpoint", "torch.distributed.pipelining", "torch._dynamo",
           "models.distribute", "models.generation", "models.hf_format", "train.loop", "train.dry_run", "train.parity")


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """``core.ranks.run_on_ranks`` with the suite's preload."""
    return ranks.run_on_ranks(fn, world_size, *args, timeout=timeout, preload=PRELOAD)


# Launchers that start interpreters of their own: run as real subprocesses.
_OWN_INTERPRETERS = ("torch.distributed.run", "train.launch")


def _forkable(cmd: list[str]) -> bool:
    """``[python, -m, module, ...]`` or ``[python, script.py, ...]`` with no interpreter flags."""
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return False
    if cmd[1] == "-m":
        return len(cmd) > 2 and cmd[2] not in _OWN_INTERPRETERS
    return cmd[1].endswith(".py")


def _python_main(cmd: list[str], cwd: str | None, environ: dict, out_dir: str) -> None:
    """The child of ``run_python``: what the interpreter does for ``cmd``, stdout/stderr to files."""
    os.environ.clear()
    os.environ.update(environ)
    if cwd is not None:
        os.chdir(cwd)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    code = 0
    try:
        if cmd[1] == "-m":
            sys.argv = [cmd[2], *cmd[3:]]
            sys.path.insert(0, os.getcwd())  # as ``python -m`` puts the working directory first
            runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = cmd[1:]
            sys.path.insert(0, os.path.dirname(os.path.abspath(cmd[1])))
            runpy.run_path(cmd[1], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the interpreter prints any uncaught exception and exits 1
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (W&B, TensorBoard, logging)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_python(cmd: list[str], *, cwd=None, env: dict | None = None, timeout: float | None = None,
               capture_output: bool = True, text: bool = True,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` for a Python command, forked from
    the preloaded server when it can be (``_forkable``; a ``preexec_fn``, which cannot travel to the
    server, makes it a plain subprocess). Raises ``subprocess.TimeoutExpired`` past ``timeout``,
    having killed the process."""
    if not (capture_output and text):
        raise ValueError("run_python captures stdout and stderr as text")
    if preexec_fn is not None or not _forkable(cmd):
        return subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True,
                              preexec_fn=preexec_fn)
    environ = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory() as out_dir:
        proc = forkserver(PRELOAD).Process(target=_python_main, args=(cmd, None if cwd is None else str(cwd), environ,
                                                                out_dir))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        out, err = (Path(out_dir, name).read_text() for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(cmd, proc.exitcode, out, err)
