"""The files besides the weights that make an exported folder usable alone: tokenizer, generation
defaults, and the special token ids in config.json.

``AutoTokenizer.from_pretrained(folder)`` needs the run's ``tokenizer.json`` and a
``tokenizer_config.json`` naming its class and special tokens; ``generate`` and
``pipeline("text-generation")`` read ``generation_config.json`` (bos/eos/pad ids). A run that
started from a Hugging Face folder (``--init-from``) with that folder's tokenizer hands on the
folder's own files (chat template included); otherwise they are written from the run's
tokenizer. A byte-level run (``--tokenizer byte``) has no tokenizer transformers can load:
nothing is written for it, and the export says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .tokenizer import HFTokenizer, load_tokenizer

# Tokenizer files a Hugging Face model folder may hold next to tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
GENERATION_FILE = "generation_config.json"


def write_tokenizer_files(out: Path, tokenizer_spec: str, init_from: str, max_seq_len: int) -> dict:
    """Write the run's tokenizer files and ``generation_config.json`` into ``out``; return the
    special token ids ({"bos_token_id", "eos_token_id"}) for config.json ({} for a byte tokenizer)."""
    tokenizer = load_tokenizer(tokenizer_spec)
    if not isinstance(tokenizer, HFTokenizer):
        return {}
    source = tokenizer.path.parent
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (out / name).resolve():
            shutil.copyfile(source / name, out / name)
    if not (source / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer, max_seq_len), indent=2))
    ids = {"bos_token_id": _bos_id(tokenizer), "eos_token_id": tokenizer.eos_id}
    generation = {}
    from_source = Path(init_from) / GENERATION_FILE if init_from else None
    if from_source is not None and from_source.is_file() and Path(init_from).resolve() == source.resolve():
        generation = json.loads(from_source.read_text())  # the model's own defaults (sampling, stop ids)
    for key, value in {**ids, "pad_token_id": tokenizer.eos_id}.items():
        if generation.get(key) is None:
            generation[key] = value
    (out / GENERATION_FILE).write_text(json.dumps(generation, indent=2))
    return ids


def _tokenizer_config(tokenizer: HFTokenizer, max_seq_len: int) -> dict:
    """A tokenizer_config.json for a bare tokenizer.json: the generic fast tokenizer, its EOS (also the
    padding token: generation pads finished rows with it) and BOS when it has one."""
    eos = tokenizer.token_text(tokenizer.eos_id)
    bos_id = _bos_id(tokenizer)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
            "bos_token": tokenizer.token_text(bos_id) if bos_id is not None else None,
            "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}


BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def _bos_id(tokenizer: HFTokenizer) -> int | None:
    """The tokenizer's beginning-of-text token: what its tokenizer_config.json names (null: none),
    else the first known name it holds."""
    config = tokenizer.path.with_name("tokenizer_config.json")
    values = json.loads(config.read_text()) if config.is_file() else {}
    if "bos_token" in values:
        named = values["bos_token"]
        named = named.get("content") if isinstance(named, dict) else named
        return tokenizer.token_id(named) if named else None
    return next((tokenizer.token_id(t) for t in BOS_CANDIDATES if tokenizer.token_id(t) is not None), None)
