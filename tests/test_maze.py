"""Tests for laser.data.maze: maze structure, shortest-path targets, splits, caching and rendering.

Every structural check uses its own search (a stack flood fill and a heap Dijkstra written here), never
the module's BFS.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laser.data import maze
from laser.data.maze import GOAL, PASSAGE, PATH, START, WALL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _neighbours(cell: tuple[int, int], size: int) -> list[tuple[int, int]]:
    r, c = cell
    steps = ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
    return [(a, b) for a, b in steps if 0 <= a < size and 0 <= b < size]


def _flood(grid: np.ndarray, start: tuple[int, int]) -> set[tuple[int, int]]:
    """Non-wall cells reachable from `start`, by an explicit-stack depth-first fill."""
    size = grid.shape[0]
    seen = {start}
    stack = [start]
    while stack:
        for nxt in _neighbours(stack.pop(), size):
            if grid[nxt] != WALL and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _dijkstra(grid: np.ndarray, source: tuple[int, int]) -> dict[tuple[int, int], int]:
    """Unit-weight Dijkstra distances from `source` over non-wall cells."""
    size = grid.shape[0]
    dist = {source: 0}
    heap = [(0, source)]
    while heap:
        d, cell = heapq.heappop(heap)
        if d > dist[cell]:
            continue
        for nxt in _neighbours(cell, size):
            if grid[nxt] != WALL and d + 1 < dist.get(nxt, 1 << 30):
                dist[nxt] = d + 1
                heapq.heappush(heap, (d + 1, nxt))
    return dist


def _only(grid: np.ndarray, token: int) -> tuple[int, int]:
    cells = np.argwhere(grid == token)
    assert len(cells) == 1, f"expected exactly one cell of token {token}, found {len(cells)}"
    return int(cells[0, 0]), int(cells[0, 1])


def _check_maze(inp: np.ndarray, tgt: np.ndarray, size: int, min_path: int = 0) -> int:
    """Assert every contract property of one (input, target) pair; returns its path length."""
    grid, target = inp.reshape(size, size), tgt.reshape(size, size)
    assert set(np.unique(grid)) <= {WALL, PASSAGE, START, GOAL}
    assert set(np.unique(target)) <= {WALL, PASSAGE, START, GOAL, PATH}
    # Target = input with some passages turned into PATH, nothing else.
    changed = grid != target
    assert np.all(grid[changed] == PASSAGE) and np.all(target[changed] == PATH)

    border = np.concatenate([grid[0], grid[-1], grid[:, 0], grid[:, -1]])
    assert np.all(border == WALL)
    # Spanning tree over the odd cells: all odd cells open, all even-even cells walls.
    assert np.all(grid[1::2, 1::2] != WALL)
    assert np.all(grid[::2, ::2] == WALL)

    start, goal = _only(grid, START), _only(grid, GOAL)
    open_cells = {tuple(int(x) for x in rc) for rc in np.argwhere(grid != WALL)}
    n_odd = ((size - 1) // 2) ** 2
    assert len(open_cells) == 2 * n_odd - 1
    assert _flood(grid, start) == open_cells
    # Connected with #edges == #cells - 1  <=>  a tree, so the shortest path is unique.
    edges = sum(1 for cell in open_cells for nxt in _neighbours(cell, size) if nxt in open_cells) // 2
    assert edges == len(open_cells) - 1

    from_start, from_goal = _dijkstra(grid, start), _dijkstra(grid, goal)
    length = from_start[goal]
    path = {tuple(int(x) for x in rc) for rc in np.argwhere(target == PATH)}
    assert len(path) == length - 1
    assert len(path) >= min_path
    assert all(from_start[c] + from_goal[c] == length for c in path)
    # The path cells form one chain S -> ... -> G: walk it step by step.
    chain = path | {goal}
    cell, walked = start, 0
    while cell != goal:
        nxt = [n for n in _neighbours(cell, size) if n in chain]
        assert len(nxt) == 1, f"path branches or breaks at {cell}"
        chain.discard(nxt[0])
        cell, walked = nxt[0], walked + 1
    assert walked == length and not chain
    return len(path)


def test_token_constants():
    assert (WALL, PASSAGE, START, GOAL, PATH) == (0, 1, 2, 3, 4)


def test_shapes_dtypes_and_structure():
    inputs, targets = maze.generate(60, size=11, seed=1)
    assert inputs.shape == targets.shape == (60, 121)
    assert inputs.dtype == targets.dtype == np.int64
    for inp, tgt in zip(inputs, targets, strict=True):
        _check_maze(inp, tgt, 11)
    # One START and one GOAL per row, and 49 open cells in every 11x11 perfect maze (25 odd cells + 24 links).
    assert np.all((inputs == START).sum(axis=1) == 1) and np.all((inputs == GOAL).sum(axis=1) == 1)
    assert np.all((inputs != WALL).sum(axis=1) == 49)


@settings(max_examples=25, deadline=None)
@given(
    size=st.sampled_from([5, 7, 9, 11, 13]),
    seed=st.integers(0, 2**32 - 1),
    min_path=st.integers(0, 5),
)
def test_generated_mazes_are_valid(size: int, seed: int, min_path: int):
    inputs, targets = maze.generate(4, size=size, seed=seed, min_path=min_path)
    assert inputs.shape == (4, size * size)
    for inp, tgt in zip(inputs, targets, strict=True):
        _check_maze(inp, tgt, size, min_path)


def test_solve_matches_generated_targets():
    inputs, targets = maze.generate(40, seed=5)
    for inp, tgt in zip(inputs, targets, strict=True):
        np.testing.assert_array_equal(maze.solve(inp, 11), tgt)
        # Solving a target (its PATH cells treated as passage) gives the target back.
        np.testing.assert_array_equal(maze.solve(tgt.reshape(11, 11), 11), tgt)


# Hand-built 5x5 perfect maze: odd cells linked (1,1)-(1,3)-(3,3)-(3,1); S at (1,1), G at (3,1).
TINY_INPUT = np.array(
    [
        [0, 0, 0, 0, 0],
        [0, 2, 1, 1, 0],
        [0, 0, 0, 1, 0],
        [0, 3, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]
)
TINY_TARGET = np.array(
    [
        [0, 0, 0, 0, 0],
        [0, 2, 4, 4, 0],
        [0, 0, 0, 4, 0],
        [0, 3, 4, 4, 0],
        [0, 0, 0, 0, 0],
    ]
)


def test_solve_hand_built():
    out = maze.solve(TINY_INPUT.reshape(-1), 5)
    assert out.shape == (25,) and out.dtype == np.int64
    np.testing.assert_array_equal(out, TINY_TARGET.reshape(-1))
    blocked = TINY_INPUT.copy()
    blocked[2, 3] = WALL
    with pytest.raises(ValueError, match="no path"):
        maze.solve(blocked, 5)
    with pytest.raises(ValueError, match="START"):
        maze.solve(np.where(TINY_INPUT == START, PASSAGE, TINY_INPUT), 5)


def test_determinism_and_seed_difference():
    a_in, a_tgt = maze.generate(30, seed=7)
    b_in, b_tgt = maze.generate(30, seed=7)
    np.testing.assert_array_equal(a_in, b_in)
    np.testing.assert_array_equal(a_tgt, b_tgt)
    c_in, _ = maze.generate(30, seed=8)
    # Different seeds: (nearly) every maze differs, not just a few.
    assert (a_in != c_in).any(axis=1).sum() >= 29
    # Mazes within one batch differ from each other too.
    assert len(np.unique(a_in, axis=0)) == 30


def test_min_path_honoured():
    _, free = maze.generate(300, seed=2)
    assert ((free == PATH).sum(axis=1) < 20).any()  # so the constraint below is not vacuous
    inputs, targets = maze.generate(300, seed=2, min_path=20)
    lengths = (targets == PATH).sum(axis=1)
    assert lengths.min() >= 20
    for inp, tgt in zip(inputs[:40], targets[:40], strict=True):
        assert _check_maze(inp, tgt, 11, min_path=20) >= 20
    # min_path=1 removes exactly the trivial (START next to GOAL) mazes.
    _, targets = maze.generate(300, seed=3, min_path=1)
    assert (targets == PATH).any(axis=1).all()


def test_min_path_bounds():
    # 11x11: 25 odd cells -> 49 open cells; a path through all of them has 47 PATH cells.
    assert maze.max_path_length(11) == 47
    assert maze.max_path_length(5) == 5
    with pytest.raises(ValueError, match="min_path"):
        maze.generate(2, size=11, min_path=48)
    with pytest.raises(ValueError, match="min_path"):
        maze.generate(2, min_path=-1)
    # 5x5 with min_path=5: every open cell on the path, the maze is one corridor.
    inputs, targets = maze.generate(5, size=5, seed=0, min_path=5)
    for inp, tgt in zip(inputs, targets, strict=True):
        assert _check_maze(inp, tgt, 5, min_path=5) == 5


def test_large_maze_with_min_path():
    inputs, targets = maze.generate(6, size=31, seed=4, min_path=150)
    assert inputs.shape == targets.shape == (6, 961)
    for inp, tgt in zip(inputs, targets, strict=True):
        assert _check_maze(inp, tgt, 31, min_path=150) >= 150


@pytest.mark.parametrize("size", [4, 10, 12, 3, 1, 0, -11, 11.0, True])
def test_size_validation(size):
    with pytest.raises(ValueError, match="size"):
        maze.generate(3, size=size)
    with pytest.raises(ValueError, match="size"):
        maze.load_split(size=size, count=10, val_count=2)


def test_argument_validation():
    with pytest.raises(ValueError, match="count"):
        maze.generate(0)
    with pytest.raises(ValueError, match="seed"):
        maze.generate(3, seed=-1)
    with pytest.raises(ValueError, match="val_count"):
        maze.load_split(count=10, val_count=10)
    with pytest.raises(ValueError, match="val_count"):
        maze.load_split(count=10, val_count=0)


def test_generation_speed():
    import time

    t0 = time.perf_counter()
    inputs, _ = maze.generate(10_000, size=11, seed=0)
    assert inputs.shape == (10_000, 121)
    assert time.perf_counter() - t0 < 5.0


def test_load_split_sizes_and_determinism():
    split = maze.load_split(count=120, val_count=20, seed=3)
    assert isinstance(split, maze.MazeSplit)
    assert split.train_inputs.shape == split.train_targets.shape == (100, 121)
    assert split.val_inputs.shape == split.val_targets.shape == (20, 121)
    assert (split.size, split.seed) == (11, 3)
    inputs, targets = maze.generate(120, seed=3)
    np.testing.assert_array_equal(np.concatenate([split.train_inputs, split.val_inputs]), inputs)
    np.testing.assert_array_equal(np.concatenate([split.train_targets, split.val_targets]), targets)
    again = maze.load_split(count=120, val_count=20, seed=3)
    np.testing.assert_array_equal(again.val_targets, split.val_targets)


def test_load_split_cache(tmp_path, monkeypatch):
    first = maze.load_split(size=7, count=50, val_count=10, seed=9, min_path=2, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    for part in ("size7", "count50", "val10", "seed9", "minpath2"):
        assert part in files[0].name

    def broken(*args, **kwargs):
        raise AssertionError("generate must not run when the cache is valid")

    original = maze.generate
    monkeypatch.setattr(maze, "generate", broken)
    cached = maze.load_split(size=7, count=50, val_count=10, seed=9, min_path=2, cache_dir=tmp_path)
    for name in ("train_inputs", "train_targets", "val_inputs", "val_targets"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(first, name))
    assert (cached.size, cached.seed) == (7, 9)
    # Any other parameter is another file, so it must generate.
    with pytest.raises(AssertionError, match="must not run"):
        maze.load_split(size=7, count=50, val_count=10, seed=9, min_path=3, cache_dir=tmp_path)

    # A corrupt cache is regenerated and rewritten.
    files[0].write_bytes(b"not an npz file")
    monkeypatch.setattr(maze, "generate", original)
    fresh = maze.load_split(size=7, count=50, val_count=10, seed=9, min_path=2, cache_dir=tmp_path)
    np.testing.assert_array_equal(fresh.train_targets, first.train_targets)
    assert files[0].read_bytes()[:2] == b"PK"  # a real (zip) .npz again
    assert len(list(tmp_path.iterdir())) == 1  # no temporary files left behind


def test_trivial_solve_rate_hand_built():
    near = TINY_INPUT.copy()
    near[3, 1], near[1, 2] = PASSAGE, GOAL  # G right next to S: nothing to mark
    inputs = np.stack([TINY_INPUT.reshape(-1), near.reshape(-1), near.reshape(-1), TINY_INPUT.reshape(-1)])
    targets = np.stack([TINY_TARGET.reshape(-1), near.reshape(-1), near.reshape(-1), TINY_TARGET.reshape(-1)])
    assert maze.trivial_solve_rate(inputs, targets) == 0.5
    assert maze.trivial_solve_rate(inputs[1:3], targets[1:3]) == 1.0
    assert maze.trivial_solve_rate(inputs[:1], targets[:1]) == 0.0
    with pytest.raises(ValueError):
        maze.trivial_solve_rate(inputs, targets[:2])


def test_trivial_solve_rate_on_generated_data():
    inputs, targets = maze.generate(500, seed=11)
    adjacent = 0
    for inp in inputs:
        grid = inp.reshape(11, 11)
        adjacent += _only(grid, GOAL) in _neighbours(_only(grid, START), 11)
    assert adjacent > 0
    assert maze.trivial_solve_rate(inputs, targets) == pytest.approx(adjacent / 500)


def test_render_ascii_exact():
    expected_input = "#####\n#S  #\n### #\n#G  #\n#####"
    expected_target = "#####\n#S**#\n###*#\n#G**#\n#####"
    assert maze.render_ascii(TINY_INPUT, 5) == expected_input
    assert maze.render_ascii(TINY_TARGET.reshape(-1), 5) == expected_target
    # A perfect prediction looks like the target, whether the reference given is the input or the target.
    assert maze.render_ascii(TINY_INPUT, 5, prediction=TINY_TARGET) == expected_target
    assert maze.render_ascii(TINY_TARGET, 5, prediction=TINY_TARGET) == expected_target
    # Wrong path on a wall -> 'x', missed path cell -> 'o', other wrong token -> '?'.
    pred = TINY_TARGET.copy()
    pred[2, 1] = PATH
    pred[2, 3] = PASSAGE
    pred[0, 0] = PASSAGE
    assert maze.render_ascii(TINY_INPUT, 5, prediction=pred) == "?####\n#S**#\n#x#o#\n#G**#\n#####"


def test_render_png(tmp_path):
    inputs, targets = maze.generate(2, seed=0)
    plain = tmp_path / "maze.png"
    maze.render_png(plain, targets[0], 11)
    assert plain.read_bytes()[:8] == PNG_MAGIC
    pred = targets[1].copy()
    pred[pred == PATH] = PASSAGE
    compared = tmp_path / "pred.png"
    maze.render_png(str(compared), inputs[1], 11, prediction=pred, title="all path cells missed")
    assert compared.read_bytes()[:8] == PNG_MAGIC
    assert compared.stat().st_size > 1000


def test_add_training_mazes_keeps_the_validation_split_and_drops_any_maze_equal_to_a_validation_one():
    split = maze.load_split(size=5, count=60, val_count=20, seed=1)  # 5x5: few distinct mazes, so repeats happen
    extended = maze.add_training_mazes(split, 200)
    np.testing.assert_array_equal(extended.val_inputs, split.val_inputs)
    np.testing.assert_array_equal(extended.val_targets, split.val_targets)
    np.testing.assert_array_equal(extended.train_inputs[:40], split.train_inputs)
    drawn_inputs, drawn_targets = maze.generate(200, size=5, seed=1 + 2**63)  # the extra stream, by hand
    held_out = {row.tobytes() for row in split.val_inputs}
    keep = np.array([row.tobytes() not in held_out for row in drawn_inputs])
    assert 0 < keep.sum() < 200  # some drawn mazes equal validation ones: dropped
    np.testing.assert_array_equal(extended.train_inputs[40:], drawn_inputs[keep])
    np.testing.assert_array_equal(extended.train_targets[40:], drawn_targets[keep])
    assert not {row.tobytes() for row in extended.train_inputs[40:]} & held_out
    assert maze.add_training_mazes(split, 0) is split
    with pytest.raises(ValueError, match="extra"):
        maze.add_training_mazes(split, -1)


def test_data_extra_train_grows_the_training_set_with_the_same_validation_mazes():
    import torch

    from laser.train import apply_overrides, train_preset
    from laser.train.tasks import get

    base = train_preset("tiny")
    plain = get("maze").load(base, torch.device("cpu"))
    more = get("maze").load(apply_overrides(base, ["data.extra_train=64"]), torch.device("cpu"))
    assert torch.equal(more.val_inputs, plain.val_inputs) and torch.equal(more.val_targets, plain.val_targets)
    assert len(plain.stream.inputs) < len(more.stream.inputs) <= len(plain.stream.inputs) + 64
    with pytest.raises(ValueError, match="data.extra_train=-1"):
        apply_overrides(base, ["data.extra_train=-1"])
