"""Hugging Face export/import of Mixtral-style MoE models: names, config, logits equal to
``transformers.MixtralForCausalLM``, CLI export, loading into an ep=2 model, clear errors.

``transformers`` models are built from config objects or our own folders only (no download).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rank_harness import run_on_ranks, run_python
from safetensors import safe_open
from test_hf_format import full_state, unit_scale_model

from models.hf_format import (
    check_hf_config_matches,
    expected_hf_shapes,
    from_hf_config,
    hf_names,
    load_hf_folder,
    load_hf_weights_,
    save_hf_folder,
    to_hf_config,
)
from models.moe import MoEConfig
from models.moe.layer import Router
from models.registry import build_model, config_from_dict, get_config

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = get_config("debug-mixtral", n_layers=2)  # 8 experts, top-2, dim 128, expert width 192


def mixtral_model(seed: int = 0, config: MoEConfig = CONFIG) -> torch.nn.Module:
    """A Mixtral-compatible model at unit scale, so that every token's top-2 differ and their
    weights are far from 1/2: a routing or expert-layout mistake shows."""
    return unit_scale_model(config, seed)


def hf_mixtral(folder) -> torch.nn.Module:
    return transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(7))


# ---- names and config -------------------------------------------------------------------

def test_names_and_config_round_trip(tmp_path):
    """Our names and per-expert shapes are exactly what MixtralForCausalLM.save_pretrained writes."""
    hf_config = transformers.MixtralConfig(**to_hf_config(CONFIG))
    transformers.MixtralForCausalLM(hf_config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        theirs = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert {hf: tuple(shape) for hf, (_, shape) in expected_hf_shapes(CONFIG).items()} == theirs
    assert hf_names("layers.1.feed_forward.experts.w2", CONFIG)[3] == \
        "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    assert from_hf_config(to_hf_config(CONFIG)) == CONFIG
    assert from_hf_config(hf_config.to_dict()) == CONFIG, "config.json as transformers writes it"
    assert (hf_config.num_local_experts, hf_config.num_experts_per_tok, hf_config.intermediate_size) == (8, 2, 192)
    assert config_from_dict(dataclasses.asdict(CONFIG)) == CONFIG, "meta.json's model_config of an MoE run"
    assert get_config("mixtral-8x7b") == from_hf_config(to_hf_config(get_config("mixtral-8x7b")))


# ---- numerics against transformers ------------------------------------------------------

def logits_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours - theirs).abs().max().item()


@torch.no_grad()
def test_logits_match_transformers(tmp_path):
    """Export -> MixtralForCausalLM, and MixtralForCausalLM.save_pretrained -> import: same logits."""
    model = mixtral_model()
    save_hf_folder(full_state(model), CONFIG, tmp_path / "ours")
    hf = hf_mixtral(tmp_path / "ours")
    ours, theirs = model(tokens()), hf(tokens()).logits
    print(f"max |logits diff| vs MixtralForCausalLM: {logits_diff(ours, theirs):.3g} "
          f"(logits up to {ours.abs().max():.3g})")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # The routing matters: not renormalizing the top-2 weights changes the logits ...
    plain = build_model(dataclasses.replace(CONFIG, norm_topk_prob=False))
    plain.load_state_dict(model.state_dict())
    assert logits_diff(plain(tokens()), theirs) > 1e-2
    # ... and so does the expert layout: swapping gate and up of one expert shows.
    gate_up = hf.model.layers[0].mlp.experts.gate_up_proj
    gate_up[0].copy_(gate_up[0].roll(CONFIG.moe_ffn_dim, dims=0))
    assert logits_diff(model(tokens()), hf(tokens()).logits) > 1e-2

    # Import: a folder transformers wrote itself, with other weights.
    for p in hf.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    hf.save_pretrained(tmp_path / "theirs")
    fresh = build_model(CONFIG)
    load_hf_weights_(fresh, tmp_path / "theirs")
    torch.testing.assert_close(fresh(tokens()), hf(tokens()).logits, atol=1e-5, rtol=1e-5)


# ---- CLI export of a real checkpoint ----------------------------------------------------

def write_checkpoint(root: Path, step: int, tensors: dict, meta: dict) -> None:
    from core.checkpoint import Checkpointer
    Checkpointer().save(root, step, tensors, meta)


def export_cli(checkpoint: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "hf_convert.py"), "export", str(checkpoint), str(out)]
    return run_python(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP save, on purpose
@torch.no_grad()
def test_cli_exports_mixtral_checkpoint(tmp_path):
    from core.checkpoint import model_tensors, optimizer_tensors
    model = mixtral_model(seed=3)
    optimizer = torch.optim.AdamW(model.parameters())
    meta = {"model_name": "debug-mixtral", "model_config": dataclasses.asdict(CONFIG)}  # as train.checkpointing
    write_checkpoint(tmp_path / "ckpt", 1, {**model_tensors(model), **optimizer_tensors(optimizer, model)}, meta)

    result = export_cli(tmp_path / "ckpt", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    config, state = load_hf_folder(tmp_path / "hf")
    assert config == CONFIG
    assert state.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(state[name], p) for name, p in model.named_parameters())
    # transformers fuses the per-expert files on load: gate_up_proj[j] = [w1[j].T; w3[j].T].
    experts = hf_mixtral(tmp_path / "hf").model.layers[1].mlp.experts
    ours = model.layers["1"].feed_forward.experts
    assert torch.equal(experts.gate_up_proj, torch.cat([ours.w1.mT, ours.w3.mT], dim=1))
    assert torch.equal(experts.down_proj, ours.w2.mT)

    # An MoE that no transformers class computes is refused before its tensors are read.
    write_checkpoint(tmp_path / "moe", 1, {"unused": torch.zeros(1)}, {"model_name": "debug-moe"})
    result = export_cli(tmp_path / "moe", tmp_path / "hf_moe")
    assert result.returncode != 0, result.stderr
    assert "no transformers class matches this model as 'mixtral'" in result.stderr, result.stderr
    assert not (tmp_path / "hf_moe").exists()


# ---- loading into an expert-parallel model ----------------------------------------------

def load_on_ep2(folder: str, batch: torch.Tensor) -> dict:
    """On each rank: the model on meta, ep=2, materialized with a garbage expert bias, then loaded."""
    from torch.distributed.tensor import DTensor

    from core.mesh import MeshShape, build_mesh
    from models.parallelize import materialize, shard_module
    with torch.device("meta"):
        model = build_model(CONFIG)
    shard_module(model, build_mesh(MeshShape.parse("ep=2"), "cpu"))
    materialize(model, torch.device("cpu"))
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.expert_bias.fill_(1.0)
    load_hf_weights_(model, folder)
    experts = model.layers["0"].feed_forward.experts.w1
    with torch.no_grad():
        logits = model(batch)
    return {"full": {name: (p.full_tensor() if isinstance(p, DTensor) else p.detach())
                     for name, p in model.named_parameters()},
            "local_experts": experts.to_local().shape[0] if isinstance(experts, DTensor) else None,
            "bias": [r.expert_bias.clone() for r in model.modules() if isinstance(r, Router)],
            "logits": logits}


def test_load_into_expert_parallel_model(tmp_path):
    model = mixtral_model()
    state = full_state(model)
    save_hf_folder(state, CONFIG, tmp_path)
    with torch.no_grad():
        reference = model(tokens())
    for rank_result in run_on_ranks(load_on_ep2, 2, str(tmp_path), tokens(), timeout=180):
        assert rank_result["local_experts"] == CONFIG.n_experts // 2, "each ep rank holds half the experts"
        for name, full in rank_result["full"].items():
            assert torch.equal(full, state[name]), name
        assert all(torch.equal(b, torch.zeros(CONFIG.n_experts)) for b in rank_result["bias"])
        torch.testing.assert_close(rank_result["logits"], reference, atol=1e-5, rtol=1e-5)


# ---- errors -----------------------------------------------------------------------------

def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no transformers class matches this model as 'mixtral'.*n_shared_experts=1"):
        save_hf_folder({}, get_config("debug-moe"), tmp_path)
    with pytest.raises(ValueError, match=r"norm_topk_prob=False.*n_shared_experts=2.*n_dense_layers=1"):
        to_hf_config(get_config("deepseek-moe-16b"))
    with pytest.raises(ValueError, match=r"score_func='sigmoid'.*bias_update_rate=0.001"):
        to_hf_config(get_config("debug-moe-v3"))
    assert not tmp_path.joinpath("config.json").exists(), "nothing written"

    save_hf_folder(full_state(mixtral_model()), CONFIG, tmp_path)
    check_hf_config_matches(tmp_path, dataclasses.replace(CONFIG, aux_loss_coef=0.1))  # training only
    with pytest.raises(ValueError, match=r"no transformers class matches this model as 'mixtral'.*n_shared_experts=1"):
        check_hf_config_matches(tmp_path, dataclasses.replace(CONFIG, n_shared_experts=1))
    with pytest.raises(ValueError,
                       match=r"n_experts: folder has 8, the run has 4; top_k: folder has 2, the run has 1"):
        check_hf_config_matches(tmp_path, dataclasses.replace(CONFIG, n_experts=4, top_k=1))
    with pytest.raises(ValueError, match=r"holds an MoE model, this run's model is a dense one"):
        check_hf_config_matches(tmp_path, get_config("debug"))

    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "sliding_window": 16}))
    windowed, _ = load_hf_folder(tmp_path)  # full attention equals the window's up to 16 tokens
    assert (windowed.sliding_window, windowed.max_seq_len) == (16, 16)
    with pytest.raises(ValueError, match="max_seq_len=64 exceeds sliding_window=16"):
        dataclasses.replace(windowed, max_seq_len=64).validate()
