"""Batches read ahead (``train.prefetch``): the next step's batch is read while the current step
runs, the batches, checkpoints and losses are exactly those of reading inline, and on CUDA a
steady-state step never makes the host wait for the GPU."""

import tempfile
import threading

import pytest
import torch
from rank_harness import run_on_ranks

from train.data import SyntheticBatches
from train.parity import BASE
from train.prefetch import PrefetchedBatches


class RecordingBatches(SyntheticBatches):
    """Synthetic batches that note which thread read each one and signal each read."""

    def __init__(self):
        super().__init__(vocab_size=100, seq_len=8, global_batch_size=4, batch_rank=0, batch_world=1, seed=3)
        self.readers: list[str] = []
        self.read = threading.Semaphore(0)

    def __next__(self):
        batch = super().__next__()
        self.readers.append(threading.current_thread().name)
        self.read.release()
        return batch


def test_the_next_batch_is_read_while_the_step_runs():
    source = RecordingBatches()
    prefetched = PrefetchedBatches(source, torch.device("cpu"))
    try:
        next(prefetched)
        assert source.read.acquire(timeout=10) and source.read.acquire(timeout=10), \
            "batch 2 was not read ahead while batch 1's step would run"
        assert all(name.startswith("batch-prefetch") for name in source.readers), source.readers
    finally:
        prefetched.close()


def test_batches_and_positions_are_those_of_the_source():
    """The same batches in the same order; ``state_dict`` is the position after the batches handed
    out (not after the one read ahead), and loading one continues exactly there."""
    plain, prefetched = RecordingBatches(), PrefetchedBatches(RecordingBatches(), torch.device("cpu"))
    try:
        for _ in range(3):
            for got, expected in zip(next(prefetched), next(plain)):
                assert torch.equal(got, expected)
        assert prefetched.state_dict() == plain.state_dict() == {"position": 3}
        expected = [next(plain) for _ in range(2)]
        prefetched.load_state_dict({"position": 3})
        for want in expected:
            assert all(torch.equal(g, w) for g, w in zip(next(prefetched), want))
    finally:
        prefetched.close()


def losses_with_and_without_prefetch(mesh: str) -> tuple[list[float], list[float]]:
    """Four steps on the bundled text read ahead (the trainer's default), then the same four
    read inline (the prefetcher's source used directly)."""
    from train.config import TrainConfig
    from train.loop import build_trainer, train_step

    runs = []
    for inline in (False, True):
        with tempfile.TemporaryDirectory() as out:
            t = build_trainer(TrainConfig(**{**BASE, "dataset": "templates", "tokenizer": "byte", "steps": 4,
                                             "mesh": mesh, "output_dir": out}))
            prefetched = t.batches
            if inline:
                t.batches = prefetched.source
            runs.append([train_step(t)["loss"] for _ in range(4)])
            prefetched.close()
    return runs[0], runs[1]


def test_prefetching_changes_no_loss():
    for prefetched, inline in run_on_ranks(losses_with_and_without_prefetch, 2, "dp=2"):
        assert prefetched == inline


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steady_state_steps_never_wait_for_the_host():
    """On CUDA, steps between reports run under ``set_sync_debug_mode("error")``: any host sync (a
    ``.item()``, a pageable copy, a ``nonzero``) raises. The CPU twin, which forbids reading a
    tensor on the host, is ``test_lean_step.py::test_steps_between_reports_read_nothing_on_the_host``."""
    import torch.distributed as dist

    from train.config import TrainConfig
    from train.loop import build_trainer, train_step

    try:
        with tempfile.TemporaryDirectory() as out:
            t = build_trainer(TrainConfig(**{**BASE, "steps": 8, "log_every": 8, "output_dir": out,
                                             "device": "cuda", "seq_len": 256}))
            assert train_step(t) == {} and train_step(t) == {}  # warm-up: lazy CUDA and cuBLAS init
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(5):
                    assert train_step(t) == {}
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert train_step(t)["step"] == 8
            t.batches.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
