"""The mesh's arithmetic, without processes: coordinates, groups, dp by default,
which axes cross nodes, and bad degrees on one line with the numbers."""
import itertools

import pytest

from cluster.mesh import AXES, Layout, crossing, nodes_from_per_node


@pytest.mark.parametrize("sizes", [dict(dp=2, pp=3, fsdp=2, sp=2), dict(dp=1, pp=1, fsdp=1, sp=1),
                                   dict(dp=4, pp=1, fsdp=1, sp=3), dict(dp=1, pp=5, fsdp=1, sp=1)])
def test_coordinates_are_row_major_with_sp_fastest(sizes):
    layout = Layout(**sizes)
    world = layout.world
    expected = list(itertools.product(*(range(sizes[a]) for a in AXES)))  # row-major, last axis fastest
    assert [tuple(layout.coords(r).values()) for r in range(world)] == expected
    assert [layout.rank_of(layout.coords(r)) for r in range(world)] == list(range(world))


def test_groups_partition_the_ranks_and_differ_only_along_their_axes():
    layout = Layout(dp=2, pp=2, fsdp=2, sp=1)
    assert layout.groups("fsdp") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # adjacent ranks: inside a node
    assert layout.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]  # the outermost axis strides furthest
    assert layout.groups("dp", "fsdp") == [[0, 1, 4, 5], [2, 3, 6, 7]]  # HSDP's data-parallel ranks
    assert layout.groups("sp") == [[r] for r in range(8)]
    for axes in [("dp",), ("pp", "sp"), AXES]:
        groups = layout.groups(*axes)
        assert sorted(r for g in groups for r in g) == list(range(8))
        for g in groups:
            others = {tuple(v for a, v in layout.coords(r).items() if a not in axes) for r in g}
            assert len(others) == 1 and len(g) == layout.world // len(groups)
    assert [layout.index(r, "dp", "fsdp") for r in [0, 1, 4, 5]] == [0, 1, 2, 3]


def test_dp_defaults_to_what_the_other_axes_leave():
    assert Layout.for_world(8, fsdp=2, pp=2) == Layout(dp=2, pp=2, fsdp=2)
    assert Layout.for_world(4) == Layout(dp=4)
    assert Layout.for_world(6, dp=3, sp=2).world == 6
    assert str(Layout.for_world(8, fsdp=2, pp=2)) == "dp=2 x pp=2 x fsdp=2"


@pytest.mark.parametrize("world,degrees,msg", [
    (6, dict(fsdp=4), r"^mesh: fsdp\(4\) = 4 must divide workers=6$"),
    (8, dict(dp=2, fsdp=2), r"^mesh: dp\(2\) \* fsdp\(2\) = 4 != workers=8$"),
    (4, dict(fsdp=0), r"^mesh.fsdp=0: must be an integer >= 1$"),
    (4, dict(tp=2), r"^mesh axis 'tp': unknown; axes are dp, pp, fsdp, sp$"),
])
def test_bad_degrees_are_one_line_with_the_numbers(world, degrees, msg):
    with pytest.raises(ValueError, match=msg):
        Layout.for_world(world, **degrees)


def test_inner_axes_stay_inside_a_node():
    layout = Layout(dp=2, fsdp=2)  # 2 nodes x 2 workers
    nodes = nodes_from_per_node(4, 2)
    assert nodes == (0, 0, 1, 1)
    assert not crossing(layout, nodes, "fsdp") and crossing(layout, nodes, "dp")
    assert crossing(layout, nodes_from_per_node(4, 1), "fsdp")  # one worker a node: everything crosses
