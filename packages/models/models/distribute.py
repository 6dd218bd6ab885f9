"""Where a model config meets a mesh: the one call that builds this rank's ``ParallelModel``."""

from __future__ import annotations

import torch

from core.mesh import ParallelMesh

from .parallel_model import ParallelModel, StepRecipe
from .parallelize import ParallelOptions, build_single_stage_model
from .pipelined import build_pipelined_model


def distribute_model(model_config, pm: ParallelMesh, device: torch.device, options: ParallelOptions,
                     recipe: StepRecipe, seed: int | None) -> ParallelModel:
    """This rank's part of the model of ``model_config`` on ``pm``, initialized (the same weights
    on every mesh), with everything its steps need: the pipeline's stages and schedule when
    pp > 1, else the whole model sharded by the other dims. Collective (process groups, FSDP).
    ``seed`` None: no initial values (a dry run, on the meta device).
    """
    build = build_pipelined_model if pm.size("pp") > 1 else build_single_stage_model
    return build(model_config, pm, device, options, recipe, seed)
