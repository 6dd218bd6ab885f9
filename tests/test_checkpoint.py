"""Distributed checkpoints: exact round trip, resharding across meshes, atomic commit, clear errors, no pickle.

One 4-rank job (dp=2,tp=2, TP + FSDP2) trains a step and saves; the other tests load that
checkpoint elsewhere: on tp=4 and dp=4 meshes, on one plain process, and in damaged copies.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rank_harness import run_on_ranks
from torch import nn

from core import checkpoint_layout
from core.checkpoint import Checkpointer, CheckpointError, find_latest_checkpoint, model_tensors, optimizer_tensors

VOCAB, DIM, HIDDEN = 16, 8, 16


class Tiny(nn.Module):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, hidden)
        self.down = nn.Linear(hidden, DIM)

    def forward(self, tokens):
        return self.down(torch.relu(self.up(self.emb(tokens))))


_meshes: dict = {}


def parallel_mesh(mesh: str):
    """One ParallelMesh per mesh string and process (building one creates process groups)."""
    from core.mesh import MeshShape, build_mesh
    if mesh not in _meshes:
        _meshes[mesh] = build_mesh(MeshShape.parse(mesh), "cpu")
    return _meshes[mesh]


def build(mesh: str | None, tp: bool, fsdp: bool, seed: int = 0, hidden: int = HIDDEN):
    """Tiny model, optionally TP on pm["tp"] and/or FSDP2 on pm["dense_grad"], plus AdamW."""
    torch.manual_seed(seed)  # same full weights on every rank, whatever the mesh
    model = Tiny(hidden)
    if mesh is not None:
        pm = parallel_mesh(mesh)
        if tp:
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
            parallelize_module(model, pm["tp"], {"emb": RowwiseParallel(input_layouts=Replicate()),
                                                 "up": ColwiseParallel(), "down": RowwiseParallel()})
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            for module in (model.up, model.down, model):
                fully_shard(module, mesh=pm["dense_grad"])
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def train_step(model, optimizer, seed: int = 1):
    tokens = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(seed))
    model(tokens).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def state(model, optimizer):
    return {**model_tensors(model), **optimizer_tensors(optimizer, model)}


def local(tensors):
    """This rank's shards as plain tensors (comparable without collectives)."""
    return {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in tensors.items()}


