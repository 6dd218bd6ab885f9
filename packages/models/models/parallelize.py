"""Apply the parallelisms to a model (or one pipeline stage of it) on a ParallelMesh.

Order matters and follows what each API expects (with ``float8``, Linear layers first become
torchao's ``Float8Linear``, ``core.float8``; every step below treats them as the Linears they were):
  0. expert parallel: each MoE layer keeps its ep rank's experts (DTensors ``Shard(0)`` over
     ep) and dispatches its tokens over the ep group,
  1. tensor parallel (``parallelize_module``) turns Linear weights into tp-sharded DTensors,
  2. FSDP2 (``fully_shard``) then shards those again over the dense-gradient mesh, making
     2-D DTensors (FSDP dim outer, tp inner); experts are their own FSDP units over the
     expert-gradient mesh (dp x cp), because ep ranks hold different experts. With
     ``dp_mode="replicate"`` FSDP2's twin ``replicate`` keeps them whole instead. Either
     applies the one mixed-precision recipe (float32 master weights, bf16 compute, float32
     gradient reduction), on a mesh of one rank too: every mesh computes the same way.
  3. context parallel needs no parameter change: attention modules get ring (or
     all-gather) attention and zigzag RoPE positions, and ``ParallelModel.local_batch``
     gives each cp rank its zigzag slice of the sequence.
  4. activation checkpointing and torch.compile wrap each block's forward (before FSDP,
     whose gathers and reduce-scatters run in hooks on the block, outside that region).
The model may still be on the meta device: nothing is allocated until ``to_empty``.

``build_single_stage_model`` does all of it to a whole model and returns the ``SingleStageModel`` that
runs its steps (``models.pipelined.build_pipelined_model`` is the pipeline's twin, and
``models.distribute.distribute_model`` picks between them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from core.activation_checkpoint import apply_activation_checkpointing
from core.context_parallel import cp_attention
from core.data_parallel import apply_fsdp, apply_replicate
from core.expert_parallel import expert_parallel_ffn
from core.float8 import convert_to_float8
from core.mesh import ParallelMesh
from core.tensor_parallel import apply_tensor_parallel, wait_for_output
from core.zigzag import zigzag_positions

from .family import ModelFamily
from .init import init_weights
from .moe.load import StepLoad
from .parallel_model import GradientRules, SingleStageModel, StepRecipe
from .registry import build_model, family_of

DP_MODES = ("fsdp", "hsdp", "replicate")


@dataclass(frozen=True)
class ParallelOptions:
    """How ``shard_module`` applies each technique (the mesh says how far).

    ``dp_mode``: "fsdp" shards parameters over all data-parallel ranks (ZeRO-3); "hsdp" shards
    them within groups of ``dp_shard`` dp ranks and replicates them across groups (the mesh's
    ``dp_replicate`` dim: all-reduce of the reduce-scattered shards); "replicate" keeps them
    whole and sums their gradients with one all-reduce (``core.data_parallel.apply_replicate``).
    ``param_dtype``: the compute dtype parameters are cast to (None: float32, no cast).
    ``reshard_after_forward=False`` keeps FSDP parameters gathered from the forward to the
    backward (a pipeline stage runs many microbatches per step; see ``models.pipelined``).
    ``fsdp_unit_params``: consecutive blocks smaller than this share one FSDP unit
    (``core.data_parallel.apply_fsdp``); 0: one unit per block.
    ``cp_method``: the context-parallel attention (``core.context_parallel``).
    ``activation_checkpoint``: none | full | selective (``core.activation_checkpoint``).
    ``compile``: torch.compile each block.
    ``pp_schedule``, ``microbatches``: the pipeline schedule and its microbatches per step (0: 2 * pp).
    ``float8``: the Linear layers' matmuls in float8 (``core.float8``; ``keeps_high_precision`` names
    the layers that stay in the compute dtype).
    """

    dp_mode: str = "fsdp"
    param_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True
    fsdp_unit_params: int = 10_000_000
    cp_method: str = "ring"
    activation_checkpoint: str = "none"
    compile: bool = False
    pp_schedule: str = "1f1b"
    microbatches: int = 0
    float8: bool = False


def keeps_high_precision(name: str) -> bool:
    """Linear layers that ``--float8`` leaves in the compute dtype: the output projection, whose
    logits go straight into the softmax over the vocabulary (float8 keeps ~2 significant digits:
    the loss itself would carry its error), and MoE routers, whose top-k choice flips on small
    errors and whose matmul (dim x n_experts) is too small for float8 to save time."""
    return name == "output" or name.endswith("router.gate")


def shard_module(model: nn.Module, pm: ParallelMesh, options: ParallelOptions = ParallelOptions()) -> None:
    """Shard ``model`` (a family's model or pipeline stage, ``model.config`` its config) in place over
    ``pm``: EP on ``pm["ep"]``, TP/SP on ``pm["tp"]``, context parallel attention on ``pm["cp"]``,
    checkpointing/compile per block, then FSDP on ``pm["dense_grad"]`` (experts on ``pm["expert_grad"]``).
    """
    if options.dp_mode not in DP_MODES:
        raise ValueError(f"unknown dp_mode {options.dp_mode!r}: use one of {', '.join(DP_MODES)}")
    family = family_of(model.config)
    blocks = list(model.layers.values())
    if options.float8:
        convert_to_float8(model, keeps_high_precision)
    apply_expert_parallel(family.moe_layers(model), pm)
    apply_tensor_parallel(model, pm["tp"], family.tensor_parallel_plan(model))
    if pm.size("tp") > 1:
        model.tie_output()  # TP gave a tied embedding and output each their own DTensor weight
        check_tensor_parallel_coverage(model, family)
    if pm.size("cp") > 1:
        apply_context_parallel(family.attention_layers(model), pm["cp"].get_group(), pm.local_rank("cp"),
                               pm.size("cp"), options.cp_method)
    hsdp, data_parallel = options.dp_mode == "hsdp", wraps_data_parallel(pm, options)
    inner_units = expert_units(family.moe_layers(model), pm, options.dp_mode) if data_parallel else []
    if options.compile and pm.size("tp") > 1 and model.tok_embeddings is not None:
        wait_for_output(model.tok_embeddings)  # the first compiled block's input
    for block in blocks:
        mode = options.activation_checkpoint
        if mode == "selective" and _holds_any(block, inner_units):
            mode = "full"  # FSDP's hooks inside do not replay the same ops in a recompute, as selective needs
        checkpoint_and_compile(block, mode, options.compile, family)
    if data_parallel and options.dp_mode == "replicate":
        apply_replicate(model, pm["dense_grad"], param_dtype=options.param_dtype, inner_units=inner_units)
    elif data_parallel:
        apply_fsdp(model, pm["dense_grad_hsdp" if hsdp else "dense_grad"], blocks, param_dtype=options.param_dtype,
                   reshard_after_forward=options.reshard_after_forward, inner_units=inner_units,
                   min_unit_params=options.fsdp_unit_params)


def _holds_any(block: nn.Module, units: list[tuple[nn.Module, object]]) -> bool:
    return any(unit is sub for unit, _ in units for sub in block.modules())


def checkpoint_and_compile(block: nn.Module, checkpoint_mode: str, compile: bool, family: ModelFamily) -> None:
    """Activation-checkpoint (``core.activation_checkpoint``) and ``torch.compile`` one block's forward.

    The block's forward, not its module call, is compiled: its name, parameters and the
    hooks on it (FSDP's all-gather and reduce-scatter) are unchanged and stay outside the
    graph. Every block runs the same code, so dynamo traces one graph and reuses it for
    every layer (parameters are graph inputs): compile time does not grow with depth.
    The order depends on the checkpoint mode:
      * selective: the checkpoint is inside the compiled forward; the compiler applies the
        save-or-recompute policy to the ops of its graph.
      * full: the compiled forward is inside the checkpoint, which reruns it in backward.
        (Compiled around a full checkpoint, tensor-parallel blocks fail in torch 2.13: the
        partitioner saves the DeviceMesh for backward as if it were a tensor.)
    The MoE experts stay eager: they are grouped GEMMs already (nothing for inductor to
    fuse), and grouped_mm's compile-time shape check accepts bf16 only. What dynamo cannot
    trace (ring attention's point-to-point sends) also runs eagerly.
    """
    if compile:
        for moe in family.moe_layers(block):
            moe.experts.forward = torch.compiler.disable(moe.experts.forward)
    if compile and checkpoint_mode != "selective":
        block.forward = torch.compile(block.forward)
    apply_activation_checkpointing([block], checkpoint_mode)
    if compile and checkpoint_mode == "selective":
        block.forward = torch.compile(block.forward)


def wraps_data_parallel(pm: ParallelMesh, options: ParallelOptions) -> bool:
    """Whether ``shard_module`` wraps the model in FSDP or ``replicate``: with data parallel ranks to
    sum gradients over, or to cast parameters to a lower compute dtype (on one rank too, so that
    bf16 is one recipe on every mesh)."""
    return pm.size("dense_grad") > 1 or options.param_dtype is not None


def apply_expert_parallel(moe_layers: list[nn.Module], pm: ParallelMesh) -> None:
    """With ep > 1, every MoE layer keeps only its ep rank's experts and sends each routed token
    to the rank holding its expert (``core.expert_parallel``). No communication here."""
    if pm.size("ep") == 1:
        return
    for moe in moe_layers:
        moe.routed_ffn = functools.partial(expert_parallel_ffn, group=pm["ep"].get_group())
        moe.experts.shard(pm["ep"])


def check_tensor_parallel_coverage(model: nn.Module, family: ModelFamily) -> None:
    """Under tp > 1 every parameter must be placed by the TP plan (a DTensor over tp) or run on
    this rank's own part of the work (``ModelFamily.tp_partial_parameters``): a plain parameter that
    neither covers would silently get a partial or tp-fold gradient. Raises ValueError naming it."""
    partial = {id(p) for p in family.tp_partial_parameters(model)}
    uncovered = [name for name, p in model.named_parameters()
                 if not isinstance(p, DTensor) and id(p) not in partial]
    if uncovered:
        raise ValueError(f"parameters {uncovered} are not in the tensor-parallel plan: give their module a "
                         f"style in its family's plan.py (or a token-split plan, like the MoE layers')")


def gradient_rules(module: nn.Module, model_config, pm: ParallelMesh) -> GradientRules:
    """The reductions ``ParallelModel.finish_gradients`` owes this layout (see ``GradientRules``):
    the tp-partial parameters of ``module`` (a model, a stage or a list of stages) get summed over tp."""
    tp_group = pm["tp"].get_group() if pm.size("tp") > 1 else None
    partial = [p for p in family_of(model_config).tp_partial_parameters(module) if p.requires_grad]
    return GradientRules(partial, tp_group)


def step_load(module: nn.Module, model_config, pm: ParallelMesh, recipe: StepRecipe,
              device: torch.device) -> StepLoad | None:
    """The step state of an MoE model's layers (``models.moe.load``); None for a family without experts.

    Sequences are split over cp x tp (context parallel, then sequence parallel); tokens over
    dp x ep x cp x tp. The aux loss is the mean over the global batch's sequences.
    """
    family = family_of(model_config)
    if not family.has_experts:
        return None
    sequence_group = pm["sequence"].get_group() if pm.size("sequence") > 1 else None
    token_group = pm["tokens"].get_group() if pm.size("tokens") > 1 else None
    return family.step_load(module, model_config, sequence_group, token_group, recipe.global_batch_size, device)


def expert_units(moe_layers: list[nn.Module], pm: ParallelMesh, dp_mode: str) -> list[tuple[nn.Module, object]]:
    """The FSDP (or ``replicate``) units experts form before the blocks are wrapped: (module, mesh) pairs.

    With ep == 1 the experts are ordinary parameters of their block (dp x cp is then the
    whole dense-gradient mesh). With ep > 1 their gradients must be summed over dp x cp
    only, so each expert group is its own unit on ``pm["expert_grad"]``; that mesh may
    have a single rank (nothing to shard or sum), and the unit still gives the experts
    FSDP's mixed precision, so they compute in the same dtype as the rest of the block.
    Under HSDP the experts are sharded over the inner part of that mesh and replicated over
    ``dp_replicate``, like the dense parameters.
    """
    if pm.size("ep") == 1:
        return []
    mesh = pm["expert_grad_hsdp" if dp_mode == "hsdp" else "expert_grad"]
    return [(moe.experts, mesh) for moe in moe_layers]


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device (sharded) model's storage on ``device``; values come from models.init."""
    model.to_empty(device=device)


def shard_and_initialize(model: nn.Module, pm: ParallelMesh, device: torch.device, seed: int | None,
                         options: ParallelOptions = ParallelOptions()) -> None:
    """Shard a meta-device model (or pipeline stage) over ``pm``, allocate this rank's shards on
    ``device`` and fill them with the mesh-invariant initial values (``models.init``).
    ``seed`` None leaves them uninitialized (a dry run, which allocates on the meta device).

    Collective only where ``shard_module`` is (FSDP setup); initialization issues none.
    """
    shard_module(model, pm, options)
    materialize(model, device)
    if seed is not None:
        init_weights(model, model.config.n_layers, seed)


def build_single_stage_model(model_config, pm: ParallelMesh, device: torch.device, options: ParallelOptions,
                             recipe: StepRecipe, seed: int | None) -> SingleStageModel:
    """The whole model of ``model_config``, sharded over ``pm`` and initialized, with its step
    rules. Collective where ``shard_module`` is (FSDP setup)."""
    with torch.device("meta"):
        model = build_model(model_config)
    shard_and_initialize(model, pm, device, seed, options)
    return SingleStageModel(model, pm, device, recipe, gradient_rules(model, model_config, pm),
                        step_load(model, model_config, pm, recipe, device))


def apply_context_parallel(attention_layers: list[nn.Module], cp_group, cp_rank: int, cp_size: int,
                           method: str = "ring") -> None:
    """Make every attention layer (``ModelFamily.attention_layers``) attend over the whole sequence
    held by the cp group.

    Each rank holds its zigzag slice of the sequence (chunks r and 2cp-1-r), so its RoPE
    positions are those chunks' global positions, and attention runs over the cp group
    by ``method``: a ring of P2P K/V sends (``core.ring_attention``) or one all-gather of
    K/V per layer (``core.allgather_attention``).
    """
    attention = cp_attention(method)

    def zigzag_local_positions(local_seq_len: int, device: torch.device) -> torch.Tensor:
        return zigzag_positions(local_seq_len * cp_size, cp_rank, cp_size, device)

    for layer in attention_layers:
        layer.attention_fn = functools.partial(attention, group=cp_group)
        layer.position_fn = zigzag_local_positions
