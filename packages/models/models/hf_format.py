"""Hugging Face folders <-> Meshtron weights and configs, for every family of ``models.hf_families``.

A Hugging Face (HF) folder, as ``transformers`` ``from_pretrained`` reads it::

    folder/
      config.json                              model_type (llama, mistral, qwen2, qwen3, mixtral,
                                               qwen3_moe) and its fields
      model.safetensors                        every weight, by HF name
    or, when the weights are split into shards:
      model-00001-of-00003.safetensors ...
      model.safetensors.index.json             {"metadata": {"total_size": N}, "weight_map": {name: file}}

config.json maps to the config of a model family (``models.hf_families``), names as that
family's ``HFFormat`` says (``models.llama.hf_names``, ``models.moe.hf_names``): one Meshtron
parameter is stored as one HF tensor, except an expert weight [E, ...], stored as E per-expert
tensors (transposed). A tied output
(``tie_word_embeddings``) is stored once, as the embedding.

Only safetensors and JSON are read or written: no file is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .family import ModelConfig
from .hf_families import check_hf_compatible, from_hf_config, hf_model_type, to_hf_config  # noqa: F401 - re-exported
from .init import copy_full_value_, init_buffers
from .registry import family_of

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# ---- names and config.json --------------------------------------------------------------


def hf_names(name: str, config: ModelConfig) -> list[str]:
    """The HF names under which parameter ``name`` of ``config``'s model is stored (E of them for experts)."""
    return family_of(config).hf.tensor_names(name, config)


def split_for_hf(name: str, tensor: Tensor, config: ModelConfig) -> list[Tensor]:
    """Our full tensor -> the tensors stored under ``hf_names`` (E transposed views for an expert weight)."""
    return family_of(config).hf.split_tensor(name, tensor)


def join_from_hf(name: str, tensors: list[Tensor], config: ModelConfig) -> Tensor:
    """Inverse of ``split_for_hf``."""
    return family_of(config).hf.join_tensors(name, tensors)


def read_hf_config(folder: Path) -> ModelConfig:
    """The config of ``folder/config.json`` (its family's config class)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not the object of a model config")
    try:
        return from_hf_config(values)
    except KeyError as err:
        family = values.get("model_type", "llama")
        raise ValueError(f"{path} lacks the field {err}, which a {family} config.json has") from None
    except TypeError as err:  # a field of the wrong JSON type reaching the dataclass
        raise ValueError(f"{path} has a field of the wrong type ({err})") from None


# Fields that only limit or steer training, not the math of the weights: they may differ.
_FREE_FIELDS = ("max_seq_len", "aux_loss_coef", "family")


def check_hf_config_matches(folder: Path, config: ModelConfig) -> None:
    """ValueError listing every field where ``folder``'s config.json differs from ``config``
    (a run that names both a --model and an --init-from folder).

    Reads only config.json, so it may run before any collective.
    """
    check_hf_compatible(config)
    theirs = read_hf_config(folder)
    if family_of(theirs) is not family_of(config):
        raise ValueError(f"{folder} holds {family_of(theirs).kind} model, this run's model is {family_of(config).kind} "
                         f"one: leave out --model (the folder defines the model)")
    fields = [f.name for f in dataclasses.fields(config) if f.name not in _FREE_FIELDS]
    diffs = [f"{field}: folder has {getattr(theirs, field)}, the run has {getattr(config, field)}"
             for field in fields if getattr(theirs, field) != getattr(config, field)]
    if diffs:
        raise ValueError(f"the model config of {folder} does not match this run's --model (leave out --model: "
                         f"the folder defines the model): " + "; ".join(diffs))


# ---- expected weights -------------------------------------------------------------------

def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Meshtron name -> full shape of every parameter of the model for ``config`` (from the config)."""
    return {name: torch.Size(shape) for name, shape in config.parameter_shapes().items()}


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[str, torch.Size]]:
    """HF name -> (the Meshtron name it belongs to, its shape on disk), for ``config``'s model."""
    out = {}
    for name, shape in expected_shapes(config).items():
        parts = split_for_hf(name, torch.empty(shape, device="meta"), config)
        out.update({hf: (name, part.shape) for hf, part in zip(hf_names(name, config), parts)})
    return out


def _first(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def _check_names_and_shapes(shapes: dict[str, torch.Size], expected: dict[str, torch.Size], where: str) -> None:
    """ValueError for missing or unexpected Meshtron names, or a shape that is not the config's."""
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model config: missing keys {_first(missing)}, "
                         f"unexpected keys {_first(unexpected)}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name]):
            raise ValueError(f"shape mismatch for {name!r} in {where}: it has {tuple(shape)}, "
                             f"the model config needs {tuple(expected[name])}")


def _check_hf_names_and_shapes(shapes: dict[str, torch.Size], config: ModelConfig, where: str) -> None:
    """Like ``_check_names_and_shapes`` for HF-named tensors; missing ones are reported by Meshtron name."""
    expected = expected_hf_shapes(config)
    missing = sorted({name for hf, (name, _) in expected.items() if hf not in shapes})
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model config: missing keys {_first(missing)}, "
                         f"unexpected keys {_first(unexpected)}")
    for hf, shape in shapes.items():
        name, needed = expected[hf]
        if tuple(shape) != tuple(needed):
            raise ValueError(f"shape mismatch for {name!r} ({hf!r}) in {where}: it has {tuple(shape)}, "
                             f"the model config needs {tuple(needed)}")


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


