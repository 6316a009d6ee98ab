"""Connected components of a 4-neighbour grid graph with a fixed, proven number of steps.

Input: edge masks on an H x W grid (`right[b, r, c]`: cell (r, c) is joined to (r, c + 1); `down[b, r, c]`:
to (r + 1, c); entries in the last column / row are ignored). Output: for every cell the smallest row-major
index of its component (the "min label"), optionally also the minimum of a per-cell value over the component.

Why not FastSV / Shiloach-Vishkin: their O(log N) bound rests on hooking, a write of a smaller label into a
tree root by many writers at once (`scatter_reduce(amin)`). That is ScatterElements with a reduction, which
TensorRT 8.x silently turns into an overwrite. Without it, min-label propagation can only pull from
neighbours, and pulling plus pointer jumping still needs as many rounds as the component's diameter (on the
path 0-5-4-3-2-1 the label 0 advances one node per round), i.e. thousands of unrolled rounds for a snake on a
64 x 64 grid.

What we do instead: min-label propagation across block boundaries, bottom-up (divide and conquer). The grid is
padded to 2^a x 2^b with isolated cells and starts as 1 x 1 blocks, every cell labelled with its own index.
Each step joins pairs of neighbouring blocks, alternating the axis, until one block covers the grid:
a + b = ceil(log2 H) + ceil(log2 W) steps, fixed by the shape alone (12 for a 64 x 64 grid).

Invariant: after every step each cell holds the min label of its component in the subgraph induced by its
block. Proof of one step (blocks X and Y joined into Z along a shared boundary of h cells per side):
a component of Z is a union of components of X and of Y glued by cross edges, and every cross edge joins a
boundary cell of X to one of Y. Build the boundary graph on those 2h cells: an edge for every kept cross edge,
and an edge between two cells that already share a label (same X- or Y-component; a label names its
component because it is the index of one of its members). Two boundary cells are in the same Z-component iff
they are connected in that graph, which has at most 2h - 1 edges on any simple path, so the transitive
closure needs ceil(log2(2h - 1)) boolean squarings of its adjacency matrix. The new label of a boundary cell
is the min over its closure class of the old labels (each the min of its X/Y-component), hence the min of
its Z-component. An interior cell whose X/Y-component touches the boundary takes the new label of a
boundary cell with its old label (all such cells agree); one whose component does not touch the boundary is
a whole Z-component already and keeps its label. Padding cells have no edges and never change a real label,
and after the last step the block is the whole grid: the labels are exact. The step count depends only on
the grid shape, never on the data, so no convergence check or overflow is needed.

Cost per step: (2h)^3 per block for the closure and cells x 2h comparisons; at 64 x 64 the largest step
touches 4096 x 128 pairs. Only Equal / Where / ReduceMin / MatMul (of 0/1 values, exact in FP16 too) /
Reshape / Transpose / Concat / Slice: no scatter, no TopK, no Loop.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# Larger than any label (labels are < 2 * padded grid size); fits int32 for TensorRT 8.x, which casts int64.
_NO_LABEL = 2**31 - 1


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def merge_schedule(height: int, width: int) -> list[tuple[str, int, int]]:
    """The static sequence of block joins for a grid: (axis, block height, block width) before each join.

    axis "w" joins horizontal pairs (bh x bw -> bh x 2bw), "h" vertical pairs. The smaller block side grows
    first so blocks stay square-ish and boundaries short.
    """
    h2, w2 = next_power_of_two(height), next_power_of_two(width)
    bh = bw = 1
    steps = []
    while bh < h2 or bw < w2:
        if bw < w2 and (bw <= bh or bh == h2):
            steps.append(("w", bh, bw))
            bw *= 2
        else:
            steps.append(("h", bh, bw))
            bh *= 2
    return steps


def closure_squarings(boundary_cells: int) -> int:
    """Boolean squarings that make a reflexive adjacency on `boundary_cells` nodes transitive."""
    longest_path = boundary_cells - 1
    return 0 if longest_path <= 1 else math.ceil(math.log2(longest_path))


def _transitive_closure(adjacency: Tensor, squarings: int) -> Tensor:
    """Reflexive bool adjacency (..., n, n) -> reachability. Squaring doubles the path length covered each time;
    the 0/1 float products count paths, exact in FP32 and FP16 for n <= 2048."""
    for _ in range(squarings):
        a = adjacency.to(torch.float32)
        adjacency = (a @ a) > 0.5
    return adjacency


def _pad_grid(t: Tensor, height: int, width: int, value: float) -> Tensor:
    """(B, H, W) -> (B, height, width) by appending `value` columns and rows (Concat only, no Pad-with-axes).
    The filler is built in float and cast, because the tracer cannot record a bool-valued `full`."""
    b, h, w = (int(d) for d in t.shape)
    if width > w:
        filler = torch.full((b, h, width - w), value, dtype=torch.float32, device=t.device).to(t.dtype)
        t = torch.cat([t, filler], 2)
    if height > h:
        filler = torch.full((b, height - h, width), value, dtype=torch.float32, device=t.device).to(t.dtype)
        t = torch.cat([t, filler], 1)
    return t


def initial_labels(height: int, width: int, padded_height: int, padded_width: int, device=None) -> Tensor:
    """(1, H2, W2) int64: row-major index of the real grid for real cells, unique values >= H*W for padding."""
    rows = torch.arange(padded_height, device=device)[:, None]
    cols = torch.arange(padded_width, device=device)[None, :]
    real = (rows < height) & (cols < width)
    labels = torch.where(real, rows * width + cols, height * width + rows * padded_width + cols)
    return labels.unsqueeze(0)


def _join_horizontal(
    labels: Tensor, values: Optional[Tensor], edges: Tensor, bh: int, bw: int
) -> tuple[Tensor, Optional[Tensor]]:
    """One join step along the last axis: blocks bh x bw at columns [2k bw, (2k+1) bw) and [(2k+1) bw, (2k+2) bw)
    become one block. `edges` are the right-edges; the cross edges sit in each pair's column 2k bw + bw - 1."""
    b, height, width = (int(d) for d in labels.shape)
    ny, nx = height // bh, width // (2 * bw)

    def blocks(t: Tensor) -> Tensor:  # (B, H, W) -> (B, ny, nx, bh, 2bw)
        return t.reshape(b, ny, bh, nx, 2 * bw).permute(0, 1, 3, 2, 4)

    def unblock(t: Tensor) -> Tensor:
        return t.permute(0, 1, 3, 2, 4).reshape(b, height, width)

    lab = blocks(labels)
    boundary = torch.cat([lab[..., bw - 1], lab[..., bw]], -1)  # (..., 2bh): left side then right side
    cross = blocks(edges)[..., bw - 1]  # (..., bh): row i of the left side joined to row i of the right side
    eye = torch.eye(bh, dtype=torch.bool, device=labels.device)
    half = cross.unsqueeze(-1) & eye
    none = torch.zeros_like(half)
    cross_adj = torch.cat([torch.cat([none, half], -1), torch.cat([half, none], -1)], -2)
    same = boundary.unsqueeze(-1) == boundary.unsqueeze(-2)
    reach = _transitive_closure(same | cross_adj, closure_squarings(2 * bh))

    no_label = torch.full_like(boundary, _NO_LABEL)
    new_boundary = torch.amin(torch.where(reach, boundary.unsqueeze(-2), no_label.unsqueeze(-2)), -1)
    # Cells find their boundary cell by old label; those whose component misses the boundary get _NO_LABEL.
    match = lab.unsqueeze(-1) == boundary[..., None, None, :]  # (..., bh, 2bw, 2bh)
    from_boundary = torch.amin(torch.where(match, new_boundary[..., None, None, :], _NO_LABEL), -1)
    labels = unblock(torch.minimum(lab, from_boundary))

    if values is not None:
        val = blocks(values)
        vboundary = torch.cat([val[..., bw - 1], val[..., bw]], -1)
        top = torch.full_like(vboundary, float("inf"))
        new_vboundary = torch.amin(torch.where(reach, vboundary.unsqueeze(-2), top.unsqueeze(-2)), -1)
        vfrom = torch.amin(torch.where(match, new_vboundary[..., None, None, :], float("inf")), -1)
        values = unblock(torch.minimum(val, vfrom))
    return labels, values


