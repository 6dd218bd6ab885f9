"""The MoE decoder: the Llama decoder whose feed-forwards after the first ``n_dense_layers`` are MoE layers."""

from __future__ import annotations

from ..llama.model import Transformer, TransformerBlock
from .config import MoEConfig
from .layer import MoE


class MoETransformer(Transformer):
    """The Llama decoder with MoE feed-forwards (after ``n_dense_layers`` dense ones).

    Same layer ModuleDict and optional embeddings / norm / output as the dense model, so
    pipeline stages are cut the same way.
    """

    config: MoEConfig

    def build_block(self, layer_index: int) -> TransformerBlock:
        if layer_index < self.config.n_dense_layers:
            return TransformerBlock(self.config)
        return TransformerBlock(self.config, MoE(self.config))
