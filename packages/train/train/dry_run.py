"""``python -m train --dry-run --world-size N [flags]``: one rank of an N-rank run, in one process.

The process joins torch's *fake* process-group backend as rank R of N (no peer exists: every
collective returns at once) and runs the trainer's own code path: validation (the same
one-line errors as a real run), the mesh, the model built on the meta device and parallelized
(TP/SP, FSDP/HSDP/replicate, CP, EP, the pipeline stages and schedule), then its shards
allocated as *fake* tensors (shapes and dtypes, no memory) and two whole training steps under
``FakeTensorMode``: forward, backward, gradient reductions, clipping, the optimizer step. The
first creates what every later step finds (optimizer state, FSDP's buffers); two trackers
watch the second, a steady-state step:

  - ``StepMemory`` (torch's ``torch.distributed._tools.MemTracker``): bytes alive (every
    tensor storage, the parameters and optimizer state included), and their peak;
  - ``CollectiveBytes``: every collective (c10d and functional), its buffer's bytes, and the
    mesh dims its process group spans.

Parameters, gradients and optimizer state are given in closed form (this rank's shard elements
x 4 bytes; AdamW keeps two moments); ``activations`` is what the step adds to parameters and
optimizer state at its peak (activations, all-gathered parameters, gradients, temporaries).
Ranks are simulated as CUDA ranks (``--dtype auto`` computes in bf16) unless ``--device cpu``.
``--dry-run-init`` also allocates the rank's shards for real and times their initialization.

Two things a fake tensor cannot answer are given instead: the pipeline's first-step vote
on static shapes (our stages always give them: ``ParallelModel.declare_static_shapes``) and the
expert all-to-all's split sizes, which come from routing, i.e. from the data: the dry run
assumes perfectly balanced routing (``_assume_balanced_routing``). Not simulated: the ZBV
schedule (MemTracker cannot follow its split backward) and MoE in float32 (torch's fake
grouped GEMM takes bf16 only); both are refused with one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from core.mesh import DEVICE_MESH_DIMS, ParallelMesh, build_mesh
from core.tensor_parallel import local_tensor
from models.distribute import distribute_model
from models.init import init_weights
from models.registry import family_of

from .config import TrainConfig, to_toml
from .flops import model_flops_per_token
from .model_source import model_label, resolve_sources
from .optim import build_optimizer
from .precision import compute_dtype
from .runs import RUNS_ROOT
from .validation import validate

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")  # ops of those namespaces that move no data
GPUS_PER_NODE = 8  # what HSDP's default shard group assumes for a simulated rank's node


class CollectiveBytes(TorchDispatchMode):
    """Per mesh dim, the bytes of every collective issued inside the block.

    A collective's bytes are those of its largest buffer: an all-gather's output, a
    reduce-scatter's input, an all-reduce's or all-to-all's tensor. ``group_dims`` maps a
    process group's name to the mesh dims it spans (e.g. "dp_shard" or "dp_ep_cp").
    """

    def __init__(self, group_dims: dict[str, str]):
        super().__init__()
        self.group_dims = group_dims
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COLLECTIVE_NAMESPACES and func._opname not in NOT_COLLECTIVES:
            leaves = tree_leaves((args, kwargs))
            dims = self._dims(leaves)
            size = max((t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor)), default=0)
            self.bytes[dims] = self.bytes.get(dims, 0) + size
            self.calls[dims] = self.calls.get(dims, 0) + 1
        return func(*args, **(kwargs or {}))

    def _dims(self, leaves: list) -> str:
        """The dims of the op's group: c10d ops carry the ProcessGroup (boxed for the dispatcher),
        functional ones its name."""
        for leaf in leaves:
            if isinstance(leaf, torch.ScriptObject) and leaf._type().qualified_name().endswith("ProcessGroup"):
                leaf = dist.ProcessGroup.unbox(leaf).group_name
            if isinstance(leaf, str) and leaf in self.group_dims:
                return self.group_dims[leaf]
        return "other"


class StepMemory(MemTracker):
    """torch's ``MemTracker`` for a step that runs its modules' forward more than once
    (pipeline microbatches, gradient accumulation).

    ``MemTracker`` also keeps statistics per module and refuses a root module's second forward,
    taking it for a second iteration. Only the step's totals are read here, so a module's
    statistics are dropped when its forward runs again; the bytes alive are untouched.
    """

    def _pre_fw_hook(self, module: torch.nn.Module, inputs) -> None:
        if not self._mod_tracker.is_bw:  # in backward a second forward is recomputation, which it knows
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)


def group_dims(pm: ParallelMesh) -> dict[str, str]:
    """Process-group name -> the mesh dims it spans, for every group the trainer's mesh made."""
    names = {pm.mesh[dim].get_group().group_name: dim for dim in DEVICE_MESH_DIMS}
    for key in ("dp", "batch", "dense_grad", "expert_grad", "sequence", "tokens", "dense_grad_hsdp",
                "expert_grad_hsdp"):
        for dim, name in enumerate(pm[key].mesh_dim_names):
            names.setdefault(pm[key].get_group(dim).group_name, name)
    names.setdefault(dist.group.WORLD.group_name, "world")
    return names


