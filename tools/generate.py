"""Generate text from a checkpoint or a Hugging Face folder with a K/V cache, on one process or
split over tensor-parallel ranks.

    python tools/generate.py outputs/latest/checkpoints --prompt "ROMEO:" --max-new-tokens 60
    python tools/generate.py hf_model/ --prompt "To be" --prompt "Once" --temperature 0.8 --top-p 0.95
    torchrun --nproc_per_node=2 tools/generate.py hf_model/ --prompt "To be" --mesh tp=2

Each ``--prompt`` is one row of the batch (``models.generation``: left-padded, a cache per
layer, one forward per new token). ``--temperature 0`` (the default) is greedy decoding,
token for token what transformers' ``generate(do_sample=False)`` gives on the same weights.
A checkpoint brings its run's model and tokenizer (meta.json); a Hugging Face folder its
config.json and, if present, its tokenizer.json; ``--tokenizer`` overrides either. Under
torchrun, ``--mesh tp=N`` (N = the number of ranks) splits the model's heads and feed-forward
over the ranks (``models.generation.shard_for_decoding``); rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: this checkout's packages come first.
sys.path[:0] = [str(ROOT / "packages" / name) for name in ("core", "models", "train")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_convert import model_config, read_meta, resolve_checkpoint  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402

from core.checkpoint import Checkpointer, CheckpointError  # noqa: E402
from core.checkpoint_state import model_tensors  # noqa: E402
from core.mesh import MeshConfigError, MeshShape  # noqa: E402
from models.generation import Sampling, generate, shard_for_decoding  # noqa: E402
from models.hf_format import CONFIG_FILE, load_hf_weights_, read_hf_config  # noqa: E402
from models.registry import build_model  # noqa: E402
from train.distributed import init_distributed, resolve_device, shutdown_and_exit, world_size_from_env  # noqa: E402
from train.tokenizer import Tokenizer, load_tokenizer  # noqa: E402


def load_model(path: Path, device: torch.device, tp_mesh: DeviceMesh | None = None) -> tuple[torch.nn.Module, str]:
    """The model at ``path`` on ``device`` (float32; split over ``tp_mesh`` when given) and the
    tokenizer its run used ("" for an HF folder: the caller looks for the folder's own)."""
    hf_folder = (path / CONFIG_FILE).is_file()
    if hf_folder:
        config, tokenizer = read_hf_config(path), ""
    else:
        checkpoint = resolve_checkpoint(path)
        meta = read_meta(checkpoint)
        config = model_config(meta, None)
        tokenizer = meta.get("train_config", {}).get("tokenizer", "default")
    with torch.device("meta"):
        model = build_model(config)
    if tp_mesh is not None:
        shard_for_decoding(model, tp_mesh)
    model.to_empty(device=device)
    if hf_folder:
        load_hf_weights_(model, path)  # each rank keeps its own shards
    else:
        Checkpointer().load(checkpoint, model_tensors(model))  # weights and buffers (an MoE's expert bias)
    return model.eval(), tokenizer


def tensor_parallel_mesh(spec: str, device: torch.device) -> DeviceMesh | None:
    """The tp mesh of ``--mesh tp=N`` over torchrun's N ranks (None on one process). Collective:
    joins the process group. ValueError for any other mesh, before any collective."""
    world = world_size_from_env()
    try:
        shape = MeshShape.parse(spec or f"tp={world}").resolve(world)
    except MeshConfigError as err:
        raise ValueError(f"--mesh {spec}: {err}") from None
    if shape.tp != world:
        raise ValueError(f"--mesh {spec}: generation splits the model over tp only; use --mesh tp={world} "
                         f"for {world} ranks")
    if world == 1:
        return None
    init_distributed(device, timeout_s=600)
    return init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))


def pick_tokenizer(path: Path, run_tokenizer: str, flag: str | None) -> Tokenizer:
    """``--tokenizer``, else the run's, else the HF folder's tokenizer.json."""
    if flag:
        return load_tokenizer(flag)
    if run_tokenizer:
        return load_tokenizer(run_tokenizer)
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(str(path / "tokenizer.json"))
    raise ValueError(f"{path} holds no tokenizer.json: pass --tokenizer (a tokenizer.json, its folder, or byte)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a step_N checkpoint, a checkpoint root (its newest), or an HF folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding this mass")
    parser.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    parser.add_argument("--tokenizer", help="a tokenizer.json (or its folder), default or byte")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--mesh", default="", help="under torchrun: tp=N, the model split over the N ranks")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DCP says it loads on one process because no process group exists: that is the intent here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        device = resolve_device(args.device)
        tp_mesh = tensor_parallel_mesh(args.mesh, device)
        model, run_tokenizer = load_model(args.path, device, tp_mesh)
        tokenizer = pick_tokenizer(args.path, run_tokenizer, args.tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                             f"{model.config.vocab_size}: pass the run's own --tokenizer")
        prompts = [tokenizer.encode(text) for text in args.prompt]
        if not all(prompts):
            raise ValueError("a --prompt encodes to no tokens: give it some text")
        sampling = Sampling(args.temperature, args.top_k, args.top_p, torch.Generator(device).manual_seed(args.seed))
        outputs = generate(model, prompts, args.max_new_tokens, tokenizer.eos_id, sampling)
    except (ValueError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_initialized() or dist.get_rank() == 0:
        for text, tokens in zip(args.prompt, outputs):
            print(text + tokenizer.decode(tokens), flush=True)
    return 0


if __name__ == "__main__":
    shutdown_and_exit(main())