def _hf_tensors(state: dict[str, Tensor], config: ModelConfig, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """HF name -> contiguous CPU tensor of ``dtype`` (default: as given), for every Meshtron tensor of ``state``."""
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
        for hf, part in zip(hf_names(name, config), split_for_hf(name, tensor, config)):
            tensors[hf] = part.contiguous()  # experts are transposed views: safetensors needs their own copy
    return tensors


def save_hf_folder(state: dict[str, torch.Tensor], config: ModelConfig, folder: Path,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                   extra_config: dict | None = None) -> list[Path]:
    """Write ``state`` (Meshtron names -> FULL plain tensors) as an HF folder; return the files written.

    Writes ``folder/config.json`` and either ``model.safetensors`` or, when the weights exceed
    ``max_shard_bytes``, ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``.
    Old ``model*.safetensors`` / index files in ``folder`` are deleted first. Tensors are cast
    to ``dtype`` (default: as given). ``extra_config``: more config.json fields (e.g. the
    tokenizer's ``bos_token_id`` / ``eos_token_id``). A tied output is stored once, as the
    embedding. ValueError, before writing anything, if names or shapes differ from ``config``'s
    model or no transformers class computes what it computes.
    """
    check_hf_compatible(config)
    if config.tie_embeddings:
        state = {name: t for name, t in state.items() if name != "output.weight"}  # the embedding's twin
    if any(isinstance(t, DTensor) for t in state.values()):
        raise ValueError("save_hf_folder needs full plain tensors: gather DTensors with .full_tensor() first")
    _check_names_and_shapes({k: t.shape for k, t in state.items()}, expected_shapes(config), "the state to save")
    tensors = _hf_tensors(state, config, dtype)
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
    hf_config = {**to_hf_config(config, out_dtype), **(extra_config or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
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


# HF name -> (file, name stored in it): the two differ only for an output read from a tied
# folder's embedding.
Sources = dict[str, tuple[Path, str]]
OUTPUT, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def _checked_sources(folder: Path, config: ModelConfig) -> Sources:
    """Where each HF weight ``config``'s model needs is stored, after checking names and shapes
    (safetensors headers only). A tied model's output is its embedding: a ``lm_head.weight`` that
    some tied checkpoints also store (a copy) is not read, and a pipeline's last stage reads its
    replica of the output (``models.tied_output``) from the embedding. An untied model
    (``--model-args tie_embeddings=false``) from a tied folder starts its output as a copy of it."""
    sources = {hf: (path, hf) for hf, path in weight_files(folder).items()}
    if config.tie_embeddings:
        sources.pop(OUTPUT, None)
    elif OUTPUT not in sources and EMBEDDING in sources and json.loads(
            (Path(folder) / CONFIG_FILE).read_text()).get("tie_word_embeddings"):
        sources[OUTPUT] = sources[EMBEDDING]
    shapes = {}
    for path in sorted({path for path, _ in sources.values()}):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({hf: torch.Size(f.get_slice(stored).get_shape())
                           for hf, (p, stored) in sources.items() if p == path})
    _check_hf_names_and_shapes(shapes, config, f"Hugging Face folder {folder}")
    if config.tie_embeddings:
        sources[OUTPUT] = sources[EMBEDDING]  # a pipeline's last stage holds a replica of the embedding
    return sources


def _read(sources: Sources, names: list[str], config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Yield (Meshtron name, full CPU tensor) for ``names``, one parameter in memory at a time.

    Each file is opened once (safetensors maps it; a tensor is read when asked for).
    """
    with ExitStack() as stack:
        files = {}

        def get(hf: str) -> Tensor:
            path, stored = sources[hf]
            if path not in files:
                files[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return files[path].get_tensor(stored)

        for name in names:
            yield name, join_from_hf(name, [get(hf) for hf in hf_names(name, config)], config)


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF folder: its config and every weight as a full CPU tensor, by Meshtron name.

    Tensors keep their stored dtype (experts: [E, ...], as our model holds them). ValueError
    for an unsupported config or missing, unexpected or misshapen weights.
    """
    config = read_hf_config(folder)
    sources = _checked_sources(folder, config)
    return config, dict(_read(sources, list(expected_shapes(config)), config))


@torch.no_grad()
def load_hf_weights_(model: nn.Module, folder: Path) -> None:
    """Copy an HF folder's weights into ``model`` in place, by name; no collective.

    ``model`` is a Meshtron model (``model.config``) of a supported family, plain or sharded
    (TP / FSDP / EP DTensors) or a pipeline stage holding some layers. Every rank reads the
    full tensor of each of its parameters (an expert weight: all E experts), one at a time,
    and keeps its own shard (``src_data_rank=None``: each rank cuts locally, as models.init
    does). The routers' expert bias, which HF MoE families lack, is set to zero. The folder must
    hold exactly the weights of the full model for ``model.config``; ValueError (naming key
    and shapes) otherwise. (Fields that keep the shapes, e.g. RoPE scaling or ``max_seq_len``,
    may differ from the folder's config.json: the run chose them.)
    """
    sources = _checked_sources(folder, model.config)
    params = dict(model.named_parameters())
    for name, full in _read(sources, list(params), model.config):
        copy_full_value_(params[name], full)
    init_buffers(model)  # the routers' expert bias (HF families have none) starts at zero
