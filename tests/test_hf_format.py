"""Hugging Face export/import: names, config, logits equal to ``transformers``, CLI export, sharding, errors.

``transformers`` models are built from config objects or our own folders only (no download).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from rank_harness import run_on_ranks, run_python
from safetensors.torch import load_file, save_file

from models.hf_format import (
    INDEX_FILE,
    SINGLE_FILE,
    check_hf_config_matches,
    from_hf_config,
    hf_names,
    load_hf_folder,
    load_hf_weights_,
    save_hf_folder,
    to_hf_config,
)
from models.init import init_weights
from models.registry import build_model, get_config

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = get_config("debug")


@torch.no_grad()
def unit_scale_model(config, seed: int = 0) -> torch.nn.Module:
    """A model of ``config`` with O(1) activations: with init_weights' std 0.02 attention is
    nearly uniform (and MoE routing nearly tied), so a RoPE, q/k or expert layout error would
    hide below the tolerance. Norm weights are perturbed so that swapping two norms shows too."""
    model = build_model(config)
    init_weights(model, config.n_layers, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
        elif name != "tok_embeddings.weight":
            fan_in = p.shape[-2] if name.endswith(("w1", "w2", "w3")) else p.shape[-1]  # experts: x @ w[e]
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return model


def debug_model(seed: int = 0) -> torch.nn.Module:
    """The debug Llama at unit scale."""
    return unit_scale_model(CONFIG, seed)


def full_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def hf_model(folder) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(7))


# ---- names and config -------------------------------------------------------------------

def test_names_and_config_round_trip():
    ours = [name for name, _ in build_model(CONFIG).named_parameters()]
    hf_config = transformers.LlamaConfig(**to_hf_config(CONFIG))
    with torch.device("meta"):
        theirs = set(transformers.LlamaForCausalLM(hf_config).state_dict())
    mapped = [hf for name in ours for hf in hf_names(name, CONFIG)]
    assert sorted(mapped) == sorted(theirs), "every parameter maps, nothing is left over"
    with pytest.raises(ValueError, match="no Hugging Face llama name"):
        hf_names("layers.0.feed_forward.router.gate.weight", CONFIG)

    assert from_hf_config(to_hf_config(CONFIG)) == CONFIG
    assert from_hf_config(hf_config.to_dict()) == CONFIG, "config.json as transformers writes it"
    assert (hf_config.hidden_size, hf_config.num_key_value_heads, hf_config.rms_norm_eps) == (128, 4, CONFIG.norm_eps)


# ---- numerics against transformers ------------------------------------------------------

def rotate_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder q/k rows from "rotate half" to the interleaved (Meta) layout, per head."""
    heads = weight.view(-1, 2, head_dim // 2, weight.shape[1])
    return heads.transpose(1, 2).reshape(weight.shape)


@torch.no_grad()
def test_logits_match_transformers(tmp_path):
    model = debug_model()
    save_hf_folder(full_state(model), CONFIG, tmp_path)
    hf = hf_model(tmp_path)
    ours, theirs = model(tokens()), hf(tokens()).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |logits diff| vs transformers: {diff:.3g} (logits up to {ours.abs().max():.3g})")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # The comparison is sensitive to the q/k layout: a permutation (the wrong RoPE convention) shows.
    q = hf.model.layers[0].self_attn.q_proj.weight
    q.copy_(rotate_interleaved(q, CONFIG.head_dim))
    assert (model(tokens()) - hf(tokens()).logits).abs().max() > 1e-2


def write_checkpoint(root: Path, step: int, model, meta: dict) -> None:
    from core.checkpoint import Checkpointer, model_tensors, optimizer_tensors
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer().save(root, step, {**model_tensors(model), **optimizer_tensors(optimizer, model)}, meta)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP save, on purpose
@torch.no_grad()
def test_cli_exports_newest_checkpoint(tmp_path):
    meta = {"model_name": "debug", "model_config": dataclasses.asdict(CONFIG)}
    write_checkpoint(tmp_path / "ckpt", 1, debug_model(seed=1), meta)
    model = debug_model(seed=2)
    write_checkpoint(tmp_path / "ckpt", 2, model, meta)

    out = tmp_path / "hf"
    cmd = [sys.executable, str(ROOT / "tools" / "hf_convert.py"), "export", str(tmp_path / "ckpt"), str(out),
           "--dtype", "bfloat16"]
    result = run_python(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config, state = load_hf_folder(out)
    assert config == CONFIG
    for name, p in model.named_parameters():
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], p.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_model_config_from_meta_or_flag():
    spec = importlib.util.spec_from_file_location("hf_convert", ROOT / "tools" / "hf_convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    small = dataclasses.replace(CONFIG, n_layers=2)
    assert cli.model_config({"model_name": "debug", "model_config": dataclasses.asdict(small)}, None) == small
    assert cli.model_config({"model_name": "debug"}, None) == CONFIG
    assert cli.model_config({}, "debug") == CONFIG, "--model is the fallback for an older meta.json"
    with pytest.raises(SystemExit, match="pass --model NAME"):
        cli.model_config({"step": 3}, None)
    with pytest.raises(SystemExit, match="--model debug differs"):
        cli.model_config({"model_config": dataclasses.asdict(small)}, "debug")
    with pytest.raises(ValueError, match=r"fields a dense Llama does not: \['n_experts'\]"):
        cli.model_config({"model_config": {**dataclasses.asdict(CONFIG), "n_experts": 8}}, None)


@torch.no_grad()
def test_sharded_export_loads_in_transformers(tmp_path):
    state = full_state(debug_model())
    files = save_hf_folder(state, CONFIG, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / SINGLE_FILE).exists() and len(files) == len(shards) + 2

    theirs = hf_model(tmp_path).state_dict()
    for name, tensor in state.items():
        assert torch.equal(theirs[hf_names(name, CONFIG)[0]], tensor), name
    _, loaded = load_hf_folder(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    # Exporting again unsharded removes the old shards and index.
    save_hf_folder(state, CONFIG, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_FILE]


# ---- loading into a sharded model -------------------------------------------------------

def load_sharded(folder: str, meshes: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """On each rank: build the debug model on meta, shard it over each mesh, load the folder,
    and gather the full weights back (plus which were really split)."""
    from torch.distributed.tensor import DTensor

    from core.mesh import MeshShape, build_mesh
    from models.parallelize import materialize, shard_module
    out = {}
    for mesh in meshes:
        with torch.device("meta"):
            model = build_model(CONFIG)
        shard_module(model, build_mesh(MeshShape.parse(mesh), "cpu"))
        materialize(model, torch.device("cpu"))
        load_hf_weights_(model, folder)
        out[mesh] = {name: p.full_tensor() for name, p in model.named_parameters() if isinstance(p, DTensor)}
        out[mesh]["split"] = [name for name, p in model.named_parameters()
                              if isinstance(p, DTensor) and p.to_local().shape != p.shape]
    return out


def test_load_into_tp_and_fsdp_sharded_models(tmp_path):
    state = full_state(debug_model())
    save_hf_folder(state, CONFIG, tmp_path)
    results = run_on_ranks(load_sharded, 2, str(tmp_path), ["tp=2", "dp=2"], timeout=180)
    for rank_result in results:
        for mesh, loaded in rank_result.items():
            split = loaded.pop("split")
            assert "layers.0.attention.wq.weight" in split, f"{mesh}: the model should be sharded"
            assert len(loaded) >= len(state) - 3, f"{mesh}: nearly every parameter is a DTensor"
            for name, full in loaded.items():
                assert torch.equal(full, state[name]), f"{mesh}: {name}"


# ---- errors -----------------------------------------------------------------------------

def rewrite_weights(folder: Path, edit) -> None:
    """Apply ``edit`` to the HF-named tensors of ``folder/model.safetensors`` and write them back."""
    tensors = load_file(folder / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})


def test_clear_errors(tmp_path):
    save_hf_folder(full_state(debug_model()), CONFIG, tmp_path)
    model = build_model(CONFIG)

    with pytest.raises(ValueError, match=r"n_layers: folder has 4, the run has 2"):
        check_hf_config_matches(tmp_path, dataclasses.replace(CONFIG, n_layers=2))
    check_hf_config_matches(tmp_path, dataclasses.replace(CONFIG, max_seq_len=64))  # only a limit

    rewrite_weights(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(CONFIG.dim + 1)}))
    with pytest.raises(ValueError, match=r"shape mismatch for 'norm.weight' \('model.norm.weight'\).*"
                                         r"has \(129,\), the model config needs \(128,\)"):
        load_hf_weights_(model, tmp_path)

    rewrite_weights(tmp_path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.2.feed_forward.w3.weight'\], unexpected keys \[\]"):
        load_hf_weights_(model, tmp_path)

    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match="RoPE scaling 'dynamic'"):
        load_hf_folder(tmp_path)
