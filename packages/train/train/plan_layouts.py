"""What ``train.planner`` plans over: the GPU types, a model's parameters by how they are
sharded, and every layout (mesh, data-parallel mode, checkpointing, schedule, microbatches)
the trainer accepts on N GPUs; each check is the trainer's own (``train.validation``'s)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.mesh import MeshShape
from core.pipeline import PipelineConfigError, check_pipeline, layers_per_stage
from models.registry import family_of
from models.stats import ModelStats

from .config import TrainConfig
from .flops import PEAKS, model_flops_per_token
from .validation import check_batch, check_model_fits_mesh

AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Hardware:
    """One GPU type in a node of ``gpus_per_node``, bandwidths per GPU and direction, in bytes/s."""

    name: str
    bf16_flops: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    gpus_per_node: int
    source: str


# Peaks: train.flops' (dense bf16); memory: what nvidia-smi reports as the card's total (B200:
# the datasheet's 180 GB); NVLink: per GPU per direction (half the datasheet's bidirectional
# figure); network: one NIC per GPU, as in the DGX/HGX reference designs.
HARDWARE = {
    "h100": Hardware("H100 SXM 80GB", PEAKS["H100"]["bf16"], 81559 * 2**20, 450e9, 50e9, 8,
                     "H100 datasheet (NVLink 4 900 GB/s bidirectional); DGX H100: 8x ConnectX-7 400 Gb/s"),
    "h200": Hardware("H200 SXM 141GB", PEAKS["H200"]["bf16"], 143771 * 2**20, 450e9, 50e9, 8,
                     "H200 datasheet (NVLink 4 900 GB/s); HGX H200 with 8x 400 Gb/s NICs"),
    "a100": Hardware("A100 SXM 80GB", PEAKS["A100"]["bf16"], 81920 * 2**20, 300e9, 25e9, 8,
                     "A100 datasheet (NVLink 3 600 GB/s bidirectional); DGX A100: 8x ConnectX-6 200 Gb/s"),
    "b200": Hardware("B200 HGX 180GB", PEAKS["B200"]["bf16"], 180e9, 900e9, 50e9, 8,
                     "DGX B200 datasheet (NVLink 5 1.8 TB/s bidirectional; 8x ConnectX-7 400 Gb/s)"),
}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model by how they are sharded, per layer, and its head and tail.

    ``layers[i]``: {"tp": tensor-parallel matmul weights, "expert": routed experts (sharded by
    ep), "replicated": norms, routers, shared experts (sharded by FSDP only)}.
    """

    config: object
    layers: list[dict[str, int]]
    embedding: int      # tp-sharded (vocab-parallel)
    head_tp: int        # output projection, tp-sharded
    head_other: int     # final norm
    flops_per_token: float
    layer_costs: list[float]  # forward FLOPs per token of each layer, and of the head (what pipelines balance)
    head_cost: float
    _splits: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def stage_split(self, n_stages: int) -> list[list[int]]:
        """The layer ids of each of ``n_stages`` pipeline stages, as ``models.pipelined`` splits them."""
        if n_stages not in self._splits:
            self._splits[n_stages] = layers_per_stage(self.layer_costs, n_stages, last_cost=self.head_cost)
        return self._splits[n_stages]


def model_shape(config, seq_len: int) -> ModelShape:
    """Count ``config``'s parameters by role (``models.stats``: from the config, no module built)."""
    stats = ModelStats.of(config)
    return ModelShape(config, stats.layers, stats.embedding, stats.output, stats.final_norm,
                      model_flops_per_token(config, seq_len), stats.layer_costs(seq_len), stats.head_cost)


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    cp: int
    tp: int
    ep: int
    dp_mode: str               # fsdp | hsdp | replicate
    activation_checkpoint: str
    schedule: str = ""         # with pp > 1
    microbatches: int = 1      # pipeline microbatches (pp > 1) or gradient-accumulation steps (pp == 1)

    @property
    def mesh(self) -> str:
        return ",".join(f"{dim}={size}" for dim, size in
                        (("dp", self.dp), ("pp", self.pp), ("cp", self.cp), ("tp", self.tp), ("ep", self.ep))
                        if size > 1) or "dp=1"

    def microbatch_rows(self, global_batch: int) -> float:
        """Sequences in one microbatch (or accumulation pass) of one data-parallel rank."""
        return global_batch // (self.dp * self.ep) / self.microbatches

    def flags(self) -> list[str]:
        """The ``python -m train`` flags that run this layout."""
        flags = ["--mesh", self.mesh, "--dp-mode", self.dp_mode, "--activation-checkpoint", self.activation_checkpoint]
        if self.pp > 1:
            return [*flags, "--pp-schedule", self.schedule, "--microbatches", str(self.microbatches)]
        return [*flags, "--grad-accum-steps", str(self.microbatches)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(shape: ModelShape, gpus: int, seq_len: int, global_batch: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of ``gpus`` ranks the trainer would accept for this model and batch."""
    config = shape.config
    moe = family_of(config).has_experts
    run = TrainConfig(seq_len=seq_len, global_batch_size=global_batch)
    found = []
    for tp in [d for d in _divisors(gpus) if d <= gpus_per_node]:
        for cp in _divisors(gpus // tp):
            for ep in (_divisors(gpus // (tp * cp)) if moe else [1]):
                for pp in _divisors(gpus // (tp * cp * ep)):
                    dp = gpus // (tp * cp * ep * pp)
                    if _mesh_accepted(config, MeshShape(dp=dp, pp=pp, cp=cp, tp=tp, ep=ep), run):
                        found += _variants(config, dp, pp, cp, tp, ep, global_batch // (dp * ep))
    return found


def _mesh_accepted(config, shape: MeshShape, run: TrainConfig) -> bool:
    """The trainer's own mesh and batch checks (``train.validation``), which do not depend on the schedule."""
    try:
        check_model_fits_mesh(config, shape)
        check_batch(run, shape)
    except ValueError:  # MeshConfigError
        return False
    return True


def _variants(config, dp, pp, cp, tp, ep, local_batch: int) -> list[Layout]:
    """The data-parallel, checkpointing, schedule and microbatch choices of one mesh."""
    dp_modes = ["fsdp", "replicate"] + (["hsdp"] if dp > 1 and dp * ep * cp * tp > 8 else [])
    found = []
    for dp_mode in dp_modes:
        for ac in AC_MODES:
            if pp == 1:
                found += [Layout(dp, pp, cp, tp, ep, dp_mode, ac, "", m) for m in _divisors(local_batch) if m <= 16]
                continue
            for schedule in ("1f1b", "interleaved-1f1b"):
                for m in (pp, 2 * pp, 4 * pp, 8 * pp):
                    try:
                        check_pipeline(config.n_layers, pp, schedule, m, local_batch)
                    except PipelineConfigError:
                        continue
                    found.append(Layout(dp, pp, cp, tp, ep, dp_mode, ac, schedule, m))
    return found