def full(tensors):
    """Full (global) tensors; collective for DTensors, so every rank calls it in key order."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in sorted(tensors.items())}


# ---- the 4-rank job every other test builds on --------------------------------------------

def _save_on_dp2_tp2(root: str):
    root, checkpointer = Path(root), Checkpointer()
    model, opt = build("dp=2,tp=2", tp=True, fsdp=True)
    train_step(model, opt)
    saved = state(model, opt)
    path = checkpointer.save(root, 1, saved, {"step": 1, "rng": [1, 2, 3]})
    reference = full(saved)  # now: `saved` aliases the live state, which changes below

    # Round trip on the same mesh into a fresh model (other seed) and a fresh optimizer.
    model2, opt2 = build("dp=2,tp=2", tp=True, fsdp=True, seed=7)
    loaded = state(model2, opt2)
    meta = checkpointer.load(path, loaded)
    round_trip = (local(saved), local(loaded), meta)
    train_step(model, opt, seed=2)  # continuing must match too: the optimizer state is live
    train_step(model2, opt2, seed=2)
    after_step = (local(model_tensors(model)), local(model_tensors(model2)))

    # Async: the save snapshots the tensors, so changing them before wait() changes nothing.
    snapshot = local(state(model, opt))
    handle = checkpointer.save(root, 2, state(model, opt), {"step": 2}, async_save=True)
    committed_before_wait = find_latest_checkpoint(root)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)
    handle.wait()
    model3, opt3 = build("dp=2,tp=2", tp=True, fsdp=True, seed=9)
    later = state(model3, opt3)
    checkpointer.load(root / "step_00000002", later)
    async_result = (committed_before_wait, snapshot, local(later))
    return {"full": reference, "round_trip": round_trip, "after_step": after_step, "async": async_result,
            "path": path, "handle_path": handle.wait()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    results = run_on_ranks(_save_on_dp2_tp2, 4, str(root), timeout=300)
    return root, results


def test_round_trip_same_mesh_bit_exact(saved):
    root, results = saved
    for rank, result in enumerate(results):
        before, after, meta = result["round_trip"]
        assert meta == {"step": 1, "rng": [1, 2, 3]}
        assert set(before) == set(after) and any(k.endswith(".exp_avg_sq") for k in before)
        for key in before:
            assert torch.equal(before[key], after[key]), f"rank {rank}: {key} differs after load"
        continued, continued_loaded = result["after_step"]
        for key in continued:
            assert torch.equal(continued[key], continued_loaded[key]), f"rank {rank}: {key} diverged"


def test_async_save_snapshots_and_commits_on_wait(saved):
    root, results = saved
    for rank, result in enumerate(results):
        latest_before_wait, snapshot, loaded = result["async"]
        assert latest_before_wait == root / "step_00000001", "the async checkpoint was visible before wait()"
        assert result["handle_path"] == root / "step_00000002"
        assert set(loaded) == set(snapshot)
        for key in snapshot:  # not the +100 added to the parameters after async_save returned
            assert torch.equal(loaded[key], snapshot[key]), f"rank {rank}: {key} is not what was saved"


def test_layout_is_safetensors_and_json_only(saved):
    root, _ = saved
    names = sorted(p.name for p in (root / "step_00000001").iterdir())
    assert names[:2] == ["COMPLETE.json", "meta.json"]
    assert len(names) > 3 and all(n.endswith(".safetensors") for n in names[2:]), names
    assert not list(root.glob(".tmp-*"))


# ---- resharding -------------------------------------------------------------------------

def _load_on_tp4_and_dp4(path: str):
    out = {}
    for mesh, tp, fsdp in (("tp=4", True, False), ("dp=4", False, True)):
        model, opt = build(mesh, tp=tp, fsdp=fsdp, seed=5)
        tensors = state(model, opt)
        Checkpointer().load(Path(path), tensors)
        out[mesh] = full(tensors)
    return out


def test_reshard_to_tp4_and_dp4(saved):
    root, results = saved
    reference = results[0]["full"]
    loaded = run_on_ranks(_load_on_tp4_and_dp4, 4, str(root / "step_00000001"), timeout=300)
    for rank, by_mesh in enumerate(loaded):
        for mesh, tensors in by_mesh.items():
            assert set(tensors) == set(reference)
            for key, value in reference.items():
                assert torch.equal(tensors[key], value), f"{mesh} rank {rank}: {key} differs"


def test_reshard_to_one_plain_process(saved):
    root, results = saved
    reference = results[0]["full"]
    model, opt = build(None, tp=False, fsdp=False, seed=5)
    tensors = state(model, opt)
    meta = Checkpointer().load(root / "step_00000001", tensors)
    assert meta["step"] == 1
    for key, value in reference.items():
        assert torch.equal(tensors[key], value), key
    assert torch.equal(model.up.weight.detach(), reference["up.weight"]), "load did not write into the model"


# ---- errors on every rank ---------------------------------------------------------------

def _pipeline_like(root: str):
    """Each rank saves different keys (as pipeline stages do) plus a shared one, then loads them."""
    rank = torch.distributed.get_rank()
    tensors = {f"layers.{rank}.w": torch.full((2, 3), float(rank)), "step": torch.tensor(5.0)}
    path = Checkpointer().save(Path(root), 3, tensors, {"step": 3})
    into = {key: torch.zeros_like(value) for key, value in tensors.items()}
    Checkpointer().load(path, into)
    return into


def _two_rank_job(cases: dict, pp_root: str):
    return {"errors": _load_damaged(cases), "pp": _pipeline_like(pp_root)}


def _load_damaged(cases: dict):
    """Try every case on every rank; a rank that does not raise would leave the others hanging."""
    messages = {}
    for case, (path, hidden, extra_key) in cases.items():
        model, opt = build("dp=2", tp=False, fsdp=True, seed=3, hidden=hidden)
        tensors = state(model, opt)
        if extra_key and torch.distributed.get_rank() == 1:
            tensors["not.in.checkpoint"] = torch.zeros(2)
        try:
            Checkpointer().load(Path(path), tensors)
            messages[case] = None
        except CheckpointError as e:
            messages[case] = str(e)
    return messages


def _damaged_copy(root: Path, dest: Path, damage) -> Path:
    copy = dest / "step_00000001"
    shutil.copytree(root / "step_00000001", copy)
    damage(sorted(copy.glob("*.safetensors")))
    return copy


def test_damaged_checkpoints_raise_on_all_ranks_and_disjoint_keys_round_trip(saved, tmp_path):
    root, _ = saved

    def truncate(shards):
        with open(shards[1], "r+b") as f:
            f.truncate(shards[1].stat().st_size - 7)

    def corrupt_header(shards):
        data = bytearray(shards[0].read_bytes())
        data[8:12] = b"\xff\xfe\x00!"  # inside the JSON header; the size stays the same
        shards[0].write_bytes(bytes(data))

    (tmp_path / "empty").mkdir()
    cases = {
        "truncated": (_damaged_copy(root, tmp_path / "t", truncate), HIDDEN, False),
        "corrupt": (_damaged_copy(root, tmp_path / "c", corrupt_header), HIDDEN, False),
        "missing": (_damaged_copy(root, tmp_path / "m", lambda shards: shards[-1].unlink()), HIDDEN, False),
        "shape": (root / "step_00000001", 12, False),
        "key_on_rank1": (root / "step_00000001", HIDDEN, True),
        "empty": (tmp_path / "empty", HIDDEN, False),
        "root": (root, HIDDEN, False),
    }
    cases = {k: (str(p), h, e) for k, (p, h, e) in cases.items()}
    jobs = run_on_ranks(_two_rank_job, 2, cases, str(tmp_path / "pp"), timeout=300)
    results = [job["errors"] for job in jobs]
    expected = {
        "truncated": "truncated or corrupt", "corrupt": "not a valid safetensors file",
        "missing": "is missing", "shape": "shape mismatch for 'up.weight'",
        "key_on_rank1": "not.in.checkpoint", "empty": "not a complete checkpoint",
        "root": "find_latest_checkpoint",
    }
    for rank, messages in enumerate(results):
        for case, needle in expected.items():
            assert messages[case] is not None, f"rank {rank} loaded the {case} checkpoint without error"
            assert needle in messages[case], f"rank {rank}, {case}: {messages[case]}"
    assert "(16, 8)" in results[0]["shape"] and "(12, 8)" in results[0]["shape"], "name both shapes"
    assert "model config" in results[0]["shape"]
    assert results[0]["key_on_rank1"].startswith("(reported by rank 1)")

    # Disjoint keys per rank (pipeline stages) save and load.
    for rank, job in enumerate(jobs):
        assert set(job["pp"]) == {f"layers.{rank}.w", "step"}
        assert torch.equal(job["pp"][f"layers.{rank}.w"], torch.full((2, 3), float(rank)))
        assert job["pp"]["step"].item() == 5.0
    manifest = checkpoint_layout.read_manifest(tmp_path / "pp" / "step_00000003")
    assert {"layers.0.w", "layers.1.w", "step"} == set(manifest["tensors"])


# ---- atomicity and pruning (one process, no process group) ---------------------------------

CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from pathlib import Path
    from core import checkpoint, checkpoint_dcp, checkpoint_layout
    root, point = Path(sys.argv[1]), sys.argv[2]
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    checkpoint.Checkpointer().save(root, 1, tensors, {"step": 1})
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    if point == "after_shards":
        checkpoint_dcp.ShardWriter.finish = die
    elif point == "manifest":
        write_json = checkpoint_layout.write_json
        checkpoint_layout.write_json = lambda p, o: die() if p.name == "COMPLETE.json" else write_json(p, o)
    elif point == "rename":
        os.rename = die
    tensors["w"] += 1
    checkpoint.Checkpointer().save(root, 2, tensors, {"step": 2})
    print("NOT KILLED")
""")


