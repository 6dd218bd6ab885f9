"""What a model costs, from its config alone: parameter counts by role and FLOPs per token.

Everything that counts a model (the start-up banner, MFU, the pipeline's stage split, the
planner, the Hugging Face shape checks) reads one ``ModelStats``, built from the config's
``parameter_shapes()`` (each family lists its parameters there): no module is built, not even
on the meta device, so counting a 1T-parameter model takes microseconds. Nothing communicates.

Roles of a block's parameters, as the parallelisms treat them:

    tp          2-D attention and dense feed-forward weights: tensor parallel shards them
    expert      routed expert weights [E, ...]: expert parallel splits them, a token uses top_k of E
    replicated  norms, biases, router, shared expert: whole on every tp rank
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("tp", "expert", "replicated")  # what a config's parameter_role() answers


@dataclass(frozen=True)
class ModelStats:
    """Counts of the whole (unsharded) model of ``config``.

    ``layers[i]``: parameters of block i by role; ``embedding`` / ``output`` / ``final_norm``:
    the parts outside the blocks (``output`` is counted even when tied to the embedding, since it
    is a matmul of its own; ``total`` counts a tied weight once).
    """

    config: object
    layers: list[dict[str, int]]
    embedding: int
    output: int
    final_norm: int

    @classmethod
    def of(cls, config) -> ModelStats:
        layers = []
        for layer in range(config.n_layers):
            counts = dict.fromkeys(ROLES, 0)
            for name, shape in config.block_shapes(layer).items():
                counts[config.parameter_role(name, shape)] += math.prod(shape)
            layers.append(counts)
        return cls(config, layers, config.vocab_size * config.dim, config.vocab_size * config.dim, config.dim)

    @property
    def total(self) -> int:
        """Every parameter once (a tied output is the embedding)."""
        output = 0 if self.config.tie_embeddings else self.output
        return sum(sum(layer.values()) for layer in self.layers) + self.embedding + output + self.final_norm

    @property
    def non_embedding(self) -> int:
        """Parameters outside the token embedding and the output projection (Kaplan et al.'s convention)."""
        return sum(sum(layer.values()) for layer in self.layers) + self.final_norm

    def layer_active(self, layer: int) -> float:
        """Parameters of block ``layer`` that multiply each token: routed experts only top_k of E."""
        counts = self.layers[layer]
        return counts["tp"] + counts["replicated"] + counts["expert"] * self.config.routed_share()

    @property
    def active(self) -> float:
        """Parameters that take part in each token's forward (the embedding is looked up, counted once)."""
        output = 0 if self.config.tie_embeddings else self.output
        return sum(self.layer_active(i) for i in range(len(self.layers))) + self.embedding + output \
            + self.final_norm

    @property
    def matmul_weights(self) -> float:
        """Active weights that multiply each token in a matmul: every block's (routed experts top_k of
        E), the final norm's and the output projection's, tied or not; not the embedding (a lookup).
        The ``N`` of ``6 N`` training FLOPs per token (``train.flops``)."""
        return sum(self.layer_active(i) for i in range(len(self.layers))) + self.output + self.final_norm

    @property
    def attention_width(self) -> int:
        """Width of the attention scores' matmuls: n_heads * head_dim (the model dim unless a family sets
        its own head size)."""
        return self.config.n_heads * self.config.head_dim

    def layer_costs(self, seq_len: int) -> list[float]:
        """Forward FLOPs per token of each block: 2 per active weight plus causal attention,
        2 * seq_len * width (QK^T and PV over half the s x s scores, on average). What the pipeline
        balances its stages by."""
        attention = 2.0 * seq_len * self.attention_width
        return [2.0 * self.layer_active(i) + attention for i in range(len(self.layers))]

    @property
    def head_cost(self) -> float:
        """Forward FLOPs per token of the last stage's head: the final norm and the output projection
        (the loss is a few element-wise ops per logit, left out)."""
        return 2.0 * (self.final_norm + self.output)
