"""Hugging Face Llama folders <-> Meshtron Llama weights and configs.

A Hugging Face (HF) folder, as ``transformers.LlamaForCausalLM.from_pretrained`` reads it::

    folder/
      config.json                              LlamaConfig fields (hidden_size, num_hidden_layers, ...)
      model.safetensors                        every weight, by HF name
    or, when the weights are split into shards:
      model-00001-of-00003.safetensors ...
      model.safetensors.index.json             {"metadata": {"total_size": N}, "weight_map": {name: file}}

Names map one to one (``layers.3.attention.wq.weight`` <-> ``model.layers.3.self_attn.q_proj.weight``)
and tensors are copied unchanged: our ``rotary`` uses HF's "rotate half" convention, so q/k
need no permutation (tests/test_hf_format.py checks logits against ``transformers``).

Only safetensors and JSON are read or written: no file is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from core.checkpoint_state import clean_fqn

from .llama import LlamaConfig
from .registry import build_model

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# ---- names ------------------------------------------------------------------------------

# Meshtron name -> HF name, for everything outside the layers ...
_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ... and, inside ``layers.{i}.`` / ``model.layers.{i}.``, the rest of the name.
_IN_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: w2(silu(w1 x) * w3 x)
    "feed_forward.w3.weight": "mlp.up_proj.weight",    #   == down(silu(gate x) * up x)
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_LEVEL_BACK = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_IN_LAYER_BACK = {hf: ours for ours, hf in _IN_LAYER.items()}
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ValueError if unknown."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _OUR_LAYER.match(name)
    if match and match.group(2) in _IN_LAYER:
        return f"model.layers.{match.group(1)}.{_IN_LAYER[match.group(2)]}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama name (is this an MoE or modified model?)")


def from_hf_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.attention.wq.weight``; ValueError if unknown."""
    if name in _TOP_LEVEL_BACK:
        return _TOP_LEVEL_BACK[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _IN_LAYER_BACK:
        return f"layers.{match.group(1)}.{_IN_LAYER_BACK[match.group(2)]}"
    raise ValueError(f"Hugging Face weight {name!r} has no Meshtron Llama name (biases, MoE, "
                     f"or another architecture are not supported)")


# ---- config.json ------------------------------------------------------------------------

def to_hf_config(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict ``transformers`` needs to build the same model.

    The rope base is written both ways: ``rope_parameters`` (transformers 5) and
    ``rope_theta`` (4.x). Our output projection is untied from the embedding.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "dtype": dtype_name,
    }


def _rope_theta(hf: dict) -> float:
    """The rope base of an HF config; ValueError for scaled RoPE (e.g. Llama 3.1's "llama3"), which we lack."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json uses RoPE scaling {kind!r}; Meshtron implements only plain RoPE")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_hf_config(hf: dict) -> LlamaConfig:
    """The LlamaConfig of an HF config.json dict; ValueError naming what we cannot represent."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; only 'llama' is supported")
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for key, ours in unsupported.items():
        if hf.get(key, ours) != ours:
            raise ValueError(f"config.json has {key}={hf[key]!r}; Meshtron's Llama needs {key}={ours!r}")
    config = LlamaConfig(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=hf.get("max_position_embeddings", 2048))
    head_dim = hf.get("head_dim") or config.head_dim
    if head_dim != config.head_dim:
        raise ValueError(f"config.json has head_dim={head_dim}, but Meshtron derives hidden_size/num_attention_heads"
                         f"={config.head_dim}")
    config.validate()
    return config


def read_hf_config(folder: Path) -> LlamaConfig:
    """The LlamaConfig of ``folder/config.json``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    return from_hf_config(json.loads(path.read_text()))


# Fields that change the weights' shapes or the math; max_seq_len is only a limit, so it may differ.
_MATCHING_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps")


def check_hf_config_matches(folder: Path, config: LlamaConfig) -> None:
    """ValueError listing every field where ``folder``'s config.json differs from ``config``."""
    theirs = read_hf_config(folder)
    diffs = [f"{field}: folder has {getattr(theirs, field)}, the run has {getattr(config, field)}"
             for field in _MATCHING_FIELDS if getattr(theirs, field) != getattr(config, field)]
    if diffs:
        raise ValueError(f"the model config of {folder} does not match this run's model (pick the --model "
                         f"matching the folder, or override its fields):\n  " + "\n  ".join(diffs))


# ---- expected weights -------------------------------------------------------------------

def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Meshtron name -> full shape of every parameter of the dense model for ``config`` (built on meta)."""
    with torch.device("meta"):
        model = build_model(config)
    return {name: p.shape for name, p in model.named_parameters()}


def _check_names_and_shapes(shapes: dict[str, torch.Size], expected: dict[str, torch.Size], where: str) -> None:
    """ValueError for missing or unexpected keys, or a shape that is not the config's, naming them."""
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model config: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name]):
            raise ValueError(f"shape mismatch for {name!r} ({to_hf_name(name)!r}) in {where}: it has "
                             f"{tuple(shape)}, the model config needs {tuple(expected[name])}")


# ---- writing ----------------------------------------------------------------------------