def closed_form_bytes(module: torch.nn.Module) -> dict[str, int]:
    """This rank's parameters, gradients and AdamW state (exp_avg, exp_avg_sq; step counters
    aside) in bytes: its shard elements x 4 (float32 master copies)."""
    params = sum(local_tensor(p).numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return {"params": params, "grads": params, "optimizer": 2 * params}


def check_dry_run(cfg: TrainConfig, world: int):
    """The real run's checks for ``world`` ranks, and what the dry run cannot simulate. No collective."""
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(min(world, GPUS_PER_NODE)))
    checked = validate(dataclasses.replace(cfg, device="cpu"), world)
    if checked.shape.pp > 1 and cfg.pp_schedule == "zbv":
        raise ValueError("--dry-run does not simulate --pp-schedule zbv (torch's MemTracker cannot follow its split "
                         "backward): simulate interleaved-1f1b, which holds as many stages per rank")
    device = "cpu" if cfg.device == "cpu" else "cuda"
    if family_of(checked.model_config).has_experts and compute_dtype(cfg.dtype, device, cfg.float8) == torch.float32:
        raise ValueError("--dry-run of an MoE model needs bf16 compute (torch's fake grouped GEMM takes bf16 only): "
                         "add --dtype bfloat16, or leave --dtype auto without --device cpu")
    return checked


def simulated_rank(cfg: TrainConfig, world: int, rank: int) -> dict:
    """Rank ``rank``'s report (``module docstring``): build, two fake steps, memory and collectives."""
    checked = check_dry_run(cfg, world)
    dtype = compute_dtype(cfg.dtype, "cpu" if cfg.device == "cpu" else "cuda", cfg.float8)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        return _simulate(cfg, checked, dtype, world, rank)
    finally:
        dist.destroy_process_group()


