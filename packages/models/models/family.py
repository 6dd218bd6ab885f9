"""The model contract: what one family tells the code that parallelizes, pipelines, counts and converts it.

Each family folder (``models/llama``, ``models/moe``) exports one ``ModelFamily``; ``models.registry``
lists them and finds a config's family by its config class. Nothing outside a family folder
looks at module classes: ``shard_module``, the pipeline builder, generation, the dry run, the
planner and the Hugging Face import/export call the family's functions instead. What a config
costs (parameter shapes and roles, FLOPs) is answered by the config itself (``models.stats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle


class ModelConfig(Protocol):
    """What family-agnostic code reads from any family's config (a frozen dataclass).

    The sizes below, ``validate()`` (ValueError naming a bad field), and what ``models.stats``
    counts with: ``parameter_shapes()`` (name -> full shape, in module order, a tied output once),
    ``block_shapes(layer)`` (one block's, names relative to it), ``parameter_role(name, shape)``
    ("tp" | "expert" | "replicated") and ``routed_share()`` (the fraction of the routed experts'
    weights a token multiplies; 1 without experts).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    tie_embeddings: bool

    def validate(self) -> None: ...
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]: ...
    def block_shapes(self, layer: int) -> dict[str, tuple[int, ...]]: ...
    def parameter_role(self, name: str, shape: tuple[int, ...]) -> str: ...
    def routed_share(self) -> float: ...


@dataclass(frozen=True)
class HFFormat:
    """How a family meets Hugging Face: its config.json both ways and the names of its tensors.

    ``architectures``: HF model_type -> transformers class, for every type this family reads and writes.
    ``model_type_of(config)``: the model_type a config exports as.
    ``from_config_json(hf)`` / ``to_config_json(config, dtype)``: config.json dict <-> config.
    ``export_mismatches(config)``: why the HF class would compute something else ([] if it would not).
    ``tensor_names(name, config)``: the HF tensors a parameter is stored as (E of them for experts);
    ``split_tensor`` / ``join_tensors``: our full tensor <-> those tensors.
    """

    architectures: dict[str, str]
    model_type_of: Callable[[ModelConfig], str]
    from_config_json: Callable[[dict], ModelConfig]
    to_config_json: Callable[[ModelConfig, torch.dtype], dict]
    export_mismatches: Callable[[ModelConfig], list[str]]
    tensor_names: Callable[[str, ModelConfig], list[str]]
    split_tensor: Callable[[str, Tensor], list[Tensor]]
    join_tensors: Callable[[str, list[Tensor]], Tensor]

    @classmethod
    def of(cls, hf_config: ModuleType, hf_names: ModuleType) -> HFFormat:
        """The format a family's ``hf_config`` and ``hf_names`` modules define, by the names every
        family uses: ARCHITECTURES, model_type_of, from_hf_config, to_hf_config, export_mismatches;
        hf_names, split_for_hf, join_from_hf."""
        return cls(architectures=hf_config.ARCHITECTURES, model_type_of=hf_config.model_type_of,
                   from_config_json=hf_config.from_hf_config, to_config_json=hf_config.to_hf_config,
                   export_mismatches=hf_config.export_mismatches, tensor_names=hf_names.hf_names,
                   split_tensor=hf_names.split_for_hf, join_tensors=hf_names.join_from_hf)


@dataclass(frozen=True)
class ModelFamily:
    """One family's answers (all functions; nothing here communicates).

    ``build(config)``: the plain single-device module (any device, e.g. meta; weights uninitialized).
    ``check_mesh(config, tp, ep)``: ValueError naming a size the mesh cannot split (before any collective).
    ``tensor_parallel_plan(module)``: the TP/SP styles by FQN of a model or pipeline stage for training;
    ``decoding_plan(module)``: the same for generation (no sequence parallel).
    ``split_stage(module, layer_ids, first, last)``: cut the module in place into one pipeline stage.
    ``attention_layers(module)``: the layers whose ``attention_fn`` / ``position_fn`` context parallel
    and generation replace. ``moe_layers(module)``: the layers expert parallel spreads ([] if none).
    ``tp_partial_parameters(module)``: plain parameters each tp rank applies to its own part of the work
    (their gradients are partial sums over tp).
    ``step_load``: builds the MoE layers' step state (``models.moe.load.StepLoad``); None: no experts.
    """

    name: str
    kind: str  # how messages name one of its models: "a dense" (model), "an MoE" (model)
    config_class: type
    build: Callable[[ModelConfig], nn.Module]
    check_mesh: Callable[[ModelConfig, int, int], None]
    tensor_parallel_plan: Callable[[nn.Module], dict[str, ParallelStyle]]
    decoding_plan: Callable[[nn.Module], dict[str, ParallelStyle]]
    split_stage: Callable[[nn.Module, list[int], bool, bool], nn.Module]
    attention_layers: Callable[[nn.Module], list[nn.Module]]
    moe_layers: Callable[[nn.Module], list[nn.Module]]
    tp_partial_parameters: Callable[[nn.Module], list[nn.Parameter]]
    hf: HFFormat
    step_load: Callable[..., object] | None = None

    @property
    def has_experts(self) -> bool:
        return self.step_load is not None
