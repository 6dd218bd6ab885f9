"""Where a run's model and tokenizer come from: the registry (``--model``), or a Hugging Face
folder or hub id (``--init-from``), which then defines both.

    --model NAME                     the registry's config (+ --model-args), random init
    --init-from FOLDER_OR_HUB_ID     the folder's config.json (+ --model-args, e.g. max_seq_len),
                                     its weights, and its tokenizer.json unless --tokenizer is given
    both                             the registry's config must match the folder's (checked field by field)

``resolve_sources`` turns a hub id into its local snapshot folder once, before anything else
reads it; every later step (validation, loading, checkpoints' meta.json, export) sees the folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from models.family import ModelConfig
from models.hf_format import check_hf_config_matches, read_hf_config
from models.hf_hub import resolve_model_folder
from models.registry import TOKENIZER_SIZED, get_config, parse_model_args, vocab_for_tokenizer

from .config import TrainConfig
from .tokenizer import Tokenizer

DEFAULT_MODEL = "debug"
TOKENIZER_FILE = "tokenizer.json"
# Fields that give the weights their shapes: a folder's weights fix them. (tie_embeddings=false
# may untie a tied folder's output: it starts as a copy of the embedding.)
WEIGHT_SHAPING = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "attention_head_dim",
                  "qkv_bias", "qk_norm", "n_experts", "moe_ffn_dim", "n_shared_experts", "n_dense_layers")


def resolve_sources(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--init-from`` as a local folder and ``--tokenizer`` chosen: the flag, else the
    folder's tokenizer.json, else the bundled BPE. ValueError (one line) for a missing source."""
    if not cfg.init_from:
        return replace(cfg, tokenizer=cfg.tokenizer or "default")
    folder = resolve_model_folder(cfg.init_from)
    read_hf_config(folder)  # a folder that is no model folder says so before its tokenizer is looked for
    tokenizer = cfg.tokenizer
    if not tokenizer:
        if not (folder / TOKENIZER_FILE).is_file():
            raise ValueError(f"--init-from {cfg.init_from} has no {TOKENIZER_FILE} (the Hugging Face tokenizers "
                             f"format): pass --tokenizer PATH to its tokenizer.json, or --tokenizer default to "
                             f"train it on the bundled one")
        tokenizer = str(folder)
    return replace(cfg, init_from=str(folder), tokenizer=tokenizer)


def model_label(cfg: TrainConfig) -> str:
    """The run's model as run folders and banners name it: ``--model``, else the ``--init-from``
    folder's (or hub repository's) name, else the default model."""
    if cfg.model:
        return cfg.model
    if not cfg.init_from:
        return DEFAULT_MODEL
    folder = Path(cfg.init_from)
    if folder.parent.name == "snapshots":  # a hub cache snapshot: .../models--Owner--Name/snapshots/<commit>
        return folder.parent.parent.name.split("--")[-1]
    return folder.resolve().name or DEFAULT_MODEL


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The run's model config (see the module docstring). A registry model with no tokenizer of its
    own, trained on text, gets the tokenizer's vocabulary (``models.registry.TOKENIZER_SIZED``)
    unless ``--model-args`` sets it."""
    if cfg.init_from and not cfg.model:
        folder_config = read_hf_config(cfg.init_from)
        overrides = parse_model_args(folder_config, cfg.model_args)
        fixed = [key for key in overrides if key in WEIGHT_SHAPING]
        if overrides.get("tie_embeddings") and not folder_config.tie_embeddings:
            fixed.append("tie_embeddings")  # an untied folder has two matrices: which one would be kept?
        if fixed:
            raise ValueError(f"--model-args {','.join(fixed)} with --init-from: the folder's weights fix "
                             f"{', '.join(fixed)}; override only fields that keep their shapes (e.g. max_seq_len, "
                             f"rope_*, aux_loss_coef)")
        config = replace(folder_config, **overrides)
        config.validate()
        return config
    name = cfg.model or DEFAULT_MODEL
    overrides = parse_model_args(name, cfg.model_args)
    if name in TOKENIZER_SIZED and cfg.dataset != "synthetic" and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_for_tokenizer(tokenizer.vocab_size)
    config = get_config(name, **overrides)
    if cfg.init_from:
        check_hf_config_matches(cfg.init_from, config)
    return config
