"""ops/components.py against plain BFS (random graphs and the worst cases for propagation), ops/compaction.py
against boolean indexing, and both through ONNX Runtime and the TensorRT target lint."""

import io
import math
import random
import warnings

import numpy as np
import onnx
import pytest
import torch

from staticprune.export.lint import lint_model
from staticprune.ops.compaction import compact, compaction_index
from staticprune.ops.components import closure_squarings, grid_components, merge_schedule
from staticprune.verify.parity import run_onnxruntime

# ---------------------------------------------------------------------------------------------- oracles


def bfs_labels(right: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Min-index component label of every cell of one (H, W) grid, by breadth-first search."""
    h, w = right.shape
    labels = [-1] * (h * w)
    for start in range(h * w):
        if labels[start] >= 0:
            continue
        labels[start] = start
        queue = [start]
        while queue:
            u = queue.pop()
            r, c = divmod(u, w)
            steps = []
            if c + 1 < w and right[r, c]:
                steps.append(u + 1)
            if c > 0 and right[r, c - 1]:
                steps.append(u - 1)
            if r + 1 < h and down[r, c]:
                steps.append(u + w)
            if r > 0 and down[r - 1, c]:
                steps.append(u - w)
            for v in steps:
                if labels[v] < 0:
                    labels[v] = start
                    queue.append(v)
    return torch.tensor(labels)


def edges_along(path: list[tuple[int, int]], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge masks that join consecutive cells of a path (and nothing else)."""
    right = torch.zeros(h, w, dtype=torch.bool)
    down = torch.zeros(h, w, dtype=torch.bool)
    for (r0, c0), (r1, c1) in zip(path, path[1:], strict=False):
        assert abs(r0 - r1) + abs(c0 - c1) == 1
        if r0 == r1:
            right[r0, min(c0, c1)] = True
        else:
            down[min(r0, r1), c0] = True
    return right, down


def snake(h: int, w: int) -> list[tuple[int, int]]:
    """Boustrophedon Hamiltonian path: diameter N - 1, the worst case of plain label propagation."""
    return [(r, c if r % 2 == 0 else w - 1 - c) for r in range(h) for c in range(w)]


def column_snake(h: int, w: int) -> list[tuple[int, int]]:
    return [(r if c % 2 == 0 else h - 1 - r, c) for c in range(w) for r in range(h)]


def spiral(h: int, w: int) -> list[tuple[int, int]]:
    """Inward spiral over every cell; its min label (cell 0) sits at the outer end."""
    top, bottom, left, right = 0, h - 1, 0, w - 1
    path = []
    while top <= bottom and left <= right:
        path += [(top, c) for c in range(left, right + 1)]
        path += [(r, right) for r in range(top + 1, bottom + 1)]
        if top < bottom:
            path += [(bottom, c) for c in range(right - 1, left - 1, -1)]
        if left < right:
            path += [(r, left) for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return path


def staircase_comb(h: int, w: int) -> list[tuple[int, int]]:
    """A path that turns at every step (right, down, right, down, ...), so no row or column scan shortcuts it."""
    path, r, c = [(0, 0)], 0, 0
    while r + 1 < h or c + 1 < w:
        if c + 1 < w and (len(path) % 2 == 1 or r + 1 >= h):
            c += 1
        else:
            r += 1
        path.append((r, c))
    return path


def random_spanning_tree(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth-first maze over the whole grid: long winding paths with many branches."""
    rng = random.Random(seed)
    right = torch.zeros(h, w, dtype=torch.bool)
    down = torch.zeros(h, w, dtype=torch.bool)
    seen, stack = {(h // 2, w // 2)}, [(h // 2, w // 2)]
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))
                   if 0 <= r + dr < h and 0 <= c + dc < w and (r + dr, c + dc) not in seen]
        if not options:
            stack.pop()
            continue
        nr, nc = rng.choice(options)
        if nr == r:
            right[r, min(c, nc)] = True
        else:
            down[min(r, nr), c] = True
        seen.add((nr, nc))
        stack.append((nr, nc))
    return right, down


def component_min(labels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.stack([values[labels == labels[i]].min() for i in range(labels.numel())])


def check_against_bfs(right: torch.Tensor, down: torch.Tensor, values: torch.Tensor | None = None) -> None:
    labels, vmin = grid_components(right, down, values)
    assert labels.dtype == torch.int64 and labels.shape == (right.shape[0], right.shape[1] * right.shape[2])
    for b in range(right.shape[0]):
        expected = bfs_labels(right[b], down[b])
        assert torch.equal(labels[b], expected), f"image {b}: labels differ from BFS"
        if values is not None:
            assert torch.equal(vmin[b], component_min(expected, values[b].reshape(-1)))


# ---------------------------------------------------------------------------------------------- components

SIZES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (5, 3), (7, 7), (8, 8), (13, 6), (16, 16), (17, 31), (32, 32)]


@pytest.mark.parametrize("size", SIZES)
def test_random_graphs_match_bfs(size):
    g = torch.Generator().manual_seed(size[0] * 100 + size[1])
    for density in (0.15, 0.45, 0.6, 0.9):
        right = torch.rand(3, *size, generator=g) < density
        down = torch.rand(3, *size, generator=g) < density
        values = torch.rand(3, *size, generator=g)
        check_against_bfs(right, down, values)


@pytest.mark.parametrize("shape", [(8, 8), (9, 14), (31, 17), (64, 64)])
@pytest.mark.parametrize("path", ["snake", "column_snake", "spiral", "staircase", "reversed_spiral"])
def test_worst_case_paths_are_one_component(shape, path):
    """Hamiltonian snakes and spirals have diameter N - 1; min-label propagation would need N - 1 rounds."""
    h, w = shape
    cells = {"snake": snake, "column_snake": column_snake, "spiral": spiral, "staircase": staircase_comb,
             "reversed_spiral": lambda a, b: spiral(a, b)[::-1]}[path](h, w)
    right, down = edges_along(cells, h, w)
    values = torch.arange(h * w, dtype=torch.float32).flip(0).reshape(1, h, w)
    labels, vmin = grid_components(right[None], down[None], values)
    member = torch.zeros(h * w, dtype=torch.bool)
    member[[r * w + c for r, c in cells]] = True
    on_path = labels[0][member]
    assert torch.equal(on_path, torch.full_like(on_path, min(r * w + c for r, c in cells)))
    assert torch.equal(labels[0], bfs_labels(right, down))
    assert float(vmin[0][member].max()) == float(values.reshape(-1)[member].min())


@pytest.mark.parametrize("shape", [(12, 12), (64, 64), (20, 48)])
def test_mazes_and_cut_mazes_match_bfs(shape):
    right, down = random_spanning_tree(*shape, seed=shape[0])
    g = torch.Generator().manual_seed(1)
    cut_r = right & (torch.rand(shape, generator=g) > 0.02)  # a few cuts split the maze into long pieces
    cut_d = down & (torch.rand(shape, generator=g) > 0.02)
    check_against_bfs(torch.stack([right, cut_r]), torch.stack([down, cut_d]))


def test_edges_beyond_the_grid_border_are_ignored():
    right = torch.ones(1, 3, 4, dtype=torch.bool)
    down = torch.zeros(1, 3, 4, dtype=torch.bool)
    labels, _ = grid_components(right, down)
    assert labels.tolist() == [[0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8]]  # no wrap-around from column 3 to 0


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (32, 32), (48, 48), (64, 64), (64, 128), (30, 40)])
def test_step_count_is_fixed_by_the_shape(h, w):
    steps = merge_schedule(h, w)
    assert len(steps) == math.ceil(math.log2(h)) + math.ceil(math.log2(w))
    for axis, bh, bw in steps:  # every boundary closure covers the longest simple path of its graph
        side = bh if axis == "w" else bw
        assert 2 ** closure_squarings(2 * side) >= 2 * side - 1


class _Components(torch.nn.Module):
    def forward(self, scores: torch.Tensor):
        labels, vmin = grid_components(scores[:, 0] > 0.35, scores[:, 1] > 0.35, scores[:, 2])
        return labels.to(torch.int32), vmin


def _export(module: torch.nn.Module, example: tuple, names: list[str]) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=17,
                          input_names=[f"in{i}" for i in range(len(example))], output_names=names)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("shape", [(5, 7), (64, 64)])
def test_components_run_identically_in_onnxruntime_and_lint_clean(shape):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 3, *shape, generator=g)
    proto = _export(_Components(), (scores,), ["labels", "vmin"])
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Loop", "If", "Scan", "NonZero", "TopK", "ScatterElements", "ScatterND"}
    assert len(proto.graph.node) < 1500  # unrolled steps stay small at a 1024x1024 input's 64x64 grid
    for target in ("orin-jp6", "orin-jp60"):
        report = lint_model(proto, target)
        assert report.ok, report.format()
    for seed in range(3):
        x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(seed))
        got = run_onnxruntime(proto, {"in0": x.numpy()})
        labels, vmin = _Components()(x)
        assert np.array_equal(got["labels"], labels.numpy())
        assert np.array_equal(got["vmin"], vmin.numpy())


# ---------------------------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("capacity", [1, 5, 12, 40])
def test_compaction_matches_boolean_indexing(capacity):
    g = torch.Generator().manual_seed(capacity)
    for density in (0.0, 0.2, 0.5, 1.0):
        keep = torch.rand(4, 40, generator=g) < density
        values = torch.randn(4, 40, 3, generator=g)
        out, comp = compact(values, keep, capacity, fill=-7.0)
        assert out.shape == (4, capacity, 3)
        for b in range(4):
            kept_idx = keep[b].nonzero().flatten()
            fit = kept_idx[:capacity]
            n = len(fit)
            assert comp.count[b] == len(kept_idx)
            assert int(comp.overflow[b]) == max(len(kept_idx) - capacity, 0)
            assert torch.equal(comp.source[b, :n], fit)
            assert torch.equal(comp.source[b, n:], torch.zeros(capacity - n, dtype=torch.int64))
            assert comp.valid[b].tolist() == [True] * n + [False] * (capacity - n)
            assert torch.equal(out[b, :n], values[b, fit])
            assert bool((out[b, n:] == -7.0).all())
            expected_slot = torch.full((40,), -1, dtype=torch.int64)
            expected_slot[fit] = torch.arange(n)
            assert torch.equal(comp.slot[b], expected_slot)


def test_compaction_refuses_zero_capacity():
    with pytest.raises(ValueError, match="capacity"):
        compaction_index(torch.ones(1, 3, dtype=torch.bool), 0)


class _Compact(torch.nn.Module):
    def forward(self, scores: torch.Tensor, values: torch.Tensor):
        out, comp = compact(values, scores > 0.5, 24)
        return out, comp.slot.to(torch.int32), comp.overflow


def test_compaction_runs_identically_in_onnxruntime_and_lint_clean():
    g = torch.Generator().manual_seed(0)
    scores, values = torch.rand(2, 64, generator=g), torch.randn(2, 64, 8, generator=g)
    proto = _export(_Compact(), (scores, values), ["out", "slot", "overflow"])
    scatters = [n for n in proto.graph.node if n.op_type == "ScatterElements"]
    assert scatters and all(a.name != "reduction" or a.s == b"none" for n in scatters for a in n.attribute)
    assert not {n.op_type for n in proto.graph.node} & {"TopK", "NonZero", "Loop", "If"}
    for target in ("orin-jp6", "orin-jp60"):
        assert lint_model(proto, target).ok
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed + 10)
        s, v = torch.rand(2, 64, generator=gen), torch.randn(2, 64, 8, generator=gen)
        got = run_onnxruntime(proto, {"in0": s.numpy(), "in1": v.numpy()})
        ref = _Compact()(s, v)
        for name, r in zip(["out", "slot", "overflow"], ref, strict=True):
            assert np.array_equal(got[name], r.numpy()), name
