"""The Llama family: Llama 3.x, Mistral, Qwen2 and Qwen3 (one decoder, features by config field).

    config.py     LlamaConfig: sizes, features, parameter shapes and roles
    model.py      the single-device modules (RMSNorm, Attention, FeedForward, TransformerBlock, Transformer)
    rope.py       rotary positions and their scalings (linear, llama3, yarn)
    plan.py       tensor/sequence-parallel plans for training and for decoding
    stages.py     how a model is cut into pipeline stages
    hf_config.py  config.json <-> LlamaConfig (llama, mistral, qwen2, qwen3)
    hf_names.py   parameter names <-> Hugging Face tensor names
    sizes.py      the registered sizes (debug, llama3-*, qwen3-*, ...)
"""

from ..family import HFFormat, ModelFamily
from . import hf_config, hf_names
from .config import LlamaConfig
from .model import Transformer, attention_layers
from .plan import check_tensor_parallel, decoding_plan, head_norm_parameters, tensor_parallel_plan
from .stages import split_stage


def check_mesh(config: LlamaConfig, tp: int, ep: int) -> None:
    """A dense model splits over tp only (ep ranks would hold no experts: the mesh planner keeps ep = 1)."""
    config.validate()
    check_tensor_parallel(config, tp)


def no_moe_layers(module) -> list:
    """A dense model routes no tokens: expert parallel has nothing to spread."""
    return []


HF = HFFormat.of(hf_config, hf_names)

FAMILY = ModelFamily(
    name="llama", kind="a dense", config_class=LlamaConfig, build=Transformer, check_mesh=check_mesh,
    tensor_parallel_plan=tensor_parallel_plan, decoding_plan=decoding_plan, split_stage=split_stage,
    attention_layers=attention_layers, moe_layers=no_moe_layers, tp_partial_parameters=head_norm_parameters,
    hf=HF)

__all__ = ["FAMILY", "LlamaConfig", "Transformer", "attention_layers"]