@pytest.mark.parametrize("point", ["after_shards", "manifest", "rename"])
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path, point):
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", CRASHING_SAVE, str(tmp_path), point],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert (tmp_path / ".tmp-step_00000002").is_dir()
    latest = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step_00000001"
    tensors = {"w": torch.zeros(2, 3)}
    assert Checkpointer().load(latest, tensors) == {"step": 1}
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    # The next save clears the leftover and succeeds.
    Checkpointer().save(tmp_path, 2, tensors, {"step": 2})
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert not list(tmp_path.glob(".tmp-*"))


def test_failure_before_commit_raises_and_is_ignored(tmp_path, monkeypatch):
    Checkpointer().save(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1})

    def broken_publish(tmp, final):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_layout, "publish", broken_publish)
    with pytest.raises(CheckpointError, match="disk full"):
        Checkpointer().save(tmp_path, 2, {"w": torch.ones(3)}, {"step": 2})
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    with pytest.raises(CheckpointError, match="unfinished save"):
        Checkpointer().load(tmp_path / ".tmp-step_00000002", {"w": torch.ones(3)})


def test_keep_last_prunes_oldest_and_leftovers(tmp_path):
    (tmp_path / ".tmp-step_00000099").mkdir(parents=True)  # a crashed save
    (tmp_path / ".trash-step_00000098").mkdir()  # a crashed prune
    for step in (10, 20, 30, 40):
        Checkpointer().save(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]
    Checkpointer().save(tmp_path, 40, {"w": torch.zeros(2)}, {"step": 40, "again": True}, keep_last=1)  # re-save a step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000040"]
    assert Checkpointer().load(tmp_path / "step_00000040", {"w": torch.ones(2)})["again"] is True


