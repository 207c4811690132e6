"""Every bundled layout at world sizes 1, 2, 4, 8: coordinates and every group checked by collectives."""
import pytest
import torch

from megalysses.config import bundled, load_layout
from megalysses.parallel import AXES, LayoutError, ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.launch import run_ranks

WORLDS = (1, 2, 4, 8)


def _expected_members(rank: int, shape, axes) -> list[int]:
    """Ranks that share my coordinates on every axis outside `axes` (computed from a rank grid)."""
    grid = torch.arange(torch.Size(shape).numel()).view(shape)
    mine = (grid == rank).nonzero()[0].tolist()
    index = tuple(slice(None) if a in axes else mine[i] for i, a in enumerate(AXES))
    return sorted(grid[index].flatten().tolist())


def _check_mesh(rank, world, layout):
    mesh = ParallelMesh(layout)
    shape = mesh.shape
    grid = torch.arange(world).view(shape)
    assert grid[tuple(mesh.coords[a] for a in AXES)].item() == rank
    checked = []
    for axes in [(a,) for a in AXES] + list(ParallelMesh.COMBINED):
        group = mesh.group(*axes)
        expected = _expected_members(rank, shape, axes)
        assert list(group.ranks) == expected, (axes, group.ranks, expected)
        members = C.all_gather(torch.tensor([rank]), group).tolist()  # who actually answers in this group
        assert sorted(members) == expected, (axes, members, expected)
        total = C.all_reduce(torch.tensor([rank]), group).item()
        assert total == sum(expected)
        checked.append(axes)
    assert mesh.prev_stage == (None if mesh.is_first_stage else grid[(mesh.rank("pp") - 1,) + tuple(
        mesh.coords[a] for a in AXES[1:])].item())
    if not mesh.is_last_stage:  # a message reaches the next stage
        [h.wait() for h in C.post_p2p([(torch.tensor([rank]), mesh.next_stage)], [])[0]]
    if not mesh.is_first_stage:
        got = torch.tensor([-1])
        [h.wait() for h in C.post_p2p([], [(got, mesh.prev_stage)])[1]]
        assert got.item() == mesh.prev_stage
    return len(checked)


CASES = [(name, world) for name in bundled("layouts") for world in WORLDS]


@pytest.mark.parametrize("name,world", CASES, ids=[f"{n}-w{w}" for n, w in CASES])
def test_layout_file_on_world(name, world):
    layout = load_layout(name)
    try:
        layout.resolve(world)
    except LayoutError as err:  # the layout cannot use this world size: the error names the numbers
        assert str(world) in str(err)
        return
    assert run_ranks(_check_mesh, world, layout) == [len(AXES) + len(ParallelMesh.COMBINED)] * world


def _two_meshes(rank, world):
    a, b = ParallelMesh(ParallelLayout(tp=2)), ParallelMesh(ParallelLayout(sp=2))
    x = C.all_reduce(torch.tensor([1]), a.group("tp")).item()
    y = C.all_reduce(torch.tensor([1]), b.group("sp")).item()
    return a.size("tp"), b.size("sp"), b.size("tp"), x, y


def test_two_meshes_coexist():
    assert run_ranks(_two_meshes, 4) == [(2, 2, 1, 2, 2)] * 4


def test_single_device_mesh_needs_no_process_group():
    mesh = ParallelMesh.single_device()
    assert mesh.size("tp") == 1 and mesh.data_group().size == 1 and mesh.is_first_stage and mesh.is_last_stage
    with pytest.raises(KeyError, match="unknown mesh axes"):
        mesh.group("ep")


@pytest.mark.parametrize("kwargs,world,match", [
    (dict(tp=2, sp=2, dp=2), 4, r"tp \* sp \* pp \* dp = 2 \* 2 \* 1 \* 2 = 8 ranks, but the world has 4; set layout.dp=1"),
    (dict(tp=3), 4, r"world size 4 is not divisible by tp \* sp \* pp = 3 \* 1 \* 1 = 3"),
    (dict(tp=0), 1, r"layout.tp = 0: every parallel degree must be an integer >= 1"),
    (dict(vpp=2), 1, r"layout.vpp = 2 needs schedule 'interleaved-1f1b'"),
    (dict(schedule="zb"), 1, r"layout.schedule = 'zb': must be one of"),
    (dict(zero=2), 1, r"layout.zero = 2: must be 0"),
    (dict(tp_sequence_parallel=True), 1, r"sequence_parallel = true needs tp > 1"),
    (dict(pp=2, stage_layers=[1, 1, 1]), 2, r"stage_layers has 3 entries but pp \* vpp = 2 \* 1 = 2"),
])
def test_invalid_layouts(kwargs, world, match):
    with pytest.raises(LayoutError, match=match):
        ParallelLayout(**kwargs).resolve(world)


@pytest.mark.parametrize("kwargs,model,match", [
    (dict(pp=4), dict(heads=8, kv_heads=8, layers=6), r"6 layers do not split evenly into pp \* vpp = 4 \* 1 = 4 stages"),
    (dict(sp=2), dict(heads=8, kv_heads=8, layers=2, seq_len=31), r"sequence length 31 is not divisible by 2.*pad it to 32"),
    (dict(sp=4), dict(heads=8, kv_heads=3, layers=2), r"sp = 4 and the 3 kv heads per TP rank neither divide"),
    (dict(pp=2, stage_layers=[3, 2]), dict(heads=8, kv_heads=8, layers=6), r"sums to 5 but the model has 6 layers"),
])
def test_layout_against_model(kwargs, model, match):
    with pytest.raises(LayoutError, match=match):
        ParallelLayout(**kwargs).check_model(**model)