def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group names, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _remove_old_weights(folder: Path) -> None:
    # An earlier export with another shard count would leave files transformers might mix in.
    for path in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        path.unlink(missing_ok=True)


def save_hf_folder(state: dict[str, torch.Tensor], config: LlamaConfig, folder: Path,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``state`` (Meshtron names -> FULL plain tensors) as an HF folder; return the files written.

    Writes ``folder/config.json`` and either ``model.safetensors`` or, when the weights exceed
    ``max_shard_bytes``, ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``.
    Old ``model*.safetensors`` / index files in ``folder`` are deleted first. Tensors are cast
    to ``dtype`` (default: as given). ValueError if names or shapes differ from ``config``'s model.
    """
    if any(isinstance(t, DTensor) for t in state.values()):
        raise ValueError("save_hf_folder needs full plain tensors: gather DTensors with .full_tensor() first")
    _check_names_and_shapes({k: t.shape for k, t in state.items()}, expected_shapes(config), "the state to save")
    tensors = {to_hf_name(k): t.detach().to("cpu", dtype or t.dtype).contiguous() for k, t in state.items()}
    out_dtype = dtype or next(iter(tensors.values())).dtype
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(folder)

    shards = _plan_shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    written = [folder / n for n in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: file for file, keys in zip(names, shards) for k in keys}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        written.append(folder / INDEX_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(to_hf_config(config, out_dtype), indent=2))
    return [*written, folder / CONFIG_FILE]


# ---- reading ----------------------------------------------------------------------------

def _is_ignored(hf_name: str) -> bool:
    # Older HF Llama checkpoints store the RoPE frequencies as a buffer; we recompute them.
    return hf_name.endswith("rotary_emb.inv_freq")


def weight_files(folder: Path) -> dict[str, Path]:
    """HF name -> the safetensors file holding it, from the index json or the single file's header."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise ValueError(f"{folder / INDEX_FILE} lists {path.name}, which is missing")
    elif (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            files = {name: folder / SINGLE_FILE for name in f.keys()}
    else:
        raise ValueError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    return {name: path for name, path in files.items() if not _is_ignored(name)}


def _sources(folder: Path) -> dict[str, tuple[Path, str]]:
    """Meshtron name -> (file, HF name stored in it), for every weight of ``folder``.

    A config with ``tie_word_embeddings`` may store no ``lm_head.weight``: our untied output
    projection then starts as a copy of the embedding.
    """
    sources = {from_hf_name(hf_name): (path, hf_name) for hf_name, path in weight_files(folder).items()}
    tied = json.loads((Path(folder) / CONFIG_FILE).read_text()).get("tie_word_embeddings", False)
    if tied and "output.weight" not in sources and "tok_embeddings.weight" in sources:
        sources["output.weight"] = sources["tok_embeddings.weight"]
    return sources


def _checked_sources(folder: Path, config: LlamaConfig) -> dict[str, tuple[Path, str]]:
    """``_sources(folder)`` after checking its names and shapes (safetensors headers only) against ``config``."""
    sources = _sources(folder)
    shapes = {}
    for name, (path, hf_name) in sources.items():
        with safe_open(str(path), framework="pt") as f:
            shapes[name] = torch.Size(f.get_slice(hf_name).get_shape())
    _check_names_and_shapes(shapes, expected_shapes(config), f"Hugging Face folder {folder}")
    return sources


def _read(sources: dict[str, tuple[Path, str]], names: list[str]):
    """Yield (name, full CPU tensor) for ``names``, one tensor in memory at a time, each file opened once."""
    for path in sorted({sources[name][0] for name in names}):
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if sources[name][0] == path:
                    yield name, f.get_tensor(sources[name][1])


def load_hf_folder(folder: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama folder: its config and every weight as a full CPU tensor, by Meshtron name.

    Tensors keep their stored dtype. ValueError for an unsupported config or missing,
    unexpected or misshapen weights.
    """
    config = read_hf_config(folder)
    sources = _checked_sources(folder, config)
    return config, dict(_read(sources, list(sources)))


@torch.no_grad()
def load_hf_weights_(model: nn.Module, folder: Path) -> None:
    """Copy an HF folder's weights into ``model`` in place, by name; no collective.

    ``model`` is a Meshtron Llama (``model.config``), plain or sharded (TP / FSDP DTensors)
    or a pipeline stage holding some layers. Every rank reads the full tensor of each of
    its parameters, one at a time, and keeps its own shard (``src_data_rank=None``: each
    rank cuts locally, as models.init does). The folder must hold exactly the weights of
    the full model for ``model.config``; ValueError (naming key and shapes) otherwise.
    """
    check_hf_config_matches(folder, model.config)
    sources = _checked_sources(folder, model.config)
    params = {clean_fqn(name): p for name, p in model.named_parameters()}
    for name, full in _read(sources, list(params)):
        _copy_full_(params[name], full)


def _copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full value into ``param``; a DTensor keeps only its local shard of it."""
    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def config_from_dict(values: dict) -> LlamaConfig:
    """A LlamaConfig from a dict (e.g. meta.json's ``model_config``); ValueError on unknown fields."""
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model config has fields a dense Llama does not: {unknown} (an MoE model?)")
    return LlamaConfig(**values)
