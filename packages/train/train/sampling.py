"""``--sample-every N --sample-prompt TEXT``: a short greedy sample from the model being trained.

Every rank runs the same forwards on the same prompt with the parallel model as it trains
(FSDP gathers, tensor, context and expert parallel all take part as in a step), so no copy of
the model is made. There is no K/V cache here: each new token is one forward over the prompt
and the tokens so far, right-padded with EOS to a multiple of 2 cp tp (context parallel cuts the
sequence into 2 cp zigzag chunks, sequence parallel each rank's part into tp; causal attention
keeps the padding out of every real position). A sample of 32 tokens after a 10-token prompt
costs 32 forwards of at most 48 tokens: nothing next to a step. A pipeline would need its
schedule for a forward that returns logits: ``check_sampling`` refuses pp > 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from core.zigzag import zigzag_unshard
from models.parallel_model import ParallelModel

from .tokenizer import Tokenizer


def check_sampling(cfg, shape, tokenizer: Tokenizer, max_seq_len: int) -> None:
    """ValueError (before any collective) for sampling options that cannot work."""
    if not cfg.sample_every:
        if cfg.sample_prompt:
            raise ValueError("--sample-prompt applies with --sample-every N (how often to sample)")
        return
    if not cfg.sample_prompt:
        raise ValueError("--sample-every needs --sample-prompt TEXT (the text each sample continues)")
    if shape.pp > 1:
        raise ValueError(f"--sample-every with pp={shape.pp}: samples run the training model's plain forward, "
                         f"which a pipeline does not have; sample from a checkpoint with tools/generate.py instead")
    prompt = tokenizer.encode(cfg.sample_prompt)
    if not prompt:
        raise ValueError("--sample-prompt encodes to no tokens: give it some text")
    if len(prompt) + cfg.sample_tokens > max_seq_len:
        raise ValueError(f"--sample-prompt ({len(prompt)} tokens) + --sample-tokens {cfg.sample_tokens} exceed the "
                         f"model's max_seq_len {max_seq_len}: shorten them")


def full_logits(model: ParallelModel, tokens: torch.Tensor) -> torch.Tensor:
    """[1, L] tokens (the same on every rank, L a multiple of 2 cp tp) -> [1, L, vocab] logits on
    every rank. Collective: the model's forward; the all-gather of the tp vocabulary shards; with
    cp, an all-gather of the ranks' zigzag chunks, put back in order."""
    local, _, _ = model.local_batch(tokens, tokens)
    logits = model.module(local)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits  # [1, L/cp, vocab]
    cp = model.mesh.size("cp")
    if cp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(cp)]
    dist.all_gather(parts, logits.contiguous(), group=model.mesh["cp"].get_group())
    return zigzag_unshard(parts, dim=1)


@torch.no_grad()
def greedy_sample(model: ParallelModel, prompt: list[int], new_tokens: int, eos_id: int) -> list[int]:
    """The ``new_tokens`` (fewer if EOS comes) greedy tokens after ``prompt``. Collective: every rank of
    the model's mesh runs the same forwards (``full_logits``)."""
    module = model.module
    was_training = module.training
    module.eval()  # no MoE load bookkeeping in a sample
    cp, tp = model.mesh.size("cp"), model.mesh.size("tp")
    multiple = tp * (2 * cp if cp > 1 else 1)  # zigzag chunks, each split by sequence parallel
    ids = list(prompt)
    try:
        for _ in range(new_tokens):
            length = -(-len(ids) // multiple) * multiple
            tokens = torch.full((1, length), eos_id, dtype=torch.long)
            tokens[0, :len(ids)] = torch.tensor(ids)
            ids.append(int(full_logits(model, tokens)[0, len(ids) - 1].argmax()))
            if ids[-1] == eos_id:
                break
    finally:
        module.train(was_training)
    return ids[len(prompt):]


def sample_text(model: ParallelModel, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> str:
    """The prompt and its greedy continuation, as text. Collective (``greedy_sample``)."""
    tokens = greedy_sample(model, tokenizer.encode(prompt), new_tokens, tokenizer.eos_id)
    return prompt + tokenizer.decode(tokens)
