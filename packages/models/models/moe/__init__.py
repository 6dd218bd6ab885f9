"""The MoE family: the Llama decoder with routed experts (Mixtral, Qwen3-MoE, DeepSeek-MoE/V3-style routing).

    config.py     MoEConfig: the Llama fields plus the experts', parameter shapes and roles
    layer.py      the MoE layer (router, grouped experts, shared expert, load balancing)
    model.py      MoETransformer: Llama blocks with MoE feed-forwards after the dense ones
    plan.py       tensor parallel of an MoE layer: each tp rank routes its own tokens
    load.py       StepLoad: the step's expert load over the mesh and the expert bias
    hf_config.py  config.json <-> MoEConfig (mixtral, qwen3_moe)
    hf_names.py   router and expert names <-> Hugging Face tensor names
    sizes.py      the registered sizes (debug-moe, debug-mixtral, mixtral-8x7b, ...)

Attention, norms, RoPE, the dense blocks' plans and the pipeline cut are the Llama family's.
"""

from torch import nn

from .. import llama
from ..family import HFFormat, ModelFamily
from . import hf_config, hf_names
from .config import MoEConfig, check_expert_parallel
from .layer import MoE, moe_layers
from .load import StepLoad
from .model import MoETransformer


def check_mesh(config: MoEConfig, tp: int, ep: int) -> None:
    llama.check_mesh(config, tp, ep)
    check_expert_parallel(config, ep)


def tp_partial_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The MoE layers' parameters (router, experts, shared expert: each tp rank runs them on its own
    tokens, ``models.moe.plan``) and the q/k norms'."""
    return [p for layer in moe_layers(module) for p in layer.parameters()] + llama.head_norm_parameters(module)


def step_load(module: nn.Module, config: MoEConfig, sequence_group, token_group, sequences_per_step: int,
              device) -> StepLoad:
    """The step state of ``module``'s MoE layers (``models.moe.load``); the groups as ``StepLoad`` takes them."""
    return StepLoad(moe_layers(module), config.n_experts, sequence_group, token_group, sequences_per_step, device)


HF = HFFormat.of(hf_config, hf_names)

FAMILY = ModelFamily(
    name="moe", kind="an MoE", config_class=MoEConfig, build=MoETransformer, check_mesh=check_mesh,
    tensor_parallel_plan=llama.tensor_parallel_plan, decoding_plan=llama.decoding_plan,
    split_stage=llama.split_stage, attention_layers=llama.attention_layers, moe_layers=moe_layers,
    tp_partial_parameters=tp_partial_parameters, hf=HF, step_load=step_load)

__all__ = ["FAMILY", "MoE", "MoEConfig", "MoETransformer", "moe_layers"]
