"""Meshtron parameter names <-> the tensor names Hugging Face checkpoints store them under.

Every supported family names attention, norms, embedding and output as Llama does, so those
map one to one (``layers.3.attention.wq.weight`` <->
``model.layers.3.self_attn.q_proj.weight``; biases and q/k norms too) and tensors are copied
unchanged: our ``rotary`` uses HF's "rotate half" convention, so q/k need no permutation.
A dense feed-forward is ``mlp.{gate,up,down}_proj`` (the MoE families add their router and
experts: ``models.moe.hf_names``). A tied output has no name of its own (it is
``tok_embeddings.weight``).
"""

from __future__ import annotations

import re

from torch import Tensor

from .config import LlamaConfig
from .hf_config import model_type_of

# Meshtron name -> HF name, for everything outside the layers ...
TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ... and, inside ``layers.{i}.`` / ``model.layers.{i}.``: attention and norms (every family) ...
ATTENTION_AND_NORMS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",        # Qwen2
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# ... and a dense feed-forward (every dense layer, also Qwen3-MoE's ``mlp_only_layers``).
DENSE_FFN = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: w2(silu(w1 x) * w3 x)
    "feed_forward.w3.weight": "mlp.up_proj.weight",    #   == down(silu(gate x) * up x)
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")




def layer_name(name: str) -> tuple[str, str] | None:
    """``layers.3.attention.wq.weight`` -> ("model.layers.3", "attention.wq.weight"); None outside the layers."""
    match = OUR_LAYER.match(name)
    return (f"model.layers.{match.group(1)}", match.group(2)) if match else None


def hf_names(name: str, config: LlamaConfig) -> list[str]:
    """The one HF name parameter ``name`` is stored under in a dense family's checkpoints
    (``layers.0.feed_forward.w1.weight`` -> ``model.layers.0.mlp.gate_proj.weight``). ValueError if it has none."""
    return shared_names(name, model_type_of(config))


def shared_names(name: str, model_type: str) -> list[str]:
    """``hf_names`` of the parameters every family stores alike (all but routers and experts);
    ValueError naming ``model_type`` for any other."""
    if name in TOP_LEVEL:
        return [TOP_LEVEL[name]]
    in_layer = layer_name(name)
    if in_layer:
        prefix, rest = in_layer
        if rest in ATTENTION_AND_NORMS:
            return [f"{prefix}.{ATTENTION_AND_NORMS[rest]}"]
        if rest in DENSE_FFN:
            return [f"{prefix}.{DENSE_FFN[rest]}"]
    raise ValueError(f"parameter {name!r} has no Hugging Face {model_type} name")


def split_for_hf(name: str, tensor: Tensor) -> list[Tensor]:
    """Our full tensor -> the tensors stored under ``hf_names``: itself."""
    return [tensor]


def join_from_hf(name: str, tensors: list[Tensor]) -> Tensor:
    """Inverse of ``split_for_hf``."""
    return tensors[0]
