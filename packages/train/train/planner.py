"""Which mesh to rent: every layout of a model on N GPUs, its memory per rank, step time and
tokens/s per GPU, estimated in closed form in milliseconds (``tools/plan.py`` prints them, the
dry run checks the chosen ones).

A layout is a mesh (dp, pp, cp, tp, ep), a data-parallel mode, an activation-checkpointing
mode, and with pp a schedule and a microbatch count. For each:

Memory of the fullest rank (the first, a middle and the last pipeline stage are costed):
    16 x P_r        parameters, gradients (float32 each) and AdamW's two moments, P_r being
                    the rank's own shard, counted parameter by parameter (tp, ep, FSDP/HSDP)
    + gathered      the bf16 parameters FSDP all-gathers: two blocks at a time (one computing,
                    one prefetched); a pipeline stage keeps all of its own gathered for the
                    step, with their unsharded float32 gradients (``models.pipelined``), and
                    gradient accumulation keeps those gradients unsharded until its last pass
    + receive       a pipeline stage's receive buffers, one per microbatch
    + activations   bytes a layer saves per token (``ActivationBytes``, per checkpointing
                    mode, in units of dim, fitted to the dry run) x tokens x layers, times the
                    microbatches the schedule keeps in flight on that stage; plus what is
                    outside the layers, a layer recomputed at once (checkpointing), logits
A layout fits when that is at most ``USABLE_MEMORY`` of the card.

Step time (one step, every rank in lockstep):
    compute         model FLOPs per GPU / (peak bf16 x ``--efficiency``); x 4/3 with full
                    recomputation (the forward runs twice)
    + exposed comms tp (sequence-parallel all-gathers and reduce-scatters), cp (ring K/V
                    passes), ep (all-to-alls) and pp (P2P) wait on the critical path; dp
                    (FSDP gathers and reduce-scatters, all-reduces) overlaps compute, so
                    only what exceeds it counts
    + bubble        pipeline fill and drain: (pp - 1) / (v x m) of the compute
Each collective's time is its ring traffic, (n - 1) / n of its bytes (twice for an
all-reduce), over the bandwidth of the slowest link its group crosses: NVLink when the
group lies inside a node, the network otherwise (``core.mesh`` lays out pp, dp, ep, cp, tp
from the outermost, so tp's neighbours share a node first).

Ignored: kernel efficiency differences between layouts (small matmuls at high tp run
slower), overlap of tp/cp/ep communication with compute, network congestion and topology
beyond node/not-node, stragglers, the optimizer step's own time, data loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.mesh import MeshShape, hsdp_shard_size
from core.pipeline import SCHEDULES, stages_of_rank

from .plan_layouts import HARDWARE, Hardware, Layout, ModelShape, layouts, model_shape

USABLE_MEMORY = 0.90  # of the card: the CUDA context, NCCL's buffers and allocator fragmentation take the rest
LINK_EFFICIENCY = 0.80  # share of a link's bandwidth a large NCCL ring collective reaches (nccl-tests busbw)
COMPUTE_BYTES = 2  # bf16 activations, gathered parameters and communicated tensors
__all__ = ["HARDWARE", "Estimate", "Layout", "as_json", "estimate", "model_shape", "plan", "rank_memory",
           "step_parts"]


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes a transformer block saves for backward per token, as ``shared + split / tp`` in units
    of the model dim (bf16). ``shared``: what sequence parallel cannot split (the all-gathered
    inputs of the column-parallel matmuls); ``split``: the rest, sharded over tp.

    Fitted to ``python -m train --dry-run`` of llama3-8b's block (dim 4096, ffn 14336, 8 kv
    heads; 2 and 4 layers, 32768 tokens, tp = 1, 4, 8): the slope per layer was 57.2, 17.4 and
    10.8 dims per token without checkpointing, 25.0, 14.3 and 11.1 with selective. ``ffn`` is
    the feed-forward's share at ffn = 3.5 x dim (SwiGLU keeps w1's and w3's outputs, their
    silu and product: 4 x ffn x 2 bytes), re-scaled for other widths and for MoE experts.
    """

    shared: float
    split: float
    ffn: float


ACTIVATIONS = {
    "none": ActivationBytes(shared=4.1, split=53.0, ffn=28.0),
    "selective": ActivationBytes(shared=10.7, split=14.3, ffn=12.3),
    # full: only each block's input stays (bf16, a tp slice of the sequence): 2 bytes per dim
    "full": ActivationBytes(shared=0.0, split=2.0, ffn=0.0),
}
OUTSIDE_LAYERS = ActivationBytes(shared=1.3, split=19.3, ffn=0.0)  # embedding output and its gradient, final norm
LOGIT_BYTES = (8.65, 1.59)  # per token per vocab entry: shared + split/tp (float32 logits, their softmax, gradient)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory_bytes: int            # the fullest rank's peak
    memory_by_kind: dict         # that rank's: state, gathered, activations
    step_seconds: float
    seconds_by_part: dict        # compute, bubble, and the exposed time of each mesh dim's communication
    tokens_per_second_per_gpu: float
    mfu: float
    fits: bool