def _simulate(cfg: TrainConfig, checked, dtype: torch.dtype, world: int, rank: int) -> dict:
    from .loop import apply_gradients, parallel_options, step_recipe  # the trainer's own pieces

    start = time.perf_counter()
    pm = build_mesh(checked.shape, "cpu", checked.dp_shard)
    options, recipe = parallel_options(cfg, dtype), step_recipe(cfg, checked.tokenizer.eos_id, dtype)
    init_seconds = _time_init(checked.model_config, pm, options, recipe, cfg.seed) if cfg.dry_run_init else None
    model = distribute_model(checked.model_config, pm, torch.device("meta"), options, recipe, seed=None)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.materialize(torch.device("cpu"))  # fake CPU tensors of the shard shapes: no memory
        optimizer = build_optimizer(cfg, model.module)
    build_seconds = time.perf_counter() - start
    rows = cfg.global_batch_size // model.batch_shard[1]
    tokens = torch.randint(0, checked.model_config.vocab_size, (rows, cfg.seq_len))
    trainer = _StepView(cfg, model, optimizer)
    model.declare_static_shapes()  # a pipeline's first-step shape vote reads fake tensors on the host
    _assume_balanced_routing(model)
    with fake:  # step 1, untracked: creates the optimizer state and FSDP's buffers, as any first step does
        apply_gradients(trainer, _gradients(model, tokens, tokens))
    memory, collectives = StepMemory(), CollectiveBytes(group_dims(pm))
    memory.track_external(model.module, optimizer)
    with fake, memory, collectives:  # a steady-state step, up to the optimizer's update
        _gradients(model, tokens, tokens)
        model.clip_gradients(cfg.max_grad_norm)
    # The fused AdamW update is in place and allocates nothing (its fake kernel returns new tensors,
    # which a tracker would count): at the update, parameters, gradients and state are what is alive.
    steady = closed_form_bytes(model.module)
    peak = max(_total(memory.get_tracker_snapshot("peak")), sum(steady.values()))
    report = {
        "rank": rank, "stage": pm.local_rank("pp"), "stages": model.stage_ids,
        # activations: all the step adds at its peak to what stays between steps (parameter shards,
        # optimizer state): activations, gathered parameters, gradients, temporaries.
        "memory_bytes": {**steady, "activations": peak - steady["params"] - steady["optimizer"], "peak": peak},
        "collectives": dict(sorted(collectives.bytes.items())),
        "collective_calls": dict(sorted(collectives.calls.items())),
        "flops_per_step": model_flops_per_token(checked.model_config, cfg.seq_len)
        * cfg.global_batch_size * cfg.seq_len / world,
        "build_seconds": build_seconds,
    }
    if init_seconds is not None:
        report["init_seconds"] = init_seconds
    return report


def _assume_balanced_routing(model) -> None:
    """Give every MoE layer's all-to-all an even split (``core.expert_parallel``'s
    ``assume_balanced``): its split sizes come from routing decisions, i.e. from the data,
    which fake tensors do not have. Each rank then sends every other rank the same number of
    rows, what load balancing aims at; skewed routing moves more bytes and memory."""
    for part in model.parts:
        for layer in family_of(part.config).moe_layers(part):
            layer.routed_ffn = functools.partial(layer.routed_ffn, assume_balanced=True)


