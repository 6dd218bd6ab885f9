"""The fast, memory-lean step: activation checkpointing, torch.compile, grouped-GEMM experts,
fewer collectives. Each is checked against the run without it on the same mesh.

Activation checkpointing must not change a single bit (the recompute runs the same ops in
the same order); compile must match eager within float noise (inductor fuses reductions).
"""

import functools

import pytest
import torch
from rank_harness import run_on_ranks

from train.parity import BASE, assert_same_run, counted_calls, full, merge_ranks, run_steps


@functools.cache
def on_mesh(mesh: str, world: int, **overrides) -> dict:
    return merge_ranks(run_on_ranks(run_steps, world, mesh, overrides))


def assert_bitwise_equal(reference: dict, other: dict) -> None:
    assert other["losses"] == reference["losses"], (other["losses"], reference["losses"])
    assert other["expert_loads"] == reference["expert_loads"], "MoE load differs (counted twice by a recompute?)"
    for kind in ("grads", "weights"):
        assert other[kind].keys() == reference[kind].keys()
        for name, ref in reference[kind].items():
            assert torch.equal(other[kind][name], ref), f"{kind} of {name} differ"


@pytest.mark.parametrize("mesh, world, mode, model", [
    ("dp=2,tp=2", 4, "full", "debug"),
    ("dp=2,tp=2", 4, "selective", "debug"),
    ("cp=2", 2, "selective", "debug"),              # ring attention inside the checkpoint
    ("pp=2,dp=2", 4, "selective", "debug"),
    ("dp=2", 2, "selective", "debug-moe-v3"),       # MoE load recorded once per forward, not per recompute
    ("ep=2,tp=2", 4, "selective", "debug-moe-v3"),  # experts as an inner FSDP unit: full recompute for them
])
def test_activation_checkpointing_changes_nothing(mesh, world, mode, model):
    assert_bitwise_equal(on_mesh(mesh, world, model=model), on_mesh(mesh, world, model=model,
                                                                    activation_checkpoint=mode))


def test_bitwise_comparison_can_fail():
    """Negative control: one more step of training moves the weights, and the check sees it."""
    with pytest.raises(AssertionError):
        assert_bitwise_equal(on_mesh("", 1), on_mesh("", 1, lr=1.1e-2))


@pytest.mark.parametrize("mesh, world, extra", [
    ("", 1, {}),
    ("dp=2", 2, {"activation_checkpoint": "selective"}),  # compile + FSDP2 + checkpointing
    ("pp=2", 2, {}),
    ("ep=2", 2, {"model": "debug-moe-v3"}),
    ("dp=2,tp=2", 4, {"activation_checkpoint": "full"}),  # the first block takes the embedding's reduce-scatter
    ("tp=2", 2, {"activation_checkpoint": "selective", "model": "debug-moe-v3"}),  # MoE load counted once
])
def test_compiled_blocks_match_eager(mesh, world, extra):
    assert_same_run(on_mesh(mesh, world, **extra), on_mesh(mesh, world, compile=True, **extra))


def test_grouped_gemm_experts_match_a_loop_and_read_nothing_on_the_host(monkeypatch):
    """One MoE layer forward/backward: grouped GEMM == per-expert matmuls (the CUDA float32
    fallback), and no tensor is read on the host (``.tolist()``/``.item()`` would raise here)."""
    from models.init import init_weights
    from models.moe.layer import MoE, grouped_matmul, looped_matmul
    from models.registry import get_config

    cfg = get_config("debug-moe")
    layer = MoE(cfg)
    init_weights(layer, cfg.n_layers, seed=0)
    x = torch.randn(2, 16, cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the MoE layer")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", forbidden)
        patch.setattr(torch.Tensor, "item", forbidden)
        patch.setattr(torch.Tensor, "__bool__", forbidden)
        out = layer(x)
        out.square().sum().backward()
    ends = torch.tensor([4, 4, 11], dtype=torch.int32)  # expert 1 gets no rows
    for width in (8, 5):  # 8 floats: grouped_mm; 5 (not 16-byte rows): the loop
        rows, weights = torch.randn(11, 8), torch.randn(3, 8, width)
        expected = torch.cat([rows[:4] @ weights[0], rows[4:11] @ weights[2]])
        torch.testing.assert_close(grouped_matmul(rows, weights, ends), expected)
        torch.testing.assert_close(looped_matmul(rows, weights, ends), expected)
    assert x.grad is not None and layer.experts.w1.grad.abs().sum() > 0