def _transpose(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.transpose(1, 2)


def grid_components(right: Tensor, down: Tensor, values: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Connected components of a 4-neighbour grid graph.

    right, down: (B, H, W) bool edge masks (last column of `right` / last row of `down` ignored).
    values:      optional (B, H, W) float, reduced by min over each component.
    Returns labels (B, H*W) int64, the smallest row-major index in each cell's component, and the
    per-cell component minimum of `values` (B, H*W), or None.
    """
    b, height, width = (int(d) for d in right.shape)  # static sizes, also while tracing
    if down.shape != right.shape or (values is not None and values.shape != right.shape):
        raise ValueError("right, down and values must share one (B, H, W) shape")
    h2, w2 = next_power_of_two(height), next_power_of_two(width)
    cols = torch.arange(width, device=right.device)
    rows = torch.arange(height, device=right.device)
    right = _pad_grid(right & (cols < width - 1), h2, w2, 0.0)
    down = _pad_grid(down & (rows < height - 1)[:, None], h2, w2, 0.0)
    labels = initial_labels(height, width, h2, w2, right.device).expand(b, -1, -1)
    if values is not None:
        values = _pad_grid(values, h2, w2, float("inf"))
    for axis, bh, bw in merge_schedule(height, width):
        if axis == "w":
            labels, values = _join_horizontal(labels, values, right, bh, bw)
        else:  # a vertical join is a horizontal one on the transposed grid
            lab_t, val_t = _join_horizontal(labels.transpose(1, 2), _transpose(values), down.transpose(1, 2), bw, bh)
            labels, values = lab_t.transpose(1, 2), _transpose(val_t)
    labels = labels[:, :height, :width].reshape(b, height * width)
    if values is not None:
        values = values[:, :height, :width].reshape(b, height * width)
    return labels, values