def _gradients(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, backward and every gradient reduction of one step; the loss (a device tensor)."""
    loss_share = model.forward_backward(inputs, labels)
    model.finish_gradients()
    return model.reduce_loss(loss_share, on_host=False)


@dataclasses.dataclass
class _StepView:
    """What ``train.loop.apply_gradients`` reads of a Trainer."""

    cfg: TrainConfig
    model: object
    optimizer: torch.optim.Optimizer

    def __post_init__(self):
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)


def _total(snapshot: dict) -> int:
    """Bytes alive in a MemTracker snapshot, over every device."""
    return sum(per_device["Total"] for per_device in snapshot.values())


def _time_init(model_config, pm: ParallelMesh, options, recipe, seed: int) -> float:
    """Seconds to initialize this rank's shards, allocated for real on the CPU (then freed)."""
    model = distribute_model(model_config, pm, torch.device("meta"), options, recipe, seed=None)
    model.materialize(torch.device("cpu"))
    start = time.perf_counter()
    for part in model.parts:
        init_weights(part, model_config.n_layers, seed)
    return time.perf_counter() - start


def measure_real_step(t) -> dict:
    """What a dry run predicts, measured on a real Trainer ``t`` (any backend): two steps, the
    second tracked. Returns {"peak": bytes of tensor storage alive at once, "collectives":
    bytes per mesh dim}; the first step creates the optimizer state, as in the dry run."""
    from .loop import apply_gradients

    inputs, labels = next(t.batches)
    for _step in (1, 2):  # the trackers of the second step are kept
        memory, collectives = StepMemory(), CollectiveBytes(group_dims(t.model.mesh))
        memory.track_external(t.model.module, t.optimizer)
        with memory, collectives:
            apply_gradients(t, _gradients(t.model, inputs, labels))
    return {"peak": _total(memory.get_tracker_snapshot("peak")), "collectives": collectives.bytes}


def ranks_to_simulate(spec: str, world: int, pp: int) -> list[int]:
    """``--dry-run-ranks``: "" (one rank per pipeline role), "all", or "R,R,...".

    The default plays the first rank of the first, a middle and the last pipeline stage
    (rank 0 alone without pp): the roles whose memory differs (the first holds the embedding
    and, in 1F1B, the most microbatches in flight; the last the output layer and the loss).
    Ranks inside a stage differ only by their data, so one of them speaks for all.
    """
    if not spec:
        ranks_per_stage = world // pp  # pp is the outermost mesh dim: stage p's ranks follow p's
        return [p * ranks_per_stage for p in sorted({0, pp // 2, pp - 1})]
    if spec == "all":
        return list(range(world))
    try:
        ranks = sorted({int(r) for r in spec.split(",") if r.strip()})
    except ValueError:
        raise ValueError(f"--dry-run-ranks {spec!r}: use all or rank numbers like 0,7") from None
    if not ranks or ranks[0] < 0 or ranks[-1] >= world:
        raise ValueError(f"--dry-run-ranks {spec!r}: ranks must lie in [0, {world - 1}] (--world-size {world})")
    return ranks


def dry_run(cfg: TrainConfig) -> list[dict]:
    """Simulate the chosen ranks, print a table, write ``<output dir>/dry_run.json``; return the reports.

    One rank runs in this process; several run one per child process (torch's DTensor caches
    key on the mesh's shape, not on the rank, so one process cannot play two ranks of one mesh).
    """
    if cfg.world_size < 1:  # before the rank list is read; validate() says it again for the child processes
        raise ValueError("--dry-run needs --world-size N (the number of ranks to simulate), N >= 1")
    cfg = resolve_sources(cfg)
    checked = check_dry_run(cfg, cfg.world_size)  # a mistake is one line here, not one per child process
    ranks = ranks_to_simulate(cfg.dry_run_ranks, cfg.world_size, checked.shape.pp)
    out = Path(cfg.output_dir or RUNS_ROOT / (cfg.run_name or f"dry-run-{model_label(cfg)}-{cfg.world_size}"))
    reports = [simulated_rank(cfg, cfg.world_size, ranks[0])] if len(ranks) == 1 else \
        [_in_child_process(cfg, r) for r in ranks]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dry_run.json").write_text(json.dumps({"world_size": cfg.world_size, "mesh": cfg.mesh,
                                                  "model": model_label(cfg), "ranks": reports}, indent=1))
    print(report_table(reports))
    print(f"wrote {out / 'dry_run.json'}")
    return reports


def _in_child_process(cfg: TrainConfig, rank: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        config, result = Path(folder) / "config.toml", Path(folder) / "out"
        config.write_text(to_toml(dataclasses.replace(cfg, dry_run_ranks=str(rank))))
        done = subprocess.run([sys.executable, "-m", "train", "--config", str(config), "--output-dir", str(result)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"simulating rank {rank} failed: {last}")
        return json.loads((result / "dry_run.json").read_text())["ranks"][0]


def report_table(reports: list[dict]) -> str:
    """One row per simulated rank: memory by kind (GiB), collective bytes per step by mesh dim."""
    gib = 2**30
    lines = ["| rank | stages | params GiB | grads GiB | optimizer GiB | activations GiB | peak GiB | TFLOP/step "
             "| collectives per step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        m = r["memory_bytes"]
        comms = ", ".join(f"{dim} {nbytes / gib:.2f} GiB" for dim, nbytes in r["collectives"].items()) or "none"
        stages = ",".join(map(str, r["stages"]))
        lines.append(f"| {r['rank']} | {stages} | {m['params'] / gib:.2f} | {m['grads'] / gib:.2f} "
                     f"| {m['optimizer'] / gib:.2f} | {m['activations'] / gib:.2f} | {m['peak'] / gib:.2f} "
                     f"| {r['flops_per_step'] / 1e12:,.1f} "
                     f"| {comms} |")
    return "\n".join(lines)
