"""Mesh parsing, validation and the rank layout of the 5-D mesh."""

import pytest
from rank_harness import run_on_ranks

from core.mesh import MeshConfigError, MeshShape, build_mesh


def test_parse_fills_missing_dims_with_one():
    assert MeshShape.parse("dp=2,tp=4,pp=2") == MeshShape(dp=2, pp=2, tp=4)
    assert MeshShape.parse("") == MeshShape()
    assert MeshShape.parse("dp=auto,tp=2").resolve(8) == MeshShape(dp=4, tp=2)
    assert MeshShape.parse("dp=-1").resolve(3) == MeshShape(dp=3)


@pytest.mark.parametrize("text, message", [
    ("dp=2,xp=2", "unknown mesh dimension 'xp'"),
    ("tp=0", "must be >= 1"),
    ("tp=two", "not an integer"),
    ("tp", "has no '='"),
    ("tp=2,tp=2", "given twice"),
    ("tp=-1", "only dp may be"),
])
def test_parse_rejects_bad_text(text, message):
    with pytest.raises(MeshConfigError, match=message):
        MeshShape.parse(text)


def test_sizes_must_multiply_to_world_size():
    with pytest.raises(MeshConfigError, match="has 8 ranks but the world size is 4"):
        MeshShape.parse("dp=2,tp=4").resolve(4)
    with pytest.raises(MeshConfigError, match="not divisible by pp\\*cp\\*tp\\*ep = 3"):
        MeshShape.parse("dp=-1,tp=3").resolve(4)


def _coordinates(text):
    pm = build_mesh(MeshShape.parse(text), "cpu")
    names = ("pp", "dp", "ep", "cp", "tp", "batch", "dense_grad", "expert_grad")
    return {n: (pm.local_rank(n), pm.size(n)) for n in names}


def test_tp_is_innermost_and_pp_outermost():
    coords = run_on_ranks(_coordinates, 8, "dp=2,tp=2,pp=2")
    for rank, c in enumerate(coords):
        assert c["tp"] == (rank % 2, 2)
        assert c["dp"] == ((rank // 2) % 2, 2)
        assert c["pp"] == (rank // 4, 2)
        assert c["dense_grad"] == (c["dp"][0], 2)
    coords = run_on_ranks(_coordinates, 8, "dp=2,cp=2,ep=2")
    for rank, c in enumerate(coords):
        assert c["cp"][0] == rank % 2 and c["ep"][0] == (rank // 2) % 2 and c["dp"][0] == rank // 4
        assert c["batch"] == (c["dp"][0] * 2 + c["ep"][0], 4)
        assert c["dense_grad"] == ((c["dp"][0] * 2 + c["ep"][0]) * 2 + c["cp"][0], 8)
        assert c["expert_grad"] == (c["dp"][0] * 2 + c["cp"][0], 4)