def estimate(shape: ModelShape, layout: Layout, gpus: int, seq_len: int, global_batch: int, hw: Hardware,
             efficiency: float) -> Estimate:
    """Memory of the fullest rank and the step time of ``layout`` (the module docstring's model)."""
    roles = sorted({0, layout.pp // 2, layout.pp - 1})
    memory = max((rank_memory(shape, layout, r, seq_len, global_batch, hw.gpus_per_node) for r in roles),
                 key=lambda kinds: sum(kinds.values()))
    parts = step_parts(shape, layout, gpus, seq_len, global_batch, hw, efficiency)
    step = sum(parts.values())
    tokens = global_batch * seq_len
    peak = sum(memory.values())
    return Estimate(layout, int(peak), memory, step, parts, tokens / step / gpus,
                    shape.flops_per_token * tokens / gpus / step / hw.bf16_flops,
                    peak <= USABLE_MEMORY * hw.memory_bytes)


def _stage_layers(shape: ModelShape, layout: Layout, pp_rank: int, seq_len: int) -> tuple[list[list[int]], bool, bool]:
    """The layer ids of each stage ``pp_rank`` runs, and whether it runs the first and the last stage."""
    if layout.pp == 1:
        return [list(range(len(shape.layers)))], True, True
    v = SCHEDULES[layout.schedule].stages_per_rank
    split = shape.stage_split(layout.pp * v)
    held = stages_of_rank(pp_rank, layout.pp, layout.schedule)
    return [split[s] for s in held], 0 in held, layout.pp * v - 1 in held


def _shard_sizes(layout: Layout, gpus_per_node: int) -> tuple[int, int]:
    """How many ranks FSDP shards dense and expert parameters over (``core.mesh``'s dense_grad and
    expert_grad meshes; HSDP: their shard dims)."""
    if layout.dp_mode == "replicate":
        return 1, 1
    dp_shard = layout.dp
    if layout.dp_mode == "hsdp":  # the trainer's choice: the largest shard group that fits in a node
        shape = MeshShape(dp=layout.dp, pp=layout.pp, cp=layout.cp, tp=layout.tp, ep=layout.ep)
        dp_shard = hsdp_shard_size(shape, 0, gpus_per_node)
    return dp_shard * layout.ep * layout.cp, dp_shard * layout.cp


def _output_params(shape: ModelShape, holds_embedding: bool) -> int:
    """The output projection's parameters on a rank: none of its own where it is tied to the
    embedding the rank holds (a tied output's pipeline replica counts in full)."""
    return 0 if shape.config.tie_embeddings and holds_embedding else shape.head_tp


def _model_parallel_params(layer: dict[str, int], layout: Layout) -> float:
    """A layer's parameters on one rank before FSDP shards them (tp and ep applied)."""
    return layer["tp"] / layout.tp + layer["replicated"] + layer["expert"] / layout.ep


def rank_memory(shape: ModelShape, layout: Layout, pp_rank: int, seq_len: int, global_batch: int,
                gpus_per_node: int) -> dict[str, float]:
    """Peak bytes of the first rank of pipeline rank ``pp_rank``, by kind (module docstring)."""
    stages, first, last = _stage_layers(shape, layout, pp_rank, seq_len)
    held = [shape.layers[i] for stage in stages for i in stage]
    dense_shard, expert_shard = _shard_sizes(layout, gpus_per_node)
    t = layout.tp
    params = sum((lay["tp"] / t + lay["replicated"]) / dense_shard + lay["expert"] / (layout.ep * expert_shard)
                 for lay in held)
    params += ((shape.embedding / t if first else 0) + ((_output_params(shape, first) / t + shape.head_other)
                                                        if last else 0)) / dense_shard
    per_layer = [_model_parallel_params(lay, layout) for lay in held]
    if dense_shard > 1 and layout.pp > 1:  # the whole stage stays gathered, gradients unsharded until the end
        gathered = sum(per_layer) * (COMPUTE_BYTES + 4)
    elif dense_shard > 1 and layout.microbatches > 1:  # accumulation: float32 gradients unsharded until the last
        gathered = 2 * max(per_layer) * COMPUTE_BYTES + sum(per_layer) * 4
    else:
        gathered = 2 * max(per_layer) * COMPUTE_BYTES
    return {"state": 16 * params, "gathered": gathered,
            "activations": _activation_bytes(shape, layout, pp_rank, stages, first, last, seq_len, global_batch),
            "pipeline_buffers": _receive_buffers(shape, layout, len(stages), first, last, seq_len, global_batch)}


def _receive_buffers(shape: ModelShape, layout: Layout, n_held: int, first: bool, last: bool, seq_len: int,
                     global_batch: int) -> float:
    """torch's ``PipelineStage`` allocates a receive buffer per microbatch up front: an activation
    [rows, seq/cp/tp, dim] for every held stage but the first, its gradient for every one but the last."""
    if layout.pp == 1:
        return 0.0
    tokens = layout.microbatch_rows(global_batch) * seq_len / layout.cp / layout.tp  # a sequence-parallel slice
    activation = tokens * shape.config.dim * COMPUTE_BYTES
    return layout.microbatches * activation * ((n_held - first) + (n_held - last))


def _layer_activation_per_token(shape: ModelShape, layer_id: int, layout: Layout, mode: str) -> float:
    """Bytes one layer saves per token of this rank's sequence slice (``ActivationBytes``)."""
    cfg, a, t = shape.config, ACTIVATIONS[mode], layout.tp
    dense_width = 3.5 * cfg.dim  # the FFN width ActivationBytes.ffn was measured at
    if shape.layers[layer_id]["expert"]:  # routed experts see top_k copies of each token, plus the shared expert
        width = cfg.top_k * cfg.moe_ffn_dim + cfg.n_shared_experts * cfg.moe_ffn_dim + 1.5 * cfg.top_k * cfg.dim
    else:
        width = cfg.ffn_dim
    ffn = a.ffn * width / dense_width
    return cfg.dim * (a.shared + (a.split - a.ffn + ffn) / t)


def _in_flight(layout: Layout, pp_rank: int) -> int:
    """Stage-microbatches whose activations pipeline rank ``pp_rank`` holds at its peak (the
    schedule's warm-up: 1F1B's stage r runs pp - r forwards before its first backward;
    interleaved 1F1B runs (pp - r - 1) * 2 + (v - 1) * pp + 1 chunk-forwards)."""
    if layout.pp == 1:
        return 1
    if layout.schedule == "1f1b":
        return min(layout.microbatches, layout.pp - pp_rank)
    v = SCHEDULES[layout.schedule].stages_per_rank
    return min(layout.microbatches * v, (layout.pp - pp_rank - 1) * 2 + (v - 1) * layout.pp + 1)


def _activation_bytes(shape: ModelShape, layout: Layout, pp_rank: int, stages: list[list[int]], first: bool,
                      last: bool, seq_len: int, global_batch: int) -> float:
    cfg, t = shape.config, layout.tp
    tokens = layout.microbatch_rows(global_batch) * seq_len / layout.cp  # one microbatch (or pass) on this rank
    per_stage = [sum(_layer_activation_per_token(shape, i, layout, layout.activation_checkpoint) for i in stage)
                 for stage in stages]
    saved = _in_flight(layout, pp_rank) * tokens * sum(per_stage) / len(per_stage)
    recompute = 0.0
    if layout.activation_checkpoint != "none":  # backward rebuilds one layer's activations at a time
        layer = stages[0][0]
        recompute = tokens * (_layer_activation_per_token(shape, layer, layout, "none")
                              - _layer_activation_per_token(shape, layer, layout, layout.activation_checkpoint))
    outside = tokens * cfg.dim * (OUTSIDE_LAYERS.shared + OUTSIDE_LAYERS.split / t)
    logits = tokens * cfg.vocab_size * (LOGIT_BYTES[0] + LOGIT_BYTES[1] / t) if last else 0.0
    return saved + recompute + outside + logits


def _link(group_size: int, stride: int, hw: Hardware) -> float:
    """Bytes/s a collective over ``group_size`` ranks ``stride`` apart gets: NVLink if they share a node."""
    inside = group_size * stride <= hw.gpus_per_node
    return LINK_EFFICIENCY * (hw.nvlink_bytes_per_s if inside else hw.network_bytes_per_s)


def _ring(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather / reduce-scatter / all-to-all of ``nbytes`` over ``n`` ranks."""
    return nbytes * (n - 1) / n


def step_parts(shape: ModelShape, layout: Layout, gpus: int, seq_len: int, global_batch: int, hw: Hardware,
               efficiency: float) -> dict[str, float]:
    """Seconds per step: compute, bubble, and each mesh dim's exposed communication (module docstring)."""
    cfg, lay = shape.config, layout
    recompute = 4 / 3 if lay.activation_checkpoint == "full" else 1.0
    compute = shape.flops_per_token * global_batch * seq_len / gpus * recompute / (hw.bf16_flops * efficiency)
    tokens = global_batch // (lay.dp * lay.ep) * seq_len / lay.cp  # this rank's tokens per step, over all layers
    layers = len(shape.layers) / lay.pp
    moe_share = sum(1 for layer in shape.layers if layer["expert"]) / len(shape.layers)
    forwards = 2 if lay.activation_checkpoint == "full" else 1  # recomputation repeats the forward's collectives
    parts = {"compute": compute, "bubble": 0.0, "tp": 0.0, "cp": 0.0, "ep": 0.0, "pp": 0.0, "dp": 0.0}
    if lay.tp > 1:  # an all-gather and a reduce-scatter around attention and around a dense FFN, each way
        per_layer = (2 + 2 * (1 - moe_share)) * (forwards + 1)
        parts["tp"] = per_layer * layers * _ring(tokens * cfg.dim * COMPUTE_BYTES, lay.tp) / _link(lay.tp, 1, hw)
    if lay.cp > 1:  # K and V go round the ring; backward sends them and their gradients
        kv = tokens * 2 * cfg.n_kv_heads * cfg.head_dim / lay.tp * COMPUTE_BYTES
        parts["cp"] = (forwards + 2) * layers * (lay.cp - 1) * kv / _link(lay.cp, lay.tp, hw)
    if lay.ep > 1:  # dispatch and combine each way, top_k copies of this tp rank's tokens
        rows = tokens / lay.tp * cfg.top_k * cfg.dim * COMPUTE_BYTES
        parts["ep"] = 2 * (forwards + 1) * layers * moe_share * _ring(rows, lay.ep) / _link(lay.ep, lay.cp * lay.tp, hw)
    if lay.pp > 1:
        v = SCHEDULES[lay.schedule].stages_per_rank
        hops = 2 * v * tokens / lay.tp * cfg.dim * COMPUTE_BYTES  # activation forward, its gradient back
        parts["pp"] = hops / _link(lay.pp, gpus // lay.pp, hw)
        parts["bubble"] = compute * (lay.pp - 1) / (v * lay.microbatches)
    parts["dp"] = max(0.0, _data_parallel_seconds(shape, lay, hw) - compute)  # overlapped with compute
    return parts


def _data_parallel_seconds(shape: ModelShape, lay: Layout, hw: Hardware) -> float:
    """FSDP's all-gathers (bf16) and reduce-scatters (float32) per step, or DDP-style all-reduces."""
    params = sum(_model_parallel_params(layer, lay) for layer in shape.layers) / lay.pp \
        + (shape.embedding + _output_params(shape, lay.pp == 1)) / lay.tp / lay.pp
    dense_group = lay.dp * lay.ep * lay.cp
    if dense_group == 1:
        return 0.0
    link = _link(dense_group, lay.tp, hw)
    if lay.dp_mode == "replicate":
        return 2 * _ring(4 * params, dense_group) / link
    gathers = 1 if lay.pp > 1 else 2 * lay.microbatches  # a pipeline stage keeps its parameters gathered
    shard = _shard_sizes(lay, hw.gpus_per_node)[0]
    seconds = (gathers * _ring(COMPUTE_BYTES * params, shard) + _ring(4 * params, shard)) / _link(shard, lay.tp, hw)
    replicas = dense_group // shard
    if replicas > 1:  # HSDP: all-reduce each shard's gradients across the replicas
        seconds += 2 * _ring(4 * params / shard, replicas) / _link(replicas, shard * lay.tp, hw)
    return seconds


def plan(config, gpus: int, seq_len: int, global_batch: int, hw: Hardware, efficiency: float) -> list[Estimate]:
    """Every accepted layout, estimated; those that fit first, fastest first."""
    shape = model_shape(config, seq_len)
    estimates = [estimate(shape, layout, gpus, seq_len, global_batch, hw, efficiency)
                 for layout in layouts(shape, gpus, seq_len, global_batch, hw.gpus_per_node)]
    # On a tie, fewer microbatches first: each costs latency the model leaves out
    return sorted(estimates, key=lambda e: (not e.fits, -round(e.tokens_per_second_per_gpu, 6),
                                            e.layout.microbatches, e.memory_bytes))


def as_json(estimate_: Estimate) -> dict:
    """An estimate as plain JSON-ready values, with the layout's train flags."""
    return {**dataclasses.asdict(estimate_), "flags": estimate_.layout.flags(),
            "step_seconds": round(estimate_.step_seconds, 4), "mfu": round(estimate_.mfu, 4)}
