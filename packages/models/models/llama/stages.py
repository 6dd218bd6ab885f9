"""Cut a pipeline stage out of a whole ``Transformer`` (usually still on the meta device).

A stage keeps a contiguous run of layers under their original names (``layers.5`` stays
``layers.5``), so mesh-invariant initialization, checkpoints and parity tests see the same
parameter names on every mesh. The first stage keeps the token embedding and the last
the final norm and output projection; a middle stage maps hidden states to hidden states:

    first:  tokens [b, s]          -> hidden [b, s, dim]
    middle: hidden [b, s, dim]     -> hidden [b, s, dim]
    last:   hidden [b, s, dim]     -> logits [b, s, vocab]

(under tensor/sequence parallel the hidden states passed between stages are each rank's
local sequence slice [b, s/tp, dim]). A tied output on a last stage without the embedding
becomes its own parameter, a replica of the embedding (``models.tied_output``).
"""

from __future__ import annotations

from .model import Transformer


def split_stage(model: Transformer, layer_ids: list[int], first: bool, last: bool) -> Transformer:
    """Turn ``model`` in place into the stage holding ``layer_ids``; returns it."""
    keep = {str(i) for i in layer_ids}
    unknown = keep - set(model.layers.keys())
    if unknown:
        raise ValueError(f"layers {sorted(unknown, key=int)} are not in the model (it has {len(model.layers)})")
    for name in [n for n in model.layers.keys() if n not in keep]:
        del model.layers[name]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model