def test_bad_arguments_are_rejected_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        Checkpointer().save(tmp_path, 1, {"w": torch.ones(1)}, {"rng": torch.get_rng_state()})
    with pytest.raises(CheckpointError, match="flat dict"):
        Checkpointer().save(tmp_path, 1, {"optim": {"state": torch.ones(1)}}, {})
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
    assert find_latest_checkpoint(tmp_path / "nothing") is None


# ---- security ---------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a directory: proof that something unpickled the file."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (os.mkdir, (str(self.canary),))


def test_load_reads_no_pickle(saved, tmp_path, monkeypatch):
    root, results = saved
    path = tmp_path / "step_00000001"
    shutil.copytree(root / "step_00000001", path)
    canary = tmp_path / "UNPICKLED"
    for name in (".metadata", "meta.pkl", "__0_0.distcp"):  # DCP's pickle file names, and a decoy
        (path / name).write_bytes(pickle.dumps(_Payload(canary)))

    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, opt = build(None, tp=False, fsdp=False, seed=5)
    tensors = state(model, opt)
    Checkpointer().load(path, tensors)
    assert not canary.exists()
    assert torch.equal(tensors["emb.weight"], results[0]["full"]["emb.weight"])


def test_a_non_finite_state_is_never_saved_and_prunes_nothing(tmp_path):
    """keep_last=1 would prune step 1 in favour of step 2: a NaN at step 2 must not get that far."""
    Checkpointer().save(tmp_path, 1, {"w": torch.ones(3), "step": torch.tensor(1)}, {"step": 1}, keep_last=1)
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: 1 tensor\(s\) hold NaN.*\['w'\]"):
        Checkpointer().save(tmp_path, 2, {"w": torch.tensor([1.0, float("nan"), 1.0]), "step": torch.tensor(2)},
                        {"step": 2}, keep_last=1)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert not list(tmp_path.glob(".tmp-*"))
