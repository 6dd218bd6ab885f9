"""Model names -> configs. ``debug`` / ``debug-moe(-v3)`` / ``debug-mixtral`` run in seconds on a laptop CPU;
the others are real sizes."""

from __future__ import annotations

from dataclasses import fields, replace

from torch import nn

from . import llama, moe
from .family import ModelConfig, ModelFamily
from .llama import LlamaConfig
from .llama.sizes import HF_FAMILY_CONFIGS, LLAMA_CONFIGS
from .moe.sizes import MOE_CONFIGS

# Every model family; a config's is found by its class (``family_of``).
FAMILIES: tuple[ModelFamily, ...] = (llama.FAMILY, moe.FAMILY)

CONFIGS: dict[str, ModelConfig] = {**LLAMA_CONFIGS, **HF_FAMILY_CONFIGS, **MOE_CONFIGS}
# Models with no tokenizer of their own: trained on real text, their vocabulary is the tokenizer's
# (rounded up to VOCAB_MULTIPLE) unless --model-args sets vocab_size. The real sizes keep theirs.
TOKENIZER_SIZED = frozenset({"debug", "debug-moe", "debug-mixtral", "debug-moe-v3"})
# Padding the vocabulary to a multiple of 64 keeps the output matmul aligned and divisible by any tp <= 64.
VOCAB_MULTIPLE = 64


def vocab_for_tokenizer(tokens: int) -> int:
    """The vocabulary a tokenizer-sized model gets for a tokenizer of ``tokens`` tokens."""
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_names() -> list[str]:
    return sorted(CONFIGS)


def _registered(name: str) -> ModelConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    return CONFIGS[name]


def get_config(name: str, **overrides) -> ModelConfig:
    """The named config, with fields overridden (e.g. ``n_layers=8``) and checked."""
    config = replace(_registered(name), **overrides)
    config.validate()
    return config


def parse_model_args(base: str | ModelConfig, spec: str) -> dict:
    """``--model-args "n_layers=2,max_seq_len=8192"`` -> {"n_layers": 2, "max_seq_len": 8192}.

    Keys are the fields of ``base``'s config (a registry name, or a config, e.g. one read from
    a Hugging Face folder); each value is parsed as that field's type (int, float, bool as
    true/false, str). ValueError names a bad key or value.
    """
    config = _registered(base) if isinstance(base, str) else base
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(config)}
    overrides = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep or key not in types:
            raise ValueError(f"--model-args {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        overrides[key] = _parse_value(key, text, types[key])
    return overrides


def _parse_value(key: str, text: str, kind: str):
    try:
        if kind == "bool":
            return {"true": True, "false": False}[text.lower()]
        return {"int": int, "float": float, "str": str}[kind](text)
    except (KeyError, ValueError):
        raise ValueError(f"--model-args {key}={text!r}: expected a value of type {kind}") from None


def family_of(config) -> ModelFamily:
    """The family ``config`` belongs to, by its exact class (an MoEConfig is a LlamaConfig too)."""
    for family in FAMILIES:
        if type(config) is family.config_class:
            return family
    raise ValueError(f"{type(config).__name__} is no registered model family's config: add its family to "
                     f"models.registry.FAMILIES")


def family_of_model_type(model_type: str) -> ModelFamily | None:
    """The family that reads and writes Hugging Face ``model_type`` (None: no family does)."""
    return next((family for family in FAMILIES if model_type in family.hf.architectures), None)


def build_model(config) -> nn.Module:
    """The plain single-device model for ``config`` (weights uninitialized: see models.init)."""
    return family_of(config).build(config)


def config_from_dict(values: dict):
    """The config of meta.json's ``model_config``: a LlamaConfig when ``values`` has only dense fields
    (older runs may lack some: they take the defaults), else the config of the family that adds
    exactly the extra fields; ValueError naming unknown or partial fields."""
    dense = _field_names(LlamaConfig)
    extra = set(values) - dense
    if not extra:
        return LlamaConfig(**values)
    for family in FAMILIES:
        if extra == _field_names(family.config_class) - dense:
            return family.config_class(**values)
    needs = "; ".join(f"a {family.name} config needs exactly {sorted(_field_names(family.config_class) - dense)}"
                      for family in FAMILIES if family.config_class is not LlamaConfig)
    raise ValueError(f"model config has fields a dense Llama does not: {sorted(extra)}; {needs} besides the "
                     f"dense fields")


def _field_names(config_class: type) -> set[str]:
    return {f.name for f in fields(config_class)}
