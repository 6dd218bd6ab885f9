"""``--sample-every N --sample-prompt TEXT``: a short greedy sample from the model being trained.

Every rank runs the same forwards on the same prompt with the parallel model as it trains
(FSDP gathers, tensor parallel, expert parallel all take part as in a step), so no copy of
the model is made. There is no K/V cache here: each new token is one forward over the prompt
and the tokens so far, right-padded with EOS to a multiple of tp (sequence parallel splits the
sequence; causal attention keeps the padding out of every real position). A sample of 32
tokens after a 10-token prompt costs 32 forwards of at most 48 tokens: nothing next to a step.
Pipeline and context parallel would need their schedules and sequence layouts for a forward
that returns logits, and are refused by ``check_sampling``.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

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
    if shape.pp > 1 or shape.cp > 1:
        raise ValueError(f"--sample-every with pp={shape.pp}, cp={shape.cp}: samples run the training model's "
                         f"plain forward, which pipeline and context parallel do not have; sample from a "
                         f"checkpoint with tools/generate.py instead")
    prompt = tokenizer.encode(cfg.sample_prompt)
    if not prompt:
        raise ValueError("--sample-prompt encodes to no tokens: give it some text")
    if len(prompt) + cfg.sample_tokens > max_seq_len:
        raise ValueError(f"--sample-prompt ({len(prompt)} tokens) + --sample-tokens {cfg.sample_tokens} exceed the "
                         f"model's max_seq_len {max_seq_len}: shorten them")


@torch.no_grad()
def greedy_sample(model: ParallelModel, prompt: list[int], new_tokens: int, eos_id: int, multiple: int) -> list[int]:
    """The ``new_tokens`` (fewer if EOS comes) greedy tokens after ``prompt``. Collective: every rank of
    the model's mesh runs the same forwards (FSDP all-gathers, tp all-gathers of the logits)."""
    module = model.module
    was_training = module.training
    module.eval()  # no MoE load bookkeeping, no dropout-like training paths
    ids = list(prompt)
    try:
        for _ in range(new_tokens):
            length = -(-len(ids) // multiple) * multiple
            tokens = torch.full((1, length), eos_id, dtype=torch.long, device=model.device)
            tokens[0, :len(ids)] = torch.tensor(ids, device=model.device)
            logits = module(tokens)
            logits = logits.full_tensor() if isinstance(logits, DTensor) else logits  # [1, length, vocab]
            ids.append(int(logits[0, len(ids) - 1].argmax()))
            if ids[-1] == eos_id:
                break
    finally:
        module.train(was_training)
    return ids[len(prompt):]


def sample_text(model: ParallelModel, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> str:
    """The prompt and its greedy continuation, as text. Collective (``greedy_sample``)."""
    tokens = greedy_sample(model, tokenizer.encode(prompt), new_tokens, tokenizer.eos_id, model.mesh.size("tp"))
    return prompt + tokenizer.decode(tokens)
