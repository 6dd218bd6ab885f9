"""Document masking: ids and positions from EOS, masked ring and all-gather attention against a
masked full-sequence reference, and the model: tokens attend across documents without it and
not with it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_harness import run_on_ranks

from core.context_parallel import CP_METHODS
from core.documents import document_ids, document_positions
from core.zigzag import zigzag_shard, zigzag_unshard

EOS = 9


def test_ids_and_positions_restart_after_each_eos():
    tokens = torch.tensor([[1, 2, EOS, 3, 4, 5, EOS, 6], [EOS, EOS, 1, 1, 1, 1, 1, 1]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2, 2, 2]]
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 0, 1, 2, 3, 4, 5]]


# A sequence of 24 tokens (cp=2: chunks of 6, cp=3: chunks of 4) cut into documents whose
# boundaries fall inside chunks, on chunk edges, and a one-token document.
BOUNDARIES = [[3, 6, 7, 15], [11]]  # EOS positions per batch row
CASE = (2, 4, 2, 24, 8)  # batch, heads, kv heads, sequence, head_dim


def _inputs(dtype):
    b, h, hkv, s, d = CASE
    gen = torch.Generator().manual_seed(5)
    shapes = [(b, h, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, h, s, d)]
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]
    tokens = torch.zeros(b, s, dtype=torch.long)
    for row, ends in enumerate(BOUNDARIES):
        tokens[row, ends] = EOS
    return tensors, document_ids(tokens, EOS)


def _reference(q, k, v, dout, ids):
    """SDPA on the whole sequence in fp64 with the mask spelled out: same document and causal."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.size(1) // k.size(1)
    allowed = (ids[:, None, :, None] == ids[:, None, None, :]) & torch.ones(ids.size(1), ids.size(1)).tril().bool()
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=allowed)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _masked_attention_on_ranks():
    """Every rank: each method at cp = world size and cp = 1, fp64 and fp32; local out and grads."""
    rank, world = dist.get_rank(), dist.get_world_size()
    single = [dist.new_group([r]) for r in range(world)][rank]
    results = {}
    for method, attention in CP_METHODS.items():
        for cp, group in ((world, dist.group.WORLD), (1, single)):
            for dtype in (torch.float64, torch.float32):
                (q, k, v, dout), ids = _inputs(dtype)
                me = dist.get_rank(group)
                q, k, v, dout = (zigzag_shard(t, 2, me, cp) for t in (q, k, v, dout))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                out = attention(q, k, v, group, document_ids=ids)
                out.backward(dout)
                results[(method, cp, dtype)] = (out.detach(), q.grad, k.grad, v.grad)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_masked_context_parallel_attention_matches_the_masked_reference(world):
    per_rank = run_on_ranks(_masked_attention_on_ranks, world, timeout=120)
    tolerance = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
    for method in CP_METHODS:
        for cp in (world, 1):
            for dtype in (torch.float64, torch.float32):
                tensors, ids = _inputs(dtype)
                expected = _reference(*tensors, ids)
                parts = [r[(method, cp, dtype)] for r in per_rank] if cp > 1 else None
                for j, name in enumerate(("out", "dq", "dk", "dv")):
                    got = zigzag_unshard([p[j] for p in parts], 2) if parts else per_rank[0][(method, 1, dtype)][j]
                    torch.testing.assert_close(got.double(), expected[j], **tolerance[dtype],
                                               msg=lambda m: f"{method} cp={cp} {dtype} {name}: {m}")


# ---------------------------------------------------------------- the model

def _logits(tokens: torch.Tensor, masked: bool) -> torch.Tensor:
    from core.documents import Documents
    from models.init import init_weights
    from models.registry import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config("debug"))
    init_weights(model, model.config.n_layers, seed=0)
    documents = None
    if masked:
        ids = document_ids(tokens, EOS)
        documents = Documents(ids, document_positions(ids))
    with torch.no_grad():
        return model(tokens, documents=documents)


def test_with_masking_a_document_sees_nothing_of_the_one_before_it():
    """Change the first document: the second one's logits move without masking, not with it, and
    with masking they equal the second document's logits when it stands alone (positions restart)."""
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(10, 500, (1, 11), generator=gen), torch.randint(10, 500, (1, 12), generator=gen)
    tokens = torch.cat([first, torch.tensor([[EOS]]), second], dim=1)
    other = tokens.clone()
    other[0, :11] = torch.randint(10, 500, (11,), generator=gen)
    for masked in (False, True):
        a, b = _logits(tokens, masked)[0, 12:], _logits(other, masked)[0, 12:]
        if masked:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            torch.testing.assert_close(a, _logits(second, masked=True)[0], rtol=0, atol=1e-5)
        else:
            assert (a - b).abs().max() > 1e-2, "without masking the second document sees the first"


# ---------------------------------------------------------------- training on meshes

def _short_documents(path):
    """A .jsonl of 300 documents of 3-40 characters: every 32-token window crosses several boundaries."""
    import json
    import random

    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(300):
            fh.write(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 40)))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def documents_file(tmp_path_factory):
    return _short_documents(tmp_path_factory.mktemp("docs") / "docs.jsonl")


@pytest.fixture(scope="module")
def masked_reference(documents_file):
    from train.parity import merge_ranks, run_steps

    return merge_ranks(run_on_ranks(run_steps, 1, "", {"dataset": documents_file, "document_masking": True}))


@pytest.mark.parametrize("mesh, world, overrides", [
    ("cp=2", 2, {}),
    ("cp=2", 2, {"cp_method": "allgather"}),
    ("cp=2,tp=2", 4, {}),
    ("dp=2", 2, {"grad_accum_steps": 2}),
])
def test_document_masking_is_mesh_invariant(documents_file, masked_reference, mesh, world, overrides):
    from train.parity import assert_same_run, merge_ranks, run_steps

    run = merge_ranks(run_on_ranks(run_steps, world, mesh, {"dataset": documents_file, "document_masking": True,
                                                            **overrides}))
    assert_same_run(masked_reference, run)


def test_document_masking_changes_training(documents_file, masked_reference):
    """The runs above would agree trivially if masking did nothing: it changes the gradients."""
    from train.parity import merge_ranks, run_steps

    plain = merge_ranks(run_on_ranks(run_steps, 1, "", {"dataset": documents_file}))
    grads = masked_reference["grads"]
    change = max(((plain["grads"][n] - g).norm() / g.norm()).item() for n, g in grads.items())
    assert change > 0.05, change
