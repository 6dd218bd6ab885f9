"""The 5-D device mesh: parse ``dp=2,tp=4,pp=2``, validate it, build it, name its submeshes.

Layout (outermost to innermost): ``pp, dp, ep, cp, tp``. Neighbouring ranks share a tp
group because tensor-parallel traffic is the heaviest and belongs on the fastest links
(Megatron's "tp-cp-ep-dp-pp" order). For 16 ranks with ``dp=2,tp=4,pp=2``::

    rank = ((((pp * DP + dp) * EP + ep) * CP + cp) * TP + tp)

Every check here runs before any collective, so a bad mesh fails on every rank at once
with the same message instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "ep", "cp", "tp")  # outermost first: the order of the mesh axes users name
# The DeviceMesh itself splits dp in two (replicate outer, shard inner) for HSDP; without
# HSDP dp_replicate is 1 and the rank layout is the same.
DEVICE_MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "ep", "cp", "tp")


class MeshConfigError(ValueError):
    """A mesh or a model does not fit the world size or each other. The message says how to fix it."""


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the five parallel dimensions. ``dp=-1`` means "fill what the others leave"."""

    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """Parse ``"dp=2,tp=4,pp=2"`` (order free, missing dims are 1, ``dp=auto`` == ``dp=-1``)."""
        sizes: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in (text or "").split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep:
                raise MeshConfigError(f"mesh entry {item!r} has no '=': write it as e.g. 'tp=4'")
            if name not in MESH_DIMS:
                raise MeshConfigError(f"unknown mesh dimension {name!r} in {text!r}: use only {', '.join(MESH_DIMS)}")
            if name in sizes:
                raise MeshConfigError(f"mesh dimension {name!r} is given twice in {text!r}")
            value = value.strip().lower()
            if value in ("auto", "-1"):
                if name != "dp":
                    raise MeshConfigError(f"only dp may be 'auto'/-1 (it fills the world size), not {name!r}")
                sizes[name] = -1
                continue
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshConfigError(f"mesh size {name}={value!r} is not an integer") from None
            if sizes[name] < 1:
                raise MeshConfigError(f"mesh size {name}={sizes[name]} must be >= 1")
        return cls(**sizes)

    def resolve(self, world_size: int) -> MeshShape:
        """Fill ``dp=-1`` and check that the sizes multiply to ``world_size``."""
        others = self.pp * self.cp * self.tp * self.ep
        if self.dp == -1:
            if world_size % others:
                raise MeshConfigError(
                    f"cannot fill dp: world size {world_size} is not divisible by "
                    f"pp*cp*tp*ep = {others}; launch a multiple of {others} processes or change the mesh")
            return MeshShape(world_size // others, self.pp, self.cp, self.tp, self.ep)
        if self.dp * others != world_size:
            raise MeshConfigError(
                f"mesh {self} has {self.dp * others} ranks but the world size is {world_size}: "
                f"launch {self.dp * others} processes (torchrun --nproc_per_node) or make the sizes "
                f"multiply to {world_size} (dp=-1 fills what is left)")
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp * self.ep

    def __str__(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in ("dp", "pp", "cp", "tp", "ep"))


class ParallelMesh:
    """One ``DeviceMesh`` and the named (and flattened) submeshes the parallelisms use.

    The DeviceMesh has the five user-facing dims, with dp split into ``dp_replicate`` x
    ``dp_shard`` (``dp_shard`` = dp, i.e. no split, unless HSDP asks for one). Submeshes,
    each a 1-D ``DeviceMesh`` over the ranks that share all *other* coordinates:
      - ``tp``, ``cp``, ``ep``, ``pp``: the plain axes; ``dp`` = flatten(dp_replicate, dp_shard).
      - ``batch`` = flatten(dp, ep): ranks that read different samples.
      - ``dense_grad`` = flatten(dp, ep, cp): ranks whose dense-parameter gradients are
        summed (FSDP shards dense parameters over it).
      - ``expert_grad`` = flatten(dp, cp): ranks that hold the same experts and sum their
        gradients (ep shards the experts themselves).
      - ``sequence`` = flatten(cp, tp): ranks holding parts of the same sequences between
        MoE layers (cp splits the sequence, sequence parallel splits it again over tp).
      - ``tokens`` = flatten(dp, ep, cp, tp): ranks whose MoE layers route different tokens.
    And two 2-D meshes for HSDP (``hsdp``): ``dense_grad_hsdp`` = (dp_replicate,
    flatten(dp_shard, ep, cp)) and ``expert_grad_hsdp`` = (dp_replicate, flatten(dp_shard, cp)):
    parameters are sharded over the inner dim and replicated over the outer one.
    Flattened meshes are created once, eagerly, on every rank (creating them is collective).
    """

    def __init__(self, shape: MeshShape, device_type: str, dp_shard: int | None = None):
        self.shape = shape
        self.device_type = device_type
        dp_shard = dp_shard or shape.dp
        sizes = (shape.pp, shape.dp // dp_shard, dp_shard, shape.ep, shape.cp, shape.tp)
        self.mesh: DeviceMesh = init_device_mesh(device_type, sizes, mesh_dim_names=DEVICE_MESH_DIMS)
        m = self.mesh
        self._submeshes: dict[str, DeviceMesh] = {
            "dp": m["dp_replicate", "dp_shard"]._flatten("dp"),
            "batch": m["dp_replicate", "dp_shard", "ep"]._flatten("dp_ep"),
            "dense_grad": m["dp_replicate", "dp_shard", "ep", "cp"]._flatten("dp_ep_cp"),
            "expert_grad": m["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
            "sequence": m["cp", "tp"]._flatten("cp_tp"),
            "tokens": m["dp_replicate", "dp_shard", "ep", "cp", "tp"]._flatten("dp_ep_cp_tp"),
        }
        # Slicing a DeviceMesh builds a new object each time: the trainer asks every step.
        self._submeshes.update({name: m[name] for name in ("pp", "ep", "cp", "tp")})
        # (replicate, flattened shard) 2-D meshes: concatenated from their parts, as torch
        # deprecates slicing a flattened dim out of the root mesh.
        self._submeshes["dense_grad_hsdp"] = DeviceMesh._concatenate(
            [m["dp_replicate"], m["dp_shard", "ep", "cp"]._flatten("dp_shard_ep_cp")])
        self._submeshes["expert_grad_hsdp"] = DeviceMesh._concatenate(
            [m["dp_replicate"], m["dp_shard", "cp"]._flatten("dp_shard_cp")])

    def __getitem__(self, name: str) -> DeviceMesh:
        """``pm["tp"]`` or ``pm["dense_grad"]``: a submesh by axis or flattened name."""
        return self._submeshes[name]

    def size(self, name: str) -> int:
        return self[name].size()

    def local_rank(self, name: str) -> int:
        """This rank's coordinate along an axis (or flattened axis)."""
        return self[name].get_local_rank()

    def __repr__(self) -> str:
        return f"ParallelMesh({self.shape}, device={self.device_type})"


def check_divisible(what: str, value: int, dim: str, size: int, fix: str) -> None:
    """Raise ``MeshConfigError`` unless ``value`` splits evenly over mesh dim ``dim`` of ``size``."""
    if size > 1 and value % size:
        raise MeshConfigError(f"{what} = {value} is not divisible by {dim}={size}: {fix}")


def hsdp_shard_size(shape: MeshShape, requested: int, ranks_per_node: int) -> int:
    """How many dp ranks shard the parameters together under HSDP (the rest replicate).

    ``requested`` > 0 is taken as is (it must divide dp). 0 picks the largest divisor of dp
    whose replica group (dp_shard x ep x cp x tp ranks) fits in one node of
    ``ranks_per_node`` ranks: shard over the fast intra-node links, replicate across nodes.
    """
    if requested:
        if shape.dp % requested:
            divisors = [d for d in range(1, shape.dp + 1) if shape.dp % d == 0]
            raise MeshConfigError(f"--dp-shard {requested} does not divide dp={shape.dp}: use one of {divisors}")
        return requested
    inner = shape.ep * shape.cp * shape.tp
    fitting = [d for d in range(1, shape.dp + 1) if shape.dp % d == 0 and ranks_per_node % (d * inner) == 0]
    return max(fitting, default=1)


def build_mesh(shape: MeshShape, device_type: str, dp_shard: int | None = None) -> ParallelMesh:
    """Resolve ``shape`` against the initialized process group and build the mesh.

    ``dp_shard``: HSDP's shard-group size along dp (None: dp, no replicate dim).

    Collective: creating the mesh and its flattened submeshes creates process groups on
    every rank. Validation of the sizes happens first, so mismatches raise everywhere.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialized (train.distributed.init_distributed)")
    shape = shape.resolve(dist.get_world_size())
    return ParallelMesh(shape, device_type, dp_shard)
