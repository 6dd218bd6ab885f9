"""The seam between the trainer and the parallel layout (``models.parallel_model``).

One process: the tensor-parallel coverage check runs on a two-rank world of torch's fake
process group (no real collective is under test), the step's source is read as text.
"""

import inspect
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn


@pytest.fixture
def fake_world_of_two():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def debug_model_on_meta():
    from models.registry import build_model, get_config

    with torch.device("meta"):
        return build_model(get_config("debug"))


@pytest.mark.parametrize("extra_parameter", [False, True], ids=["plan-covers-all", "plain-parameter"])
def test_a_parameter_outside_the_tensor_parallel_plan_is_refused(fake_world_of_two, extra_parameter):
    """Under tp=2 a plain parameter the plan does not place would get a partial (or doubled)
    gradient; it is refused by name instead. Without it the same model parallelizes."""
    from core.mesh import MeshShape, ParallelMesh
    from models.parallelize import shard_module

    pm = ParallelMesh(MeshShape(tp=2), "cpu")
    model = debug_model_on_meta()
    if not extra_parameter:
        shard_module(model, pm)
        return
    with torch.device("meta"):
        model.layers["1"].attention.temperature = nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"\['layers.1.attention.temperature'\] are not in the tensor-parallel plan"):
        shard_module(model, pm)


STEP_FUNCTIONS = ("train_step", "compute_gradients", "apply_gradients", "step_report")


def test_the_step_asks_nothing_of_the_mesh():
    """The trainer's step reads as forward-backward, finish gradients, clip, optimizer step,
    after-step, report: no mesh query, no MoE call, no pipeline branch (the issue's grep)."""
    from train import loop

    for name in STEP_FUNCTIONS:
        source = inspect.getsource(getattr(loop, name))
        assert not re.search(r"pm\.size|pm\[|moe|expert|pipeline", source, re.IGNORECASE), name
