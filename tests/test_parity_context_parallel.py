"""Mesh invariance with context parallel (ring attention over zigzag sequence slices)."""

import pytest

from parity import assert_same_run
from test_parity_dense import on_mesh, single_process


@pytest.mark.parametrize("mesh, world", [("cp=2", 2), ("cp=2,tp=2", 4), ("cp=2,dp=2", 4)])
def test_context_parallel_matches_single_process(mesh, world):
    assert_same_run(single_process(), on_mesh(mesh, world))


def test_context_parallel_with_replicated_data_parallel():
    assert_same_run(single_process(), on_mesh("cp=2,dp=2", 4, dp_mode="replicate"))
