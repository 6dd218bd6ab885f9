"""Text generation with a key/value cache, for any model built by ``models.registry.build_model``.

The model itself is not changed: like context parallel, generation swaps each attention
layer's ``attention_fn`` (here: attend over this layer's cache of earlier keys and values,
then the new ones) and ``position_fn`` (each row's own rotary positions), and puts them back
afterwards. One forward over the prompts fills the caches (the "prefill"); each further
forward feeds one token per row and reads every earlier key from the cache, so a token costs
one pass over the weights and its attention over the cache, not a forward over the sequence.

A batch of prompts of different lengths is *left*-padded, as Hugging Face's ``generate``
does: every row's next token is then in the same column. Padding slots are masked out as
keys, and each row's positions count from its own first real token, so a row computes
exactly what it would alone.

Shapes: ``b`` rows, ``S`` cache slots (longest prompt + new tokens), per layer caches
``[b, h_kv, S, head_dim]``; a step feeds ``[b, s]`` tokens (``s`` = the prompt length for the
prefill, then 1). On one process nothing communicates. ``shard_for_decoding`` splits the model
over a tensor-parallel group instead (``ModelFamily.decoding_plan``: every rank holds 1/tp of
the heads and of the feed-forward, and of the cache); each rank then runs ``generate`` on the
same prompts and draws the same tokens from the same (all-reduced) logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.tensor_parallel import apply_tensor_parallel

from .registry import family_of


@dataclass
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy (argmax); otherwise the logits
    are divided by it, cut to the ``top_k`` most likely tokens (0: all) and to the smallest set
    whose probability reaches ``top_p`` (1: all), and one token is drawn with ``generator``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """[b, vocab] float logits -> [b] token ids."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            outside = probs.cumsum(dim=-1) - probs > self.top_p  # the mass before a token already reaches top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def shard_for_decoding(model: nn.Module, tp_mesh) -> None:
    """Split ``model`` (on any device, meta included) over ``tp_mesh`` for generation, in place.

    Sequence parallel would cut the sequence of each forward over the ranks, and a decoding
    step feeds one token: the decoding plan keeps activations whole (replicated) instead and
    pays one all-reduce per attention and per feed-forward, and one all-gather of the logits.
    """
    apply_tensor_parallel(model, tp_mesh, family_of(model.config).decoding_plan(model))
    model.tie_output()  # a tied embedding and output each got their own DTensor weight


class DecodeState:
    """The caches and masks every attention layer reads during one generation.

    ``valid`` [b, S]: slots that hold a real token (not left padding); ``start``: the first slot
    of the tokens being fed; ``positions`` [b, s]: their rotary positions.
    """

    def __init__(self, rows: int, slots: int, device: torch.device):
        self.valid = torch.zeros(rows, slots, dtype=torch.bool, device=device)
        self.start = 0
        self.positions = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 0, 0, dtype=torch.bool, device=device)

    def advance(self, fed: int, positions: torch.Tensor) -> None:
        """Set up a step that feeds ``fed`` tokens per row at ``positions`` [b, fed]: the mask
        [b, 1, fed, start + fed] lets each query see the real tokens at or before its slot (and
        itself, so a padding query never has an empty row: its output is discarded anyway)."""
        end = self.start + fed
        query_slot = torch.arange(self.start, end, device=self.valid.device)[:, None]
        key_slot = torch.arange(end, device=self.valid.device)[None, :]
        visible = self.valid[:, None, :end] & (key_slot <= query_slot)[None]
        self.mask = (visible | (key_slot == query_slot)[None])[:, None]
        self.positions = positions

    def finish_step(self, fed: int) -> None:
        self.start += fed


class CachedAttention:
    """One layer's ``attention_fn`` during generation: store this step's K/V in the cache, attend
    over every slot up to the step's last. q [b, h, s, d], k/v [b, h_kv, s, d] -> [b, h, s, d].

    The cache [b, h_kv, S, d] is allocated at the first call, from k: under tensor parallel a
    rank holds only its own kv heads."""

    def __init__(self, state: DecodeState, slots: int):
        self.state, self.slots = state, slots
        self.keys = self.values = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.keys is None:
            b, kv_heads, _, d = k.shape
            self.keys = k.new_zeros(b, kv_heads, self.slots, d)
            self.values = torch.zeros_like(self.keys)
        start, fed = self.state.start, q.shape[2]
        self.keys[:, :, start:start + fed] = k
        self.values[:, :, start:start + fed] = v
        keys, values = self.keys[:, :, :start + fed], self.values[:, :, :start + fed]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.state.mask,
                                              enable_gqa=keys.shape[1] != q.shape[1])


@contextlib.contextmanager
def decoding(model: nn.Module, rows: int, slots: int) -> Iterator[DecodeState]:
    """Give every attention layer of ``model`` a K/V cache of ``slots`` for ``rows`` rows; put the
    layers' own attention and positions back on exit."""
    state = DecodeState(rows, slots, next(model.parameters()).device)
    originals = []
    for layer in family_of(model.config).attention_layers(model):
        originals.append((layer, layer.attention_fn, layer.position_fn))
        layer.attention_fn = CachedAttention(state, slots)
        layer.position_fn = lambda seq_len, device: state.positions
    try:
        yield state
    finally:
        for module, attention_fn, position_fn in originals:
            module.attention_fn, module.position_fn = attention_fn, position_fn


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
             sampling: Sampling | None = None) -> list[list[int]]:
    """The tokens ``model`` continues each prompt with: up to ``max_new_tokens`` per row, ending
    with ``eos_id`` where the model produced it. ``prompts``: token ids, at least one each;
    ``sampling``: how each token is chosen (None: greedy)."""
    sampling = sampling or Sampling()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    rows, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((rows, longest), eos_id, dtype=torch.long, device=device)
    with decoding(model, rows, longest + max_new_tokens) as state:
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
            state.valid[row, longest - len(prompt):longest] = True
        positions = (state.valid[:, :longest].long().cumsum(dim=1) - 1).clamp(min=0)
        logits = _step(model, state, tokens, positions)
        generated = torch.zeros(rows, 0, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            chosen = torch.where(finished, eos_id, sampling.next_tokens(logits[:, -1]))
            generated = torch.cat([generated, chosen[:, None]], dim=1)
            finished |= chosen == eos_id
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            state.valid[:, longest + step] = True
            positions = positions[:, -1:] + 1
            logits = _step(model, state, chosen[:, None], positions)
    return [_until_eos(row, eos_id) for row in generated.tolist()]


def _step(model: nn.Module, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    state.advance(tokens.shape[1], positions)
    logits = model(tokens)
    state.finish_step(tokens.shape[1])
    return logits


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens
