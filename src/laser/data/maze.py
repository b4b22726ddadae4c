"""Procedural maze pathfinding data (paper Table 6: 11x11 mazes, 10,000 samples, 9k train / 1k val).

A maze is a `size x size` grid flattened row-major into `size*size` tokens:

    WALL=0, PASSAGE=1, START=2, GOAL=3, PATH=4

Mazes are perfect: the open cells form a tree, carved by a randomized depth-first search (recursive
backtracker with an explicit stack) over the odd-coordinate cells of an odd-sized grid whose outer border
is all walls. Because the open cells form a tree, the shortest path between any two open cells is unique,
so the target of every input is well defined.

The input is the maze with START and GOAL marked; the target is the same grid with the cells of the shortest
path strictly between START and GOAL marked PATH. The *path length* used by `min_path` is the number of
PATH cells, i.e. (BFS distance from START to GOAL) - 1; a START adjacent to GOAL has path length 0.

Generation runs every maze of a batch in lockstep, so all numpy work is vectorised over the batch: a DFS
over n cells always takes exactly 2n-1 push/pop steps, which makes the lockstep exact.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

WALL = 0
PASSAGE = 1
START = 2
GOAL = 3
PATH = 4
VOCAB_SIZE = 5

# `min_path` sampling: cheap rejection rounds first, then exact sampling from all-pairs distances,
# computed for at most _PAIR_CHUNK (maze, cell, cell) entries at a time.
_REJECTION_ROUNDS = 3
_PAIR_CHUNK = 4_000_000
# Rounds of re-carved mazes before giving up on a `min_path` that is feasible but too rare.
_MAX_RECARVES = 1_000
_CACHE_VERSION = 1
# Extra training mazes (`add_training_mazes`) draw from generator seed `seed + _EXTRA_STREAM`: a stream no
# split's own seed reaches in practice.
_EXTRA_STREAM = 2**63

_ASCII = {WALL: "#", PASSAGE: " ", START: "S", GOAL: "G", PATH: "*"}


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 5 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 5 (e.g. 11 or 31), got size={size!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")


def max_path_length(size: int) -> int:
    """Largest possible path length (PATH cells) in a `size x size` perfect maze.

    A maze over n = ((size-1)/2)^2 odd cells has 2n-1 open cells; a path through all of them, minus its
    two endpoints, has 2n-3 PATH cells.
    """
    _check_size(size)
    n = ((size - 1) // 2) ** 2
    return 2 * n - 3


def _cell_tables(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometry of the odd-cell lattice of a `size x size` grid.

    Returns `(pos, nbr, wall)`: `pos` (n,) flat grid index of each cell; `nbr` (n, 4) index of the
    neighbouring cell up/down/left/right or -1 off the lattice; `wall` (n, 4) flat grid index of the wall
    cell between a cell and that neighbour.
    """
    m = (size - 1) // 2
    r, c = np.divmod(np.arange(m * m), m)  # (n,), (n,)
    pos = (2 * r + 1) * size + (2 * c + 1)
    dr = np.array([-1, 1, 0, 0])
    dc = np.array([0, 0, -1, 1])
    nr, nc = r[:, None] + dr, c[:, None] + dc  # (n, 4)
    inside = (nr >= 0) & (nr < m) & (nc >= 0) & (nc < m)
    nbr = np.where(inside, nr * m + nc, -1)
    wall = pos[:, None] + dr * size + dc
    return pos, nbr, wall


def _carve(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Carve `count` perfect mazes with a batched randomized DFS. Returns open cells, (count, size*size) bool."""
    pos, nbr, wall = _cell_tables(size)
    n = len(pos)
    rows = np.arange(count)
    open_ = np.zeros((count, size * size), dtype=bool)
    open_[:, pos] = True
    visited = np.zeros((count, n), dtype=bool)
    stack = np.zeros((count, n), dtype=np.int64)  # explicit DFS stack per maze
    first = rng.integers(0, n, size=count)
    stack[:, 0] = first
    visited[rows, first] = True
    depth = np.ones(count, dtype=np.int64)
    # Every maze needs exactly n-1 pushes and n pops, so the batch stays in lockstep and finishes together;
    # after the last push (all cells visited) only pops remain, which carve nothing.
    while not visited.all():
        top = stack[rows, depth - 1]  # (B,)
        cand = nbr[top]  # (B, 4)
        ok = (cand >= 0) & ~visited[rows[:, None], np.maximum(cand, 0)]
        # argmax of iid uniforms over the allowed directions = uniform choice among unvisited neighbours
        d = np.where(ok, rng.random((count, 4)), -1.0).argmax(axis=1)  # (B,)
        move = ok.any(axis=1)
        b, nxt = rows[move], cand[move, d[move]]
        open_[b, wall[top[move], d[move]]] = True
        visited[b, nxt] = True
        stack[b, depth[move]] = nxt
        depth += np.where(move, 1, -1)
    return open_


def _grow(frontier: np.ndarray, size: int) -> np.ndarray:
    """Cells 4-adjacent to `frontier` (B, size*size).

    Flat shifts by 1 would wrap a row's last column onto the next row's first, but both are border walls
    and a frontier only ever holds open (interior) cells, so no wrapped cell is ever produced.
    """
    grow = np.zeros_like(frontier)
    grow[:, 1:] |= frontier[:, :-1]
    grow[:, :-1] |= frontier[:, 1:]
    grow[:, size:] |= frontier[:, :-size]
    grow[:, :-size] |= frontier[:, size:]
    return grow


def _bfs_distances(open_: np.ndarray, size: int, source: np.ndarray) -> np.ndarray:
    """Breadth-first distances from `source` (B,) over open cells (B, size*size); -1 where unreachable."""
    rows = np.arange(len(source))
    dist = np.full(open_.shape, -1, dtype=np.int64)
    dist[rows, source] = 0
    frontier = np.zeros_like(open_)
    frontier[rows, source] = True
    seen = frontier.copy()
    step = 0
    while frontier.any():
        step += 1
        frontier = _grow(frontier, size) & open_ & ~seen
        seen |= frontier
        dist[frontier] = step
    return dist


def _reaches(open_: np.ndarray, size: int, source: np.ndarray, target: np.ndarray, steps: int) -> np.ndarray:
    """Whether BFS from `source` (B,) reaches `target` (B,) within `steps` moves. Returns (B,) bool."""
    rows = np.arange(len(source))
    seen = np.zeros_like(open_)
    seen[rows, source] = True
    frontier = seen.copy()
    for _ in range(steps):
        frontier = _grow(frontier, size) & open_ & ~seen
        seen |= frontier
        if not frontier.any():
            break
    return seen[rows, target]


def _tree_distances(open_: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs distances between the open cells of perfect mazes.

    Returns `(cells, dist)`: `cells` (B, N) flat grid index of each open cell, `dist` (B, N, N). Roots each
    tree at its first open cell; with `anc[v, u] = 1` when u is an ancestor of v (or v itself),
    (anc @ anc.T)[s, g] counts the common ancestors of s and g, which is depth(lca(s, g)) + 1, and
    dist(s, g) = depth(s) + depth(g) - 2 depth(lca).
    """
    count = len(open_)
    rows = np.arange(count)
    cells = np.nonzero(open_)[1].reshape(count, -1)  # (B, N)
    n = cells.shape[1]
    depth_grid = _bfs_distances(open_, size, cells[:, 0])  # (B, L)
    depth = np.take_along_axis(depth_grid, cells, axis=1)  # (B, N)
    compact = np.zeros(open_.shape, dtype=np.int64)
    compact[rows[:, None], cells] = np.arange(n)
    nbrs = cells[:, :, None] + np.array([-size, size, -1, 1])  # (B, N, 4), interior cells never leave the grid
    nbr_depth = np.take_along_axis(depth_grid, nbrs.reshape(count, -1), axis=1).reshape(count, n, 4)
    # The parent is the one open neighbour a step closer to the root (walls have depth -1; the root,
    # whose depth-1 is also -1, gets an arbitrary parent that is never read).
    k = (nbr_depth == depth[:, :, None] - 1).argmax(axis=2)  # (B, N)
    parent = compact[rows[:, None], np.take_along_axis(nbrs, k[:, :, None], axis=2)[:, :, 0]]  # (B, N)
    anc = np.zeros((count, n, n), dtype=np.float32)
    anc[:, np.arange(n), np.arange(n)] = 1.0
    for level in range(1, int(depth.max()) + 1):
        b, v = np.nonzero(depth == level)
        anc[b, v] += anc[b, parent[b, v]]
    common = anc @ anc.transpose(0, 2, 1)  # (B, N, N), exact small integers in float32
    dist = depth[:, :, None] + depth[:, None, :] - 2 * (common.astype(np.int64) - 1)
    return cells, dist


def _draw_endpoints(rng: np.random.Generator, open_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick distinct start and goal cells uniformly among the open cells of each maze. Returns (B,), (B,)."""
    count = len(open_)
    # A perfect maze on n odd cells always has 2n-1 open cells, so the open indices form a dense matrix.
    cells = np.nonzero(open_)[1].reshape(count, -1)  # (B, 2n-1)
    k = cells.shape[1]
    i = rng.integers(0, k, size=count)
    j = rng.integers(0, k - 1, size=count)
    j += j >= i  # skip i so that j is uniform over the other cells
    rows = np.arange(count)
    return cells[rows, i], cells[rows, j]


def _longest_path(open_: np.ndarray, size: int) -> np.ndarray:
    """Longest path (in PATH cells) of each perfect maze (B, size*size): tree diameter minus one. Returns (B,).

    The cell farthest from any cell of a tree is an end of a longest path, so two BFS passes suffice.
    """
    first = open_.argmax(axis=1)
    far = _bfs_distances(open_, size, first).argmax(axis=1)
    return _bfs_distances(open_, size, far).max(axis=1) - 1


def _draw_long_endpoints(
    rng: np.random.Generator, open_: np.ndarray, size: int, min_path: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw (start, goal) uniformly among the pairs with at least `min_path` PATH cells between them.

    Every maze must hold at least one such pair. Returns `(start, goal)`, each (B,).
    """
    cells, dist = _tree_distances(open_, size)  # (B, N), (B, N, N)
    count, n = cells.shape
    valid = (dist - 1 >= min_path).reshape(count, -1)  # (B, N*N) ordered pairs
    cum = valid.cumsum(axis=1)
    pick = np.floor(rng.random(count) * cum[:, -1]).astype(np.int64)  # rank of the chosen valid pair
    s, g = np.divmod((cum <= pick[:, None]).sum(axis=1), n)
    rows = np.arange(count)
    return cells[rows, s], cells[rows, g]


def _place_endpoints(
    rng: np.random.Generator, open_: np.ndarray, size: int, min_path: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw start/goal pairs with at least `min_path` PATH cells. Returns `(open_, start, goal)`.

    Pairs are uniform among the valid pairs of their maze; mazes whose longest path is below `min_path`
    are carved again, so `open_` (B, size*size) may come back with some mazes replaced.
    """
    open_ = open_.copy()
    start, goal = _draw_endpoints(rng, open_)
    # path length < min_path  <=>  GOAL is within min_path moves of START
    bad = np.nonzero(_reaches(open_, size, start, goal, min_path))[0]
    for _ in range(_REJECTION_ROUNDS):
        if not len(bad):
            return open_, start, goal
        start[bad], goal[bad] = _draw_endpoints(rng, open_[bad])
        bad = bad[_reaches(open_[bad], size, start[bad], goal[bad], min_path)]
    if not len(bad):
        return open_, start, goal
    # Rejection sampling is memoryless, so the mazes still rejected can draw directly from their valid
    # pairs instead, with the same (uniform) distribution and far less work when valid pairs are rare.
    for _ in range(_MAX_RECARVES):
        short = bad[_longest_path(open_[bad], size) < min_path]
        if not len(short):
            break
        open_[short] = _carve(rng, len(short), size)
    else:
        raise ValueError(
            f"min_path={min_path} is too rare for size={size}: some mazes still had no long enough path "
            f"after {_MAX_RECARVES} re-carvings; use a smaller min_path"
        )
    n_open = int(open_[0].sum())
    for chunk in np.array_split(bad, -(-len(bad) * n_open**2 // _PAIR_CHUNK)):
        start[chunk], goal[chunk] = _draw_long_endpoints(rng, open_[chunk], size, min_path)
    return open_, start, goal


def generate(count: int, size: int = 11, seed: int = 0, min_path: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate `count` mazes with their shortest-path solutions.

    Returns `(inputs, targets)`, int64 arrays of shape (count, size*size) with tokens WALL/PASSAGE/START/GOAL
    (inputs) plus PATH (targets). `min_path` is the minimum number of PATH cells: start/goal pairs with a
    shorter path are rejected and redrawn, which keeps them uniform among the valid pairs of their maze; a
    maze that cannot hold such a path is carved again. A `min_path` close to `max_path_length(size)` is
    slow (seconds to minutes), since few mazes have such a long path. Deterministic for a given
    (count, size, seed, min_path); maze i depends on `count` too, since the whole batch draws from one
    generator.
    """
    _check_size(size)
    _check_count("count", count, 1)
    _check_count("seed", seed, 0)
    _check_count("min_path", min_path, 0)
    if min_path > max_path_length(size):
        raise ValueError(
            f"min_path={min_path} is impossible for size={size}: a path has at most "
            f"{max_path_length(size)} PATH cells; use a smaller min_path or a larger size"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    rows = np.arange(count)
    open_, start, goal = _place_endpoints(rng, _carve(rng, count, size), size, min_path)
    inputs = np.where(open_, PASSAGE, WALL).astype(np.int64)
    inputs[rows, start] = START
    inputs[rows, goal] = GOAL
    # In a tree, a cell lies on the (unique) start-goal path iff its distances to both ends add up to
    # the start-goal distance.
    dist_start = _bfs_distances(open_, size, start)
    dist_goal = _bfs_distances(open_, size, goal)
    length = dist_start[rows, goal]
    on_path = open_ & (dist_start + dist_goal == length[:, None]) & (inputs == PASSAGE)
    targets = np.where(on_path, PATH, inputs)
    return inputs, targets


def solve(grid: np.ndarray, size: int) -> np.ndarray:
    """Target grid for one input grid: BFS shortest path from START to GOAL marked PATH.

    `grid` is (size*size,) or (size, size) and must hold exactly one START and one GOAL; every non-WALL
    cell is walkable and PATH cells already present are cleared first. Returns a flat int64 (size*size,)
    grid. Raises ValueError if GOAL is unreachable. With several shortest paths (not a perfect maze) the
    first found in up/down/left/right order is returned.
    """
    _check_size(size)
    flat = np.asarray(grid).reshape(-1).astype(np.int64)
    if flat.size != size * size:
        raise ValueError(f"grid has {flat.size} cells, expected size*size={size * size} for size={size}")
    starts, goals = np.flatnonzero(flat == START), np.flatnonzero(flat == GOAL)
    if len(starts) != 1 or len(goals) != 1:
        raise ValueError(f"grid needs exactly one START and one GOAL, found {len(starts)} and {len(goals)}")
    start, goal = int(starts[0]), int(goals[0])
    out = np.where(flat == PATH, PASSAGE, flat)
    parent = {start: start}
    queue = deque([start])
    while queue and goal not in parent:
        cell = queue.popleft()
        r, c = divmod(cell, size)
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            nxt = nr * size + nc
            if 0 <= nr < size and 0 <= nc < size and out[nxt] != WALL and nxt not in parent:
                parent[nxt] = cell
                queue.append(nxt)
    if goal not in parent:
        raise ValueError("no path from START to GOAL in grid")
    cell = parent[goal]
    while cell != start:
        out[cell] = PATH
        cell = parent[cell]
    return out


def trivial_solve_rate(inputs: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of mazes solved by copying the input: target == input, i.e. no PATH cell (START next to GOAL).

    This is the exact-match solve rate of a model that outputs its input unchanged.
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.shape != targets.shape or inputs.ndim != 2 or len(inputs) == 0:
        raise ValueError(
            f"inputs and targets must both be (count>0, size*size), got {inputs.shape} and {targets.shape}"
        )
    return float((inputs == targets).all(axis=1).mean())


def _reference_and_marks(
    grid: np.ndarray, size: int, prediction: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat reference grid and, with a prediction, per-cell marks: 0 match, 1 correct path, 2 missed path,
    3 wrong path, 4 other wrong token."""
    _check_size(size)
    flat = np.asarray(grid).reshape(-1).astype(np.int64)
    if flat.size != size * size:
        raise ValueError(f"grid has {flat.size} cells, expected size*size={size * size} for size={size}")
    if prediction is None:
        return flat, None
    pred = np.asarray(prediction).reshape(-1).astype(np.int64)
    if pred.size != size * size:
        raise ValueError(f"prediction has {pred.size} cells, expected size*size={size * size}")
    # Solving the grid works whether it is the input or the target, so callers may pass either.
    ref = solve(flat, size)
    ref_path, pred_path = ref == PATH, pred == PATH
    marks = np.zeros(size * size, dtype=np.int64)
    marks[ref_path & pred_path] = 1
    marks[ref_path & ~pred_path] = 2
    marks[~ref_path & pred_path] = 3
    marks[~ref_path & ~pred_path & (pred != ref)] = 4
    return ref, marks


def render_ascii(grid: np.ndarray, size: int, prediction: np.ndarray | None = None) -> str:
    """ASCII picture of a maze, one line per row (no trailing newline).

    Legend: '#' wall, ' ' passage, 'S' start, 'G' goal, '*' path. Without `prediction` the tokens of
    `grid` are drawn as is. With `prediction` (a predicted target grid), `grid` may be the input or the
    target: the reference solution is recomputed by BFS and the prediction is compared to it cell by cell:
    '*' correctly predicted path cell, 'o' path cell the prediction missed, 'x' predicted path cell that is
    not on the path, '?' any other wrong token (e.g. a wall predicted as passage); correct cells are drawn
    with the reference token.
    """
    ref, marks = _reference_and_marks(grid, size, prediction)
    chars = np.array([_ASCII.get(int(t), "?") for t in ref])
    if marks is not None:
        chars = np.where(marks == 0, chars, np.array(["", "*", "o", "x", "?"])[marks])
    return "\n".join("".join(chars[r * size : (r + 1) * size]) for r in range(size))


# RGB colours for render_png: tokens, then the prediction marks 2 (missed), 3 (wrong path), 4 (other wrong).
_TOKEN_RGB = {
    WALL: (0.15, 0.15, 0.2),
    PASSAGE: (1.0, 1.0, 1.0),
    START: (0.1, 0.7, 0.2),
    GOAL: (0.85, 0.1, 0.1),
    PATH: (0.2, 0.45, 0.95),
}
_MARK_RGB = {2: (1.0, 0.7, 0.2), 3: (0.95, 0.2, 0.85), 4: (1.0, 0.95, 0.1)}
_LEGEND = {
    "wall": _TOKEN_RGB[WALL],
    "passage": _TOKEN_RGB[PASSAGE],
    "start": _TOKEN_RGB[START],
    "goal": _TOKEN_RGB[GOAL],
    "path": _TOKEN_RGB[PATH],
}
_MARK_LEGEND = {"missed path": _MARK_RGB[2], "wrong path": _MARK_RGB[3], "wrong token": _MARK_RGB[4]}


def render_png(
    path: str | Path,
    grid: np.ndarray,
    size: int,
    prediction: np.ndarray | None = None,
    title: str | None = None,
) -> None:
    """Save a PNG picture of a maze and its path (or of a prediction against the BFS solution).

    Colours follow `render_ascii`: walls dark, passages white, start green, goal red, path blue; with a
    `prediction`, missed path cells are orange, wrongly predicted path cells magenta and other wrong tokens
    yellow. Uses matplotlib's Agg canvas directly, so no global backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ref, marks = _reference_and_marks(grid, size, prediction)
    image = np.array([_TOKEN_RGB.get(int(t), (0.5, 0.5, 0.5)) for t in ref])  # (L, 3)
    legend = dict(_LEGEND)
    if marks is not None:
        for mark, rgb in _MARK_RGB.items():
            image[marks == mark] = rgb
        legend.update(_MARK_LEGEND)
    fig = Figure(figsize=(4.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(image.reshape(size, size, 3), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    handles = [Patch(facecolor=rgb, edgecolor="black", label=name) for name, rgb in legend.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.savefig(path, format="png", bbox_inches="tight")


@dataclass
class MazeSplit:
    """Train/validation maze data: int64 (N, size*size) input and target arrays."""

    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    size: int
    seed: int


def _cache_path(cache_dir: str | Path, size: int, count: int, val_count: int, seed: int, min_path: int) -> Path:
    name = f"maze_v{_CACHE_VERSION}_size{size}_count{count}_val{val_count}_seed{seed}_minpath{min_path}.npz"
    return Path(cache_dir) / name


def _read_cache(path: Path, size: int, count: int, val_count: int, seed: int) -> MazeSplit | None:
    """Cached split, or None when the file is missing, unreadable or does not have the expected shapes."""
    keys = ("train_inputs", "train_targets", "val_inputs", "val_targets")
    n_train = count - val_count
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in keys}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    for key, arr in arrays.items():
        rows = val_count if key.startswith("val") else n_train
        if arr.shape != (rows, size * size) or arr.dtype != np.int64:
            return None
    return MazeSplit(**arrays, size=size, seed=seed)


def add_training_mazes(split: MazeSplit, extra: int, min_path: int = 0) -> MazeSplit:
    """``split`` with ``extra`` more training mazes, drawn from their own seeded stream (generator seed
    ``split.seed + 2**63``), so the validation split stays exactly the one ``load_split`` made. A drawn maze
    whose input equals a validation maze's is dropped (no leak), so a few fewer than ``extra`` may be added.
    """
    _check_count("extra", extra, 0)
    if extra == 0:
        return split
    inputs, targets = generate(extra, size=split.size, seed=split.seed + _EXTRA_STREAM, min_path=min_path)
    held_out = {row.tobytes() for row in split.val_inputs}
    keep = np.array([row.tobytes() not in held_out for row in inputs], dtype=bool)
    return replace(split, train_inputs=np.concatenate([split.train_inputs, inputs[keep]]),
                   train_targets=np.concatenate([split.train_targets, targets[keep]]))


def load_split(
    size: int = 11,
    count: int = 10_000,
    val_count: int = 1_000,
    seed: int = 0,
    min_path: int = 0,
    cache_dir: str | Path | None = None,
) -> MazeSplit:
    """The paper's split: `count` mazes from `generate`, the last `val_count` for validation.

    With `cache_dir`, the split is stored as an .npz whose name encodes every parameter and read back on
    later calls; a corrupt or mismatched cache file is regenerated and overwritten.
    """
    _check_size(size)
    _check_count("count", count, 2)
    _check_count("val_count", val_count, 1)
    if val_count >= count:
        raise ValueError(f"val_count must be < count, got val_count={val_count}, count={count}")
    path = None
    if cache_dir is not None:
        path = _cache_path(cache_dir, size, count, val_count, seed, min_path)
        cached = _read_cache(path, size, count, val_count, seed)
        if cached is not None:
            return cached
    inputs, targets = generate(count, size=size, seed=seed, min_path=min_path)
    n_train = count - val_count
    split = MazeSplit(
        train_inputs=inputs[:n_train],
        train_targets=targets[:n_train],
        val_inputs=inputs[n_train:],
        val_targets=targets[n_train:],
        size=size,
        seed=seed,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file first so a crash never leaves a truncated cache behind.
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    train_inputs=split.train_inputs,
                    train_targets=split.train_targets,
                    val_inputs=split.val_inputs,
                    val_targets=split.val_targets,
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return split