def partial_gradient_all_reduces(mesh: str) -> tuple[int, int]:
    """(sequence-parallel norm weights with a Partial gradient, all-reduces issued to fix them)."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from core.tensor_parallel import reduce_partial_gradients
    from train.config import TrainConfig
    from train.loop import build_trainer

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out}))
        inputs, labels = next(t.batches)
        t.model.forward_backward(inputs, labels)
        partial = sum(isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements)
                      for p in t.model.trainable)
        with counted_calls(dist, "all_reduce") as calls:
            reduce_partial_gradients(t.model.trainable)
    return partial, len(calls)


def test_partial_norm_gradients_are_summed_in_one_all_reduce():
    """tp=2: the 9 RMSNorm weights of the debug model (2 per block + final) take one all-reduce, not 9
    (their values are checked by every tp parity test)."""
    partial, all_reduces = run_on_ranks(partial_gradient_all_reduces, 2, "tp=2")[0]
    assert (partial, all_reduces) == (9, 1)


def all_to_all_reduce_scatter_vs_gloo() -> tuple[torch.Tensor, torch.Tensor]:
    """(AllToAllReduceScatter's shard, gloo's reduce_scatter_single's shard) of one rank's buffer."""
    import torch.distributed as dist

    from core.data_parallel import AllToAllReduceScatter

    world, rank = dist.get_world_size(), dist.get_rank()
    buffer = torch.randn(world * 5, generator=torch.Generator().manual_seed(rank))
    ours, gloos = torch.empty(5), torch.empty(5)
    AllToAllReduceScatter()(ours, buffer, dist.group.WORLD, dist.ReduceOp.SUM)
    dist.reduce_scatter_single(gloos, buffer.clone())
    return ours, gloos


def test_all_to_all_reduce_scatter_matches_gloos():
    for ours, gloos in run_on_ranks(all_to_all_reduce_scatter_vs_gloo, 3):  # 3: not a power of two
        torch.testing.assert_close(ours, gloos)


def test_cpu_threads_share_the_cores(monkeypatch):
    from train.distributed import cpu_threads_per_rank

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads_per_rank() == 8          # python -m train: every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_threads_per_rank() == 2          # torchrun --nproc-per-node 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_rank() == 3          # the user's choice wins


@pytest.mark.parametrize("mesh, world, extra", [
    ("dp=4", 4, {"dp_shard": 2}),                                 # 2 replicas of a 2-way shard group
    ("dp=2,ep=2", 4, {"dp_shard": 1, "model": "debug-moe-v3"}),   # experts replicate over dp too
])
def test_hybrid_sharded_data_parallel_matches_single_process(mesh, world, extra):
    assert_same_run(on_mesh("", 1, **{k: v for k, v in extra.items() if k == "model"}),
                    on_mesh(mesh, world, dp_mode="hsdp", **extra))


def hsdp_layout(mesh: str, dp_shard: int) -> tuple:
    """(mesh dim names, placements, local rows / full rows) of one block weight under HSDP."""
    import tempfile

    from train.config import TrainConfig
    from train.loop import build_trainer

    with tempfile.TemporaryDirectory() as out:
        t = build_trainer(TrainConfig(**{**BASE, "mesh": mesh, "output_dir": out, "dp_mode": "hsdp",
                                         "dp_shard": dp_shard}))
        weight = t.model.module.layers["0"].attention.wq.weight
        return (weight.device_mesh.mesh_dim_names, tuple(str(p) for p in weight.placements),
                weight.to_local().shape[0] / weight.shape[0])


def test_hsdp_shards_within_groups_and_replicates_across_them():
    names, placements, fraction = run_on_ranks(hsdp_layout, 4, "dp=4", 2)[0]
    assert names == ("dp_replicate", "dp_shard_ep_cp") and placements == ("R", "S(0)")
    assert fraction == 0.5


def test_hsdp_shard_size_defaults_to_one_node():
    from core.mesh import MeshConfigError, MeshShape, hsdp_shard_size

    assert hsdp_shard_size(MeshShape(dp=8), 0, ranks_per_node=4) == 4          # 2 nodes: replicate across them
    assert hsdp_shard_size(MeshShape(dp=4, tp=2), 0, ranks_per_node=8) == 4    # one node holds it all
    assert hsdp_shard_size(MeshShape(dp=4, tp=4), 0, ranks_per_node=8) == 2
    assert hsdp_shard_size(MeshShape(dp=4), 2, ranks_per_node=8) == 2          # asked for
    with pytest.raises(MeshConfigError, match="--dp-shard 3 does not divide dp=4"):
        hsdp_shard_size(MeshShape(dp=4), 3, ranks_per_node=8)


def reported_run(mesh: str, log_every: int) -> dict:
    """Train 6 steps with ``--log-every``; (reported losses by step, final weights)."""
    import tempfile

    from train.config import TrainConfig
    from train.loop import train

    with tempfile.TemporaryDirectory() as out:
        t = train(TrainConfig(**{**BASE, "steps": 6, "mesh": mesh, "output_dir": out, "log_every": log_every}))
        return {"losses": {m["step"]: m["loss"] for m in t.history},
                "weights": {n: full(p) for n, p in t.model.named_parameters()}}


@pytest.mark.parametrize("mesh, world", [("", 1), ("dp=2", 2)])
def test_log_every_reports_the_same_run(mesh, world):
    every_step, every_third = (run_on_ranks(reported_run, world, mesh, n)[0] for n in (1, 3))
    assert sorted(every_third["losses"]) == [3, 6]
    assert every_third["losses"] == {s: every_step["losses"][s] for s in (3, 6)}
    for name, weight in every_step["weights"].items():
        assert torch.equal(every_third["weights"][name], weight), name


def test_steps_between_reports_read_nothing_on_the_host(monkeypatch):
    """A step that is not reported runs without .item(), .tolist() or bool() of a tensor."""
    import tempfile

    import torch.distributed as dist
    from rank_harness import free_port

    from train.config import TrainConfig
    from train.loop import build_trainer, train_step

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as out:
            t = build_trainer(TrainConfig(**{**BASE, "steps": 4, "log_every": 4, "output_dir": out,
                                             "model": "debug-moe-v3"}))

            def forbidden(*args, **kwargs):
                raise AssertionError("host sync between reports")

            with monkeypatch.context() as patch:
                for method in ("item", "tolist", "__bool__"):
                    patch.setattr(torch.Tensor, method, forbidden)
                assert train_step(t) == {}
            assert train_step(t) == {} and train_step(t) == {}
            assert train_step(t)["step"] == 4
    finally:
        dist.destroy_process_group()
