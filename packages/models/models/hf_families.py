"""config.json <-> Meshtron configs for every Hugging Face family a registered model family reads.

    model_type   class                 family (its folder's hf_config.py says what it adds)
    llama        LlamaForCausalLM      llama: RoPE scaling (Llama 3.1+), tied output (3.2 1B/3B)
    mistral      MistralForCausalLM    llama: a sliding window that never binds
    qwen2        Qwen2ForCausalLM      llama: biases on q/k/v
    qwen3        Qwen3ForCausalLM      llama: q/k norms, head_dim != hidden/heads
    mixtral      MixtralForCausalLM    moe: softmax router, renormalized top-k
    qwen3_moe    Qwen3MoeForCausalLM   moe: Mixtral's routing with dense first layers and q/k norms

Here only the dispatch: a config.json goes to the family whose ``HFFormat.architectures`` has its
model_type, a config to its own family (``models.registry.family_of``).
"""

from __future__ import annotations

import torch

from .registry import FAMILIES, family_of, family_of_model_type

ARCHITECTURES = {model_type: cls for family in FAMILIES for model_type, cls in family.hf.architectures.items()}


def hf_model_type(config) -> str:
    """The HF model_type ``config`` exports as: its ``family`` field, else the one its features need."""
    return family_of(config).hf.model_type_of(config)


def from_hf_config(hf: dict):
    """The Meshtron config of an HF config.json dict (an MoEConfig for the MoE families);
    ValueError naming the field we cannot honour and what would fix it."""
    model_type = hf.get("model_type", "llama")
    family = family_of_model_type(model_type)
    if family is None:
        raise ValueError(f"config.json has model_type {model_type!r}; Meshtron supports {', '.join(ARCHITECTURES)}")
    return family.hf.from_config_json({**hf, "model_type": model_type})


def export_mismatches(config) -> list[str]:
    """Why transformers' class for ``hf_model_type(config)`` would not compute what ``config`` does
    ([] if it would)."""
    family, model_type = family_of(config), hf_model_type(config)
    if model_type in family.hf.architectures:
        return family.hf.export_mismatches(config)
    owner = family_of_model_type(model_type)
    if owner is None:
        return [f"family={model_type!r} is none of {', '.join(ARCHITECTURES)}"]
    return [f"{model_type} is {owner.kind} model, this model is {family.kind} one"]


def check_hf_compatible(config) -> None:
    """ValueError naming every reason no transformers class computes what ``config``'s model computes."""
    reasons = export_mismatches(config)
    if reasons:
        raise ValueError(f"no transformers class matches this model as {hf_model_type(config)!r}: "
                         + "; ".join(reasons))


def to_hf_config(config, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict with which transformers builds the same model as its family's own class."""
    check_hf_compatible(config)
    return family_of(config).hf.to_config_json(config, dtype)
