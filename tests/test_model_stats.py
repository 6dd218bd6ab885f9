"""ModelStats counts a model from its config alone: it must agree with the module the config builds.

The reference here is the module itself, built on the meta device and counted parameter by
parameter (how the banner, MFU, the planner and the pipeline split counted before): if a family
adds a parameter to its module and not to ``parameter_shapes`` (or the other way), these fail.
"""

import math
from dataclasses import replace

import pytest
import torch

from models.moe import MoE
from models.registry import CONFIGS, build_model, get_config
from models.stats import ModelStats

# Every registry entry, and the variants whose parameters differ (biases, q/k norms, own head size,
# tied output, shared experts and dense first layers).
VARIANTS = {
    **CONFIGS,
    "qkv-bias": replace(CONFIGS["debug"], qkv_bias=True),
    "qk-norm-own-head": replace(CONFIGS["debug"], qk_norm=True, attention_head_dim=32),
    "tied": replace(CONFIGS["debug"], tie_embeddings=True),
    "moe-tied-qk-norm": replace(CONFIGS["debug-moe-v3"], tie_embeddings=True, qk_norm=True),
}


def meta_model(config):
    with torch.device("meta"):
        return build_model(config)


def module_counts(config) -> dict:
    """The counts ModelStats gives, computed from the module (the old way)."""
    model = meta_model(config)
    layers = []
    for block in model.layers.values():
        counts = dict(tp=0, expert=0, replicated=0)
        for name, p in block.named_parameters():
            counts[config.parameter_role(name, tuple(p.shape))] += p.numel()
        layers.append(counts)
    total = sum(p.numel() for p in model.parameters())
    routed_unused = sum(moe.experts.w1.numel() * 3 * (1 - moe.cfg.top_k / moe.cfg.n_experts)
                        for moe in model.modules() if isinstance(moe, MoE))
    outside = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("tok_embeddings", "output")))
    return dict(layers=layers, total=total, active=total - routed_unused, non_embedding=total - outside,
                output=model.output.weight.numel(), final_norm=model.norm.weight.numel())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_shapes_are_the_modules(name):
    config = VARIANTS[name]
    built = [(n, tuple(p.shape)) for n, p in meta_model(config).named_parameters()]
    assert list(config.parameter_shapes().items()) == built


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_counts_are_the_modules(name):
    config, want = VARIANTS[name], module_counts(VARIANTS[name])
    stats = ModelStats.of(config)
    assert stats.layers == want["layers"]
    assert (stats.total, stats.non_embedding, stats.output, stats.final_norm) == \
        (want["total"], want["non_embedding"], want["output"], want["final_norm"])
    assert math.isclose(stats.active, want["active"], rel_tol=1e-12)


def test_flops_count_every_matmul_once():
    """6 N + 12 L w s: N the active matmul weights (a tied output too: it is still a matmul), w the
    attention width (Qwen3's own head size, not the model dim)."""
    from train.flops import model_flops_per_token

    config = get_config("qwen3-0.6b")  # tied, 16 heads x 128 = 2048 wide at dim 1024
    stats = ModelStats.of(config)
    blocks = sum(sum(layer.values()) for layer in stats.layers)
    n = blocks + config.dim + config.vocab_size * config.dim
    assert model_flops_per_token(config, 4096) == 6.0 * n + 12.0 * 28 * 2048 * 4096
    moe = get_config("qwen3-30b-a3b")
    routed = sum(layer["expert"] for layer in ModelStats.of(moe).layers)
    dense_view = ModelStats.of(moe).matmul_weights + routed * (1 - 8 / 128)
    assert math.isclose(dense_view, ModelStats.of(moe).total - moe.vocab_size * moe.dim)  # all but the embedding
