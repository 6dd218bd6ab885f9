"""Export a Meshtron checkpoint as a Hugging Face folder that ``transformers`` uses alone.

The model becomes its family's own class (``models.hf_families``: Llama, Mistral, Qwen2,
Qwen3, Mixtral, Qwen3-MoE; a model started from a Hugging Face folder keeps that folder's
family); a model no transformers class computes (e.g. DeepSeek-style routing) is refused
before anything is read. The run's tokenizer files, ``generation_config.json`` and the
bos/eos ids go with it (``train.hf_export``), so ``AutoTokenizer``, ``AutoModelForCausalLM``
and ``pipeline("text-generation")`` load the folder alone.

    python tools/hf_convert.py export outputs/NAME/checkpoints out/hf            # newest complete checkpoint
    python tools/hf_convert.py export outputs/NAME/checkpoints/step_00000100 out/hf --dtype bfloat16
    python tools/hf_convert.py export CKPT OUT --model debug --max-shard-size 2GB
    python tools/hf_convert.py export CKPT OUT --push-to you/my-model          # and upload it to the hub
    python tools/hf_convert.py push OUT you/my-model [--private]                 # upload an exported folder
    python tools/hf_convert.py pull Qwen/Qwen3-0.6B qwen3/                       # a hub model as a plain folder

The model config comes from the checkpoint's meta.json (``model_config``, else ``model_name``),
or from ``--model`` for checkpoints that do not record it. Only the model's tensors are read
(never the optimizer state), into the export dtype, on one process: the whole model must
fit in this machine's memory once. The other direction needs no tool: train with
``--init-from FOLDER_OR_HUB_ID`` (``models.hf_format.load_hf_weights_``). ``push`` and ``pull``
use ``huggingface_hub`` (its login, its cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: this checkout's packages come first.
sys.path[:0] = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

import torch  # noqa: E402

from core.checkpoint import Checkpointer, CheckpointError, find_latest_checkpoint  # noqa: E402
from core.checkpoint_layout import META, is_complete  # noqa: E402
from models.family import ModelConfig  # noqa: E402
from models.hf_format import (  # noqa: E402
    DEFAULT_MAX_SHARD_BYTES,
    check_hf_compatible,
    expected_shapes,
    hf_model_type,
    save_hf_folder,
)
from models.hf_hub import looks_like_hub_id, pull_model, push_model  # noqa: E402
from models.registry import config_from_dict, get_config  # noqa: E402
from train.hf_export import write_tokenizer_files  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"200MB"`` / ``"123456"`` -> bytes."""
    for unit, scale in UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a complete ``step_N`` checkpoint, else the newest one under it."""
    if is_complete(path):
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise SystemExit(f"error: {path} is neither a complete checkpoint nor a root holding one")
    return latest


def read_meta(checkpoint: Path) -> dict:
    """meta.json as a dict; {} when it is missing or unreadable (the caller then needs --model)."""
    try:
        meta = json.loads((checkpoint / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def model_config(meta: dict, model_name: str | None) -> ModelConfig:
    """The checkpoint's config: meta's ``model_config``, else its ``model_name``, else ``--model``.

    With both meta and ``--model``, they must agree, so a wrong flag cannot mislabel a model.
    """
    if isinstance(meta.get("model_config"), dict):
        config = config_from_dict(meta["model_config"])
    elif meta.get("model_name"):
        config = get_config(meta["model_name"])
    elif model_name:
        return get_config(model_name)
    else:
        raise SystemExit("error: the checkpoint's meta.json records no model; pass --model NAME")
    if model_name and get_config(model_name) != config:
        raise SystemExit(f"error: --model {model_name} differs from the checkpoint's config {config}")
    return config


def export(checkpoint: Path, out: Path, model_name: str | None, dtype: torch.dtype, max_shard_bytes: int) -> None:
    checkpoint = resolve_checkpoint(checkpoint)
    config = model_config(read_meta(checkpoint), model_name)
    check_hf_compatible(config)  # fail before reading gigabytes
    # Load into tensors of the export dtype: the load casts while copying.
    state = {name: torch.empty(shape, dtype=dtype) for name, shape in expected_shapes(config).items()}
    Checkpointer().load(checkpoint, state)
    out.mkdir(parents=True, exist_ok=True)
    run = read_meta(checkpoint).get("train_config") or {}
    token_ids = write_tokenizer_files(out, run.get("tokenizer") or "default", run.get("init_from") or "",
                                      config.max_seq_len)
    files = save_hf_folder(state, config, out, max_shard_bytes=max_shard_bytes, extra_config=token_ids)
    tokenizer_note = "with its tokenizer" if token_ids else "no tokenizer: the run used --tokenizer byte"
    print(f"exported {checkpoint} -> {out} ({hf_model_type(config)}, {len(files)} weight/config files, "
          f"{str(dtype).removeprefix('torch.')}, "
          f"{tokenizer_note})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="Meshtron checkpoint -> Hugging Face folder")
    ex.add_argument("checkpoint", type=Path, help="a step_N checkpoint, or a root: its newest complete one")
    ex.add_argument("out", type=Path, help="output folder (its old model*.safetensors are replaced)")
    ex.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ex.add_argument("--model", help="model name, for checkpoints whose meta.json records none")
    ex.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), type=parse_size,
                    help="split the weights into files of at most this size (e.g. 2GB)")
    ex.add_argument("--push-to", metavar="REPO_ID", help="then upload the folder to this hub repository")
    ex.add_argument("--private", action="store_true", help="with --push-to: create the repository private")
    push = commands.add_parser("push", help="upload an exported folder to the Hugging Face hub")
    push.add_argument("folder", type=Path)
    push.add_argument("repo_id", help="owner/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    pull = commands.add_parser("pull", help="copy a hub model into a plain folder (through the hub cache)")
    pull.add_argument("repo_id", help="owner/name")
    pull.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "export" and args.push_to and not looks_like_hub_id(args.push_to):
            raise ValueError(f"--push-to {args.push_to}: not a hub id (owner/name)")  # before reading gigabytes
        if args.command == "export":
            export(args.checkpoint, args.out, args.model, DTYPES[args.dtype], args.max_shard_size)
            if args.push_to:
                print(f"pushed {args.out} -> {push_model(args.out, args.push_to, args.private)}")
        elif args.command == "push":
            print(f"pushed {args.folder} -> {push_model(args.folder, args.repo_id, args.private)}")
        else:
            print(f"pulled {args.repo_id} -> {pull_model(args.repo_id, args.out)}")
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
