"""L3: the CUDA kernels in plugins/ against a pure-torch implementation of their contract.

The contract is plugins/bipartiteMergePlugin/README.md and plugins/tokenUnmergePlugin/README.md; the oracle
below (`reference_merge`, `reference_unmerge`) is written from those READMEs in plain torch (float64, loops per
image) and shares nothing with the kernels.

Two backends run the same checks through the kernels' C interface (ctypes):

* ``cuda`` (marked ``gpu``): the kernels built with nvcc for the local GPU, called on torch CUDA tensors, up to
  4097 tokens at D=768.  Run with ``pytest -m gpu tests/test_plugin_kernels_gpu.py``.  Set
  ``STATICPRUNE_KERNELS_LIB=/path/libstaticprune_kernels.so`` to test a library built elsewhere (e.g. by CMake
  on a Jetson) instead of building one with nvcc.
* ``emu``: the same kernel sources compiled as host C++ against plugins/common/staticpruneCpuEmulation.h (one
  std::thread per CUDA thread, std::barrier for __syncthreads), called on CPU tensors at small sizes. It checks the
  kernels' logic (indexing, synchronisation, tie rules, capacity fallback) on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
KERNEL_SOURCES = [
    PLUGINS / "common" / "staticprunePluginContract.cpp",
    PLUGINS / "bipartiteMergePlugin" / "bipartiteMergeKernels.cu",
    PLUGINS / "tokenUnmergePlugin" / "tokenUnmergeKernels.cu",
]
INCLUDE_DIRS = [PLUGINS / "common", PLUGINS / "bipartiteMergePlugin", PLUGINS / "tokenUnmergePlugin"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1}
# STATICPRUNE_MERGE_* flags of bipartiteMergeKernels.h
INCLUSIVE, ABSOLUTE_PARITY, KEPT_BY_SCORE = 1, 2, 4

CUDA = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
EMU = pytest.param("emu", id="emu")
BACKENDS = [CUDA, EMU]


# ----------------------------------------------------------------------------------------------------------------
# Building and loading the kernels


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def _build(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"kernel build failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")


def build_cuda_kernels(out_dir: Path) -> Path:
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME, or STATICPRUNE_KERNELS_LIB to a prebuilt library)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    lib = out_dir / "libstaticprune_kernels.so"
    cmd = [nvcc, "-shared", "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
           f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    cmd += [f"-I{d}" for d in INCLUDE_DIRS] + [str(s) for s in KERNEL_SOURCES] + ["-o", str(lib)]
    _build(cmd)
    return lib


def build_emulated_kernels(out_dir: Path) -> Path:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CPU emulation of the kernels needs g++ >= 12")
    version = subprocess.run([cxx, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True).stdout
    match = re.match(r"(\d+)", version.strip())
    if match is None or int(match.group(1)) < 12:
        pytest.skip(f"g++ {version.strip()} is too old for the CPU emulation (needs >= 12 for _Float16)")
    lib = out_dir / "libstaticprune_kernels_emu.so"
    cmd = [cxx, "-std=c++20", "-O2", "-U_FORTIFY_SOURCE", "-fPIC", "-shared", "-w", "-DSTATICPRUNE_CPU_EMULATION"]
    cmd += [f"-I{d}" for d in INCLUDE_DIRS] + ["-x", "c++"] + [str(s) for s in KERNEL_SOURCES] + ["-o", str(lib)]
    _build(cmd)
    return lib


class KernelLib:
    """ctypes view of the C interface of libstaticprune_kernels.so (or of its CPU emulation)."""

    def __init__(self, path: Path, device: torch.device):
        self.device = device
        lib = ctypes.CDLL(str(path))
        i32, ptr = ctypes.c_int32, ctypes.c_void_p
        lib.staticprune_kernels_abi_version.argtypes = []
        lib.staticprune_kernels_abi_version.restype = i32
        lib.staticprune_bipartite_merge_out_tokens.argtypes = [i32] * 4
        lib.staticprune_bipartite_merge_out_tokens.restype = i32
        lib.staticprune_bipartite_merge_workspace_size.argtypes = [i32] * 4
        lib.staticprune_bipartite_merge_workspace_size.restype = ctypes.c_size_t
        lib.staticprune_bipartite_merge.argtypes = (
            [ptr, i32, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr] + [i32] * 7
            + [ctypes.c_float, i32, i32, ptr, ctypes.c_size_t, ptr]
        )
        lib.staticprune_bipartite_merge.restype = i32
        lib.staticprune_bipartite_merge_thresholds.argtypes = (
            [ptr, i32, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr] + [i32] * 7
            + [ctypes.c_float, ptr, i32, i32, ptr, ctypes.c_size_t, ptr]
        )
        lib.staticprune_bipartite_merge_thresholds.restype = i32
        lib.staticprune_token_unmerge.argtypes = [ptr, i32, ptr, ptr] + [i32] * 7 + [ptr]
        lib.staticprune_token_unmerge.restype = i32
        self.lib = lib

    def _stream(self):
        if self.device.type == "cuda":
            return ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        return ctypes.c_void_p(0)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def out_tokens(self, tokens: int, num_prefix: int, r: int, capacity: int) -> int:
        return self.lib.staticprune_bipartite_merge_out_tokens(tokens, num_prefix, r, capacity)

    def merge_raw(self, x, metric, size, owner, num_prefix, r, threshold, out_tokens, flags=0, workspace=None):
        """Calls the C function as is; returns (status, x_out, size_out, owner_out, overflow)."""
        dev = self.device
        x, metric = x.to(dev).contiguous(), metric.to(dev).contiguous()
        size = size.to(dev, torch.float32).contiguous()
        owner = owner.to(dev, torch.int32).contiguous()
        batch, tokens, dim = x.shape
        num_orig = owner.shape[1]
        t_out = max(out_tokens, 0)
        # Poisoned outputs: any element the kernels forget to write shows up.
        x_out = torch.full((batch, t_out, dim), float("nan"), dtype=x.dtype, device=dev)
        size_out = torch.full((batch, t_out), float("nan"), dtype=torch.float32, device=dev)
        owner_out = torch.full((batch, num_orig), -7, dtype=torch.int32, device=dev)
        overflow = torch.full((batch,), -7, dtype=torch.int32, device=dev)
        if workspace is None:
            nbytes = self.lib.staticprune_bipartite_merge_workspace_size(batch, tokens, num_prefix, t_out)
            workspace = torch.full((max(nbytes, 1),), 0xAB, dtype=torch.uint8, device=dev)
            ws_bytes = nbytes
        else:
            ws_bytes = workspace.numel()
        status = self.lib.staticprune_bipartite_merge(
            x.data_ptr(), DTYPE_CODE[x.dtype], metric.data_ptr(), DTYPE_CODE[metric.dtype], size.data_ptr(),
            owner.data_ptr(), x_out.data_ptr(), size_out.data_ptr(), owner_out.data_ptr(), overflow.data_ptr(),
            batch, tokens, dim, metric.shape[-1], num_orig, num_prefix, r, threshold, flags, out_tokens,
            workspace.data_ptr(), ws_bytes, self._stream())
        self._sync()
        return status, x_out, size_out, owner_out, overflow

    def merge(self, x, metric, size, owner, num_prefix, r=-1, threshold=math.inf, capacity=0, flags=0):
        t_out = self.out_tokens(x.shape[1], num_prefix, r, capacity)
        status, *outputs = self.merge_raw(x, metric, size, owner, num_prefix, r, threshold, t_out, flags)
        assert status == 0, f"staticprune_bipartite_merge returned {status}"
        return outputs

    def unmerge(self, x, owner, to_feature_map=False, grid_h=0, grid_w=0):
        dev = self.device
        x = x.to(dev).contiguous()
        owner = owner.to(dev, torch.int32).contiguous()
        batch, tokens, dim = x.shape
        num_orig = owner.shape[1]
        shape = (batch, dim, grid_h, grid_w) if to_feature_map else (batch, num_orig, dim)
        y = torch.full(shape, float("nan"), dtype=x.dtype, device=dev)
        status = self.lib.staticprune_token_unmerge(
            x.data_ptr(), DTYPE_CODE[x.dtype], owner.data_ptr(), y.data_ptr(), batch, tokens, dim, num_orig,
            int(to_feature_map), grid_h, grid_w, self._stream())
        self._sync()
        assert status == 0, f"staticprune_token_unmerge returned {status}"
        return y


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """The oracle runs many tiny torch ops, which intra-op threads only slow down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cuda_kernels(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    prebuilt = os.environ.get("STATICPRUNE_KERNELS_LIB")
    path = Path(prebuilt) if prebuilt else build_cuda_kernels(tmp_path_factory.mktemp("cuda_kernels"))
    return KernelLib(path, torch.device("cuda", torch.cuda.current_device()))


@pytest.fixture(scope="session")
def emu_kernels(tmp_path_factory):
    return KernelLib(build_emulated_kernels(tmp_path_factory.mktemp("emu_kernels")), torch.device("cpu"))


@pytest.fixture
def kernels(request, backend):
    return request.getfixturevalue(f"{backend}_kernels")


# ----------------------------------------------------------------------------------------------------------------
# The oracle (plain torch, float64, per image), written from the READMEs


def ref_out_tokens(tokens: int, num_prefix: int, r: int, capacity: int) -> int:
    n_b = (tokens - num_prefix) // 2
    if r >= 0:
        return tokens - min(r, n_b)
    if capacity <= 0:
        return tokens
    return max(tokens - n_b, min(capacity, tokens))


def reference_merge(x, metric, size, owner, num_prefix, r=-1, threshold=math.inf, capacity=0, flags=0):
    """Returns (x_out float64, size_out float64, owner_out int64, overflow int64, info) on the CPU.

    flags: INCLUSIVE (>= threshold), ABSOLUTE_PARITY (A/B by the parity of the absolute slot index),
    KEPT_BY_SCORE (unmerged A tokens in selection order).

    info["margin"][b]: how far image b's decisions are from flipping (smallest of: best minus second-best
    similarity of the merged A tokens, the score gaps at the selection boundaries, |score - threshold|).
    """
    x, metric = x.detach().cpu().double(), metric.detach().cpu().double()
    size, owner = size.detach().cpu().double(), owner.detach().cpu().long()
    threshold = float(torch.tensor(threshold, dtype=torch.float32))  # the attribute is FP32
    batch, tokens, dim = x.shape
    p_ = num_prefix
    t_out = ref_out_tokens(tokens, p_, r, capacity)
    x_out = torch.zeros(batch, t_out, dim, dtype=torch.float64)
    size_out = torch.zeros(batch, t_out, dtype=torch.float64)
    owner_out = torch.empty_like(owner)
    overflow = torch.zeros(batch, dtype=torch.long)
    margins, merged_counts = [], []
    if flags & ABSOLUTE_PARITY:
        pos_a = [p for p in range(p_, tokens) if p % 2 == 0]
        pos_b = [p for p in range(p_, tokens) if p % 2 == 1]
    else:
        pos_a = [p for p in range(p_, tokens) if (p - p_) % 2 == 0]
        pos_b = [p for p in range(p_, tokens) if (p - p_) % 2 == 1]
    n_a, n_b = len(pos_a), len(pos_b)
    for b in range(batch):
        valid = size[b] > 0
        valid_a = valid[pos_a] if n_a else torch.zeros(0, dtype=torch.bool)
        valid_b = valid[pos_b] if n_b else torch.zeros(0, dtype=torch.bool)
        if n_a and n_b:
            sim = metric[b, pos_a] @ metric[b, pos_b].T
            sim[:, ~valid_b] = -math.inf
            best = sim.max(dim=1).values
            is_best = sim == best[:, None]
            first = torch.where(is_best, torch.arange(n_b)[None, :], torch.full_like(sim, n_b, dtype=torch.long))
            dst = first.min(dim=1).values
            second = torch.where(is_best, torch.full_like(sim, -math.inf), sim).max(dim=1).values
        else:
            best = torch.full((n_a,), -math.inf, dtype=torch.float64)
            dst = torch.full((n_a,), -1, dtype=torch.long)
            second = best.clone()
        mergeable = valid_a & (best > -math.inf)
        score = torch.where(mergeable, best, torch.full_like(best, -math.inf))
        dst = torch.where(mergeable, dst, torch.full_like(dst, -1))
        order = sorted(range(n_a), key=lambda i: (-score[i].item(), i))
        rank = [0] * n_a
        for k, i in enumerate(order):
            rank[i] = k
        n_mergeable = int(mergeable.sum())
        passes = score >= threshold if flags & INCLUSIVE else score > threshold
        above = int((mergeable & passes).sum())
        kept0 = p_ + int(valid_a.sum()) + int(valid_b.sum())
        selected = min(r, n_mergeable) if r >= 0 else above
        forced = max(0, kept0 - selected - t_out)
        n_merge = min(selected + forced, n_mergeable)
        overflow[b] = n_merge - selected
        rank_t = torch.tensor(rank, dtype=torch.long)
        merged = mergeable & (rank_t < n_merge)
        merged_counts.append(n_merge)

        # Decision margin (for tests on continuous data).
        margin = math.inf
        gap = (best - second)[merged & (second > -math.inf)]
        if gap.numel():
            margin = float(gap.min())
        sorted_scores = [score[i].item() for i in order]
        for cut in {selected, n_merge}:
            if 0 < cut < n_a and sorted_scores[cut] > -math.inf:
                margin = min(margin, sorted_scores[cut - 1] - sorted_scores[cut])
        if r < 0 and math.isfinite(threshold):
            finite = score[mergeable]
            if finite.numel():
                margin = min(margin, float((finite - threshold).abs().min()))
        margins.append(margin)

        # New slots: prefix, unmerged valid A in order, valid B in order, then padding.
        pa_t, pb_t = torch.tensor(pos_a, dtype=torch.long), torch.tensor(pos_b, dtype=torch.long)
        kept_a = pa_t[valid_a & ~merged]
        if flags & KEPT_BY_SCORE:
            kept_a = pa_t[[i for i in order if bool(valid_a[i]) and not bool(merged[i])]]
        kept_b = pb_t[valid_b]
        src = torch.cat([torch.arange(p_), kept_a, kept_b])
        assert len(src) <= t_out, "contract violated: kept tokens exceed the output capacity"
        slot = torch.full((tokens,), -1, dtype=torch.long)
        slot[src] = torch.arange(len(src))
        if n_a:
            slot[pa_t[merged]] = slot[pb_t[dst[merged]]]  # merged A tokens live in their partner's slot
        # Size-weighted merge: numerator and denominator per slot over every valid token it now holds.
        holders = torch.nonzero(slot >= 0).flatten()
        num = torch.zeros(t_out, dim, dtype=torch.float64).index_add_(0, slot[holders],
                                                                      x[b, holders] * size[b, holders, None])
        den = torch.zeros(t_out, dtype=torch.float64).index_add_(0, slot[holders], size[b, holders])
        count = torch.zeros(t_out, dtype=torch.long).index_add_(0, slot[holders], torch.ones_like(holders))
        n_kept = len(src)
        group = count[:n_kept] > 1
        x_out[b, :n_kept] = torch.where(group[:, None], num[:n_kept] / den[:n_kept].clamp_min(1e-300)[:, None],
                                        x[b, src])  # untouched slots: an exact copy
        size_out[b, :n_kept] = torch.where(group, den[:n_kept], size[b, src])
        ok = (owner[b] >= 0) & (owner[b] < tokens)
        owner_out[b] = torch.where(ok, slot[owner[b].clamp(0, max(tokens - 1, 0))], torch.full_like(owner[b], -1))
    return x_out, size_out, owner_out, overflow, {"margin": margins, "merged": merged_counts}


def reference_unmerge(x, owner, to_feature_map=False, grid_h=0, grid_w=0):
    x, owner = x.detach().cpu(), owner.detach().cpu().long()
    batch, tokens, dim = x.shape
    ok = (owner >= 0) & (owner < tokens)
    y = torch.gather(x, 1, owner.clamp(0, max(tokens - 1, 0))[..., None].expand(-1, -1, dim))
    y = torch.where(ok[..., None], y, torch.zeros_like(y))
    if to_feature_map:
        y = y.transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(batch, tokens, num_prefix, c, d, *, seed, x_dtype=torch.float32, metric_dtype=torch.float32,
                quantized=True, pad_fraction=0.0, trailing_pad=0, num_orig=None):
    """Random token state. Quantized metrics (multiples of 1/8 in [-3/8, 3/8]) make every similarity exact in
    FP32 and in float64, and make ties frequent; continuous metrics are L2-normalised Gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, d, generator=g).to(x_dtype)
    if quantized:
        metric = torch.randint(-3, 4, (batch, tokens, c), generator=g).double() / 8
    else:
        metric = torch.randn(batch, tokens, c, generator=g, dtype=torch.float64)
        metric = metric / metric.norm(dim=-1, keepdim=True)
    metric = metric.to(metric_dtype)
    size = torch.randint(1, 5, (batch, tokens), generator=g).float()
    if pad_fraction > 0:
        pad = torch.rand(batch, tokens, generator=g) < pad_fraction
        pad[:, :num_prefix] = False
        size[pad] = 0
    if trailing_pad:
        size[:, tokens - trailing_pad:] = 0
    n0 = tokens - num_prefix if num_orig is None else num_orig
    # Original tokens owned by random valid non-prefix slots (prefix slots if nothing else is valid).
    owner = torch.empty(batch, n0, dtype=torch.int32)
    for b in range(batch):
        valid = torch.nonzero(size[b] > 0).flatten()
        valid = valid[valid >= num_prefix] if (valid >= num_prefix).any() else valid
        owner[b] = valid[torch.randint(0, len(valid), (n0,), generator=g)].int()
    return x, metric, size, owner


def assert_merge_matches(kernels, x, metric, size, owner, num_prefix, r=-1, threshold=math.inf, capacity=0,
                         flags=0):
    x_out, size_out, owner_out, overflow = kernels.merge(x, metric, size, owner, num_prefix, r, threshold, capacity,
                                                         flags)
    rx, rsize, rowner, roverflow, info = reference_merge(x, metric, size, owner, num_prefix, r, threshold, capacity,
                                                         flags)
    assert x_out.shape == rx.shape
    # Decisions: identical.
    assert torch.equal(overflow.cpu().long(), roverflow), (overflow, roverflow)
    assert torch.equal(owner_out.cpu().long(), rowner)
    torch.testing.assert_close(size_out.cpu().double(), rsize, rtol=1e-6, atol=0)
    # Features: <= 1e-5 (FP32), <= 1e-2 (FP16).
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_out.cpu().double(), rx, rtol=tol, atol=tol)
    return info, (x_out, size_out, owner_out, overflow)


# ----------------------------------------------------------------------------------------------------------------
# Bipartite merge


@pytest.mark.parametrize("backend", BACKENDS)
def test_abi_version_and_out_tokens(kernels):
    assert kernels.lib.staticprune_kernels_abi_version() == 1
    for tokens, prefix in [(0, 0), (1, 0), (1, 1), (2, 1), (9, 1), (10, 0), (4097, 1), (4097, 0)]:
        for r in [0, 1, 3, 2048, 5000, -1]:
            for capacity in [-1, 0, 1, tokens // 2, tokens - 1, tokens, tokens + 5]:
                assert kernels.out_tokens(tokens, prefix, r, capacity) == ref_out_tokens(tokens, prefix, r, capacity)
    assert kernels.out_tokens(3, 4, 1, 0) == -1
    assert kernels.out_tokens(3, -1, 1, 0) == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_ties_by_hand(kernels):
    """Every metric row equal: every similarity ties. Lowest index wins everywhere: A0 and A1 merge into B0."""
    tokens, prefix = 9, 1
    x = torch.arange(tokens * 2, dtype=torch.float32).reshape(1, tokens, 2)
    metric = torch.zeros(1, tokens, 4)
    metric[..., 0] = 0.5
    size = torch.ones(1, tokens)
    owner = torch.arange(1, tokens, dtype=torch.int32)[None]  # patch n sits at slot n + 1
    x_out, size_out, owner_out, overflow = kernels.merge(x, metric, size, owner, prefix, r=2)
    # A = slots 1,3,5,7; B = slots 2,4,6,8. Output: CLS, A2, A3, B0 (+A0, A1), B1, B2, B3.
    assert owner_out.cpu().tolist() == [[3, 3, 3, 4, 1, 5, 2, 6]]
    assert size_out.cpu().tolist() == [[1, 1, 1, 3, 1, 1, 1]]
    assert overflow.cpu().tolist() == [0]
    expected_b0 = (x[0, 2] + x[0, 1] + x[0, 3]) / 3
    torch.testing.assert_close(x_out[0, 3].cpu(), expected_b0)
    torch.testing.assert_close(x_out[0, [0, 1, 2, 4, 5, 6]].cpu(), x[0, [0, 5, 7, 4, 6, 8]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_ties_partner_and_rank(kernels):
    """Two B tokens with identical metrics (partner tie -> lower B index) and A tokens with equal scores (rank tie
    -> lower A index): which A merges and where is fully determined."""
    tokens, prefix = 11, 1  # A: 1,3,5,7,9 (A0..A4), B: 2,4,6,8,10 (B0..B4)
    metric = torch.zeros(1, tokens, 2)  # unrelated tokens: zero vectors, similarity 0 (ties -> B0)
    e0 = torch.tensor([1.0, 0.0])
    e1 = torch.tensor([0.0, 1.0])
    for pos in (4, 8):  # B1 and B3 identical
        metric[0, pos] = e0
    for pos in (3, 7):  # A1, A3 both best-match B1 == B3 with score 1: partner B1 (lower index), equal scores
        metric[0, pos] = e0
    metric[0, 9] = e1 * 0.5 + e0 * 0.5  # A4: score 0.5 with B1/B3
    x = torch.randn(1, tokens, 5, generator=torch.Generator().manual_seed(3))
    size = torch.ones(1, tokens)
    owner = torch.arange(1, tokens, dtype=torch.int32)[None]
    # Scores: A1 = A3 = 1 (partner B1, not B3), A4 = 0.5 (B1), A0 = A2 = 0 (B0). Order: A1, A3, A4, A0, A2.
    for r, merged_a in [(1, [1]), (2, [1, 3]), (3, [1, 3, 4])]:
        _, (x_out, size_out, owner_out, _) = assert_merge_matches(kernels, x, metric, size, owner, prefix, r=r)
        slot_b1 = owner_out[0, 4 - 1].item()
        for a in merged_a:
            assert owner_out[0, (2 * a + 1) - 1].item() == slot_b1
        assert size_out[0, slot_b1].item() == 1 + len(merged_a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_order_is_b_then_ascending_a(kernels):
    """FP32 accumulation order is part of the contract: x_b * s_b first, then the merged A tokens by ascending
    index. With B0 = 1e8, A0 = 1, A1 = -1e8 (sizes 1) that order gives exactly (1e8 + 1 - 1e8) / 3 = 0 in FP32,
    where any other order gives 1/3."""
    tokens, prefix = 7, 1  # A0..A2 at slots 1, 3, 5; B0..B2 at slots 2, 4, 6
    metric = torch.zeros(1, tokens, 2)
    metric[0, [1, 2, 3], 0] = 1.0  # A0, A1 and B0 alike: A0 and A1 (score 1) merge into B0
    x = torch.zeros(1, tokens, 3)
    x[0, 2] = 1e8
    x[0, 1] = 1.0
    x[0, 3] = -1e8
    size = torch.ones(1, tokens)
    owner = torch.arange(1, tokens, dtype=torch.int32)[None]
    x_out, size_out, owner_out, _ = kernels.merge(x, metric, size, owner, prefix, r=2)
    slot_b0 = owner_out[0, 1].item()
    assert owner_out[0, 0].item() == slot_b0 and owner_out[0, 2].item() == slot_b0
    assert size_out[0, slot_b0].item() == 3
    assert x_out[0, slot_b0].cpu().tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_is_strict(kernels):
    """Threshold mode merges scores strictly above the threshold (a score equal to it stays), or with INCLUSIVE
    scores at or above it."""
    tokens, prefix = 9, 1  # A0..A3 at 1,3,5,7; B0..B3 at 2,4,6,8
    metric = torch.zeros(1, tokens, 2)
    metric[0, [2, 4, 6, 8], 0] = 1.0  # every B token alike
    metric[0, 1, 0] = 0.5  # A0: score 0.5
    metric[0, 3, 0] = 0.25  # A1: score 0.25
    metric[0, 5, 0] = 0.75  # A2: score 0.75; A3: score 0
    x = torch.randn(1, tokens, 4, generator=torch.Generator().manual_seed(0))
    size = torch.ones(1, tokens)
    owner = torch.arange(1, tokens, dtype=torch.int32)[None]
    for threshold, n_merged, n_inclusive in [(0.75, 0, 1), (0.5, 1, 2), (0.25, 2, 3), (0.2499, 3, 3), (0.0, 3, 4),
                                             (-0.01, 4, 4)]:
        _, outs = assert_merge_matches(kernels, x, metric, size, owner, prefix, -1, threshold, 0)
        assert (outs[1] > 1).sum().item() == (1 if n_merged else 0)  # everything merges into B0
        assert outs[1].max().item() == 1 + n_merged
        _, outs = assert_merge_matches(kernels, x, metric, size, owner, prefix, -1, threshold, 0, INCLUSIVE)
        assert outs[1].max().item() == 1 + n_inclusive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch,tokens,prefix,c,d,r",
    [(1, 9, 1, 8, 16, 3), (2, 50, 1, 16, 40, 12), (2, 65, 0, 24, 130, 20), (1, 131, 2, 8, 33, 400),
     (2, 200, 1, 64, 96, 80), (1, 3, 1, 4, 8, 1), (1, 2, 1, 4, 8, 1), (2, 1, 1, 4, 8, 3), (1, 70, 0, 20, 600, 0)],
)
@pytest.mark.parametrize("x_dtype,metric_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                  (torch.float16, torch.float32)])
def test_merge_fixed_r(kernels, batch, tokens, prefix, c, d, r, x_dtype, metric_dtype):
    x, metric, size, owner = make_inputs(batch, tokens, prefix, c, d, seed=tokens * 7 + r, x_dtype=x_dtype,
                                         metric_dtype=metric_dtype)
    info, outs = assert_merge_matches(kernels, x, metric, size, owner, prefix, r=r)
    assert outs[3].cpu().eq(0).all()  # fixed r never overflows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad_fraction,trailing_pad", [(0.3, 0), (0.0, 17), (0.5, 5), (0.95, 0)])
@pytest.mark.parametrize("r", [5, 30, 1000])
def test_merge_with_padding(kernels, pad_fraction, trailing_pad, r):
    """Padding slots (size 0) never match, are never matched, and are compacted away."""
    x, metric, size, owner = make_inputs(2, 97, 1, 16, 24, seed=r + trailing_pad, pad_fraction=pad_fraction,
                                         trailing_pad=trailing_pad)
    _, (x_out, size_out, owner_out, _) = assert_merge_matches(kernels, x, metric, size, owner, 1, r=r)
    kept = (size_out > 0).cpu()
    # Padding only at the end, and zeroed.
    for b in range(2):
        n = int(kept[b].sum())
        assert kept[b, :n].all() and not kept[b, n:].any()
        assert x_out[b, n:].cpu().eq(0).all()
    assert torch.equal(size_out.sum(1).cpu(), size.sum(1))  # mass is conserved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity_kind", ["none", "loose", "tight", "minimum"])
@pytest.mark.parametrize("threshold", [-math.inf, 0.05, 0.2, math.inf])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_merge_threshold_capacity(kernels, capacity_kind, threshold, x_dtype):
    batch, tokens, prefix = 2, 121, 1
    x, metric, size, owner = make_inputs(batch, tokens, prefix, 8, 48, seed=11, x_dtype=x_dtype, pad_fraction=0.1)
    n_b = (tokens - prefix) // 2
    capacity = {"none": 0, "loose": tokens - 3, "tight": tokens - 40, "minimum": tokens - n_b}[capacity_kind]
    info, outs = assert_merge_matches(kernels, x, metric, size, owner, prefix, -1, threshold, capacity)
    overflow = outs[3].cpu()
    if capacity_kind == "none" or threshold == -math.inf:
        assert overflow.eq(0).all()
    if threshold == math.inf and capacity_kind in ("tight", "minimum"):
        assert overflow.gt(0).all()  # everything merged here is a forced merge, and reported


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_per_image_thresholds(kernels):
    """threshold_input mode (ALGM's adaptive threshold): image b is merged exactly as with the attribute
    threshold = thresholds[b], and the scalar threshold is ignored."""
    batch, tokens, prefix, capacity = 3, 57, 1, 40
    x, metric, size, owner = make_inputs(batch, tokens, prefix, 8, 16, seed=21, pad_fraction=0.1)
    thresholds = torch.tensor([0.05, 0.2, math.inf])
    dev = kernels.device
    t_out = kernels.out_tokens(tokens, prefix, -1, capacity)
    args = [t.to(dev).contiguous() for t in (x, metric, size.float(), owner.int())]
    outs = [torch.full((batch, t_out, 16), float("nan"), device=dev), torch.zeros(batch, t_out, device=dev),
            torch.zeros(batch, tokens - prefix, dtype=torch.int32, device=dev),
            torch.zeros(batch, dtype=torch.int32, device=dev)]
    nbytes = kernels.lib.staticprune_bipartite_merge_workspace_size(batch, tokens, prefix, t_out)
    workspace = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=dev)
    per_image = thresholds.to(dev)
    status = kernels.lib.staticprune_bipartite_merge_thresholds(
        args[0].data_ptr(), 0, args[1].data_ptr(), 0, args[2].data_ptr(), args[3].data_ptr(),
        *[o.data_ptr() for o in outs], batch, tokens, 16, 8, tokens - prefix, prefix, -1, -math.inf,
        per_image.data_ptr(), 0, t_out, workspace.data_ptr(), nbytes, kernels._stream())
    kernels._sync()
    assert status == 0
    overflow = []
    for b in range(batch):
        rx, rsize, rowner, roverflow, _ = reference_merge(x[b:b + 1], metric[b:b + 1], size[b:b + 1],
                                                          owner[b:b + 1], prefix, -1, thresholds[b].item(), capacity)
        assert torch.equal(outs[2][b:b + 1].cpu().long(), rowner)
        assert outs[3][b].item() == roverflow.item()
        torch.testing.assert_close(outs[0][b:b + 1].cpu().double(), rx, rtol=1e-5, atol=1e-5)
        overflow.append(roverflow.item())
    assert overflow[2] > 0 and overflow[0] == 0  # the thresholds really differ per image


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_capacity_overflow_counts(kernels):
    """Threshold selects s tokens; a capacity that needs s + k merges forces exactly k more, the next best."""
    tokens, prefix = 41, 1
    x, metric, size, owner = make_inputs(1, tokens, prefix, 8, 12, seed=5)
    _, _, _, _, info_free = reference_merge(x, metric, size, owner, prefix, -1, 0.1, 0)
    selected = info_free["merged"][0]
    n_b = (tokens - prefix) // 2
    extras = [e for e in [0, 1, 4] if selected + e <= n_b]
    assert len(extras) >= 2, selected
    for extra in extras:
        capacity = tokens - selected - extra
        _, outs = assert_merge_matches(kernels, x, metric, size, owner, prefix, -1, 0.1, capacity)
        assert outs[3].item() == extra
        assert outs[1].shape[1] == capacity


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_continuous_metric_with_margin(kernels):
    """Realistic (normalised, continuous) metrics: decisions must match wherever they are not within rounding of a
    flip. Seeds whose smallest decision margin is below 1e-5 are skipped deterministically."""
    tested = 0
    for seed in range(40):
        x, metric, size, owner = make_inputs(2, 151, 1, 32, 64, seed=seed, quantized=False, pad_fraction=0.05)
        info = reference_merge(x, metric, size, owner, 1, 40)[4]
        if min(info["margin"]) < 1e-5:
            continue
        assert_merge_matches(kernels, x, metric, size, owner, 1, r=40)
        tested += 1
        if tested == 3:
            break
    assert tested == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_chain_then_unmerge(kernels):
    """Three merges in a row (owner composition), then unmerge to the grid, against the oracle chain."""
    batch, grid_h, grid_w, prefix, d = 2, 6, 7, 1, 20
    tokens = prefix + grid_h * grid_w
    x, metric, size, _ = make_inputs(batch, tokens, prefix, 8, d, seed=21)
    owner = torch.arange(prefix, tokens, dtype=torch.int32)[None].repeat(batch, 1)
    kx, ksize, kowner = x, size, owner
    rx, rsize, rowner = x.double(), size.double(), owner.long()
    g = torch.Generator().manual_seed(22)
    for step, (r, thr, cap) in enumerate([(8, math.inf, 0), (-1, 0.1, tokens - 14), (5, math.inf, 0)]):
        step_metric = metric if step == 0 else torch.randint(-3, 4, (batch, kx.shape[1], 8), generator=g) / 8
        kx, ksize, kowner, _ = kernels.merge(kx, step_metric, ksize, kowner, prefix, r, thr, cap)
        rx, rsize, rowner, _, _ = reference_merge(rx, step_metric, rsize, rowner, prefix, r, thr, cap)
        assert torch.equal(kowner.cpu().long(), rowner), f"step {step}"
        torch.testing.assert_close(kx.cpu().double(), rx, rtol=1e-5, atol=1e-5)
    y = kernels.unmerge(kx, kowner, True, grid_h, grid_w)
    torch.testing.assert_close(y.cpu().double(), reference_unmerge(rx, rowner, True, grid_h, grid_w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_is_deterministic(kernels):
    x, metric, size, owner = make_inputs(2, 301, 1, 16, 70, seed=8, quantized=False)
    first = kernels.merge(x, metric, size, owner, 1, -1, 0.05, 220)
    for _ in range(2):
        again = kernels.merge(x, metric, size, owner, 1, -1, 0.05, 220)
        for a, b in zip(first, again):
            assert a.cpu().numpy().tobytes() == b.cpu().numpy().tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_argument_errors(kernels):
    x, metric, size, owner = make_inputs(1, 21, 1, 4, 8, seed=1)
    ok = kernels.out_tokens(21, 1, 4, 0)
    assert kernels.merge_raw(x, metric, size, owner, 1, 4, math.inf, ok)[0] == 0
    assert kernels.merge_raw(x, metric, size, owner, 1, -1, 0.0, 21 - 11)[0] == -1  # below tokens - nB
    assert kernels.merge_raw(x, metric, size, owner, 1, -1, 0.0, 22)[0] == -1  # above tokens
    assert kernels.merge_raw(x, metric, size, owner, 22, 4, math.inf, ok)[0] == -1  # prefix > tokens
    small = torch.zeros(16, dtype=torch.uint8, device=kernels.device)
    assert kernels.merge_raw(x, metric, size, owner, 1, 4, math.inf, ok, workspace=small)[0] == -2
    assert kernels.merge_raw(x, metric, size, owner, 1, 4, math.inf, ok, flags=8)[0] == -1  # unknown flag
    status = kernels.lib.staticprune_bipartite_merge(
        None, 7, None, 0, None, None, None, None, None, None, 1, 21, 8, 4, 20, 1, 4, 0.0, 0, ok, None, 0, None)
    assert status == -3


@pytest.mark.parametrize("backend", BACKENDS)
def test_tome_variant_by_hand(kernels):
    """ABSOLUTE_PARITY | KEPT_BY_SCORE without a prefix (ToMe without a class token): A = slots 0,2,4,6,
    B = 1,3,5,7; kept A tokens come out in score order."""
    tokens = 8
    metric = torch.zeros(1, tokens, 2)
    metric[0, [1, 3, 5, 7], 0] = 1.0  # every B alike
    metric[0, [0, 2, 4, 6], 0] = torch.tensor([0.25, 0.5, 1.0, 0.75])  # A scores: A2 > A3 > A1 > A0
    x = torch.randn(1, tokens, 3, generator=torch.Generator().manual_seed(1))
    size = torch.ones(1, tokens)
    owner = torch.arange(tokens, dtype=torch.int32)[None]
    _, (x_out, size_out, owner_out, _) = assert_merge_matches(
        kernels, x, metric, size, owner, 0, r=1, flags=ABSOLUTE_PARITY | KEPT_BY_SCORE)
    # A2 (slot 4) merges into B0 (slot 1). Output: A3, A1, A0 (score order), then B0..B3.
    assert owner_out[0].tolist() == [2, 3, 1, 4, 3, 5, 0, 6]
    torch.testing.assert_close(x_out[0, :3].cpu(), x[0, [6, 2, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [INCLUSIVE, ABSOLUTE_PARITY, KEPT_BY_SCORE, ABSOLUTE_PARITY | KEPT_BY_SCORE,
                                   INCLUSIVE | ABSOLUTE_PARITY | KEPT_BY_SCORE])
@pytest.mark.parametrize("tokens,prefix", [(60, 0), (61, 0), (60, 1), (61, 1), (62, 2), (63, 3)])
def test_merge_variants(kernels, flags, tokens, prefix):
    x, metric, size, owner = make_inputs(2, tokens, prefix, 8, 24, seed=tokens + flags, pad_fraction=0.1)
    n_half = (tokens - prefix) // 2
    assert_merge_matches(kernels, x, metric, size, owner, prefix, r=n_half // 2, flags=flags)
    assert_merge_matches(kernels, x, metric, size, owner, prefix, -1, 0.125, tokens - n_half + 2, flags=flags)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["r1024", "threshold_capacity", "r2048_quantized", "overflow"])
def test_merge_large(kernels, x_dtype, mode):
    """4097 tokens (64 x 64 patches + CLS), D = 768, batch 2: the ViT-B at 1024^2 case."""
    batch, tokens, prefix, c, d = 2, 4097, 1, 64, 768
    quantized = mode in ("r2048_quantized", "overflow")
    r, thr, cap = {"r1024": (1024, math.inf, 0), "threshold_capacity": (-1, 0.35, 3000),
                   "r2048_quantized": (2048, math.inf, 0), "overflow": (-1, 2.0, 2300)}[mode]
    for seed in range(20):
        x, metric, size, owner = make_inputs(batch, tokens, prefix, c, d, seed=seed, x_dtype=x_dtype,
                                             quantized=quantized, pad_fraction=0.02)
        if quantized:
            break
        info = reference_merge(x, metric, size, owner, prefix, r, thr, cap)[4]
        if min(info["margin"]) >= 2e-6:
            break
    else:
        pytest.fail("no seed with decision margins >= 2e-6")
    info, outs = assert_merge_matches(kernels, x, metric, size, owner, prefix, r, thr, cap)
    if mode == "overflow":
        assert outs[3].gt(0).all()


# ----------------------------------------------------------------------------------------------------------------
# Token unmerge


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,tokens,d,grid_h,grid_w", [(1, 10, 8, 3, 4), (2, 50, 40, 5, 7), (2, 33, 70, 33, 31),
                                                         (1, 5, 1, 1, 1)])
def test_unmerge(kernels, dtype, batch, tokens, d, grid_h, grid_w):
    g = torch.Generator().manual_seed(tokens + d)
    x = torch.randn(batch, tokens, d, generator=g).to(dtype)
    owner = torch.randint(0, tokens, (batch, grid_h * grid_w), generator=g, dtype=torch.int32)
    owner[:, ::7] = -1  # out of range -> zero rows
    owner[:, 3::11] = tokens
    for fmap in (False, True):
        y = kernels.unmerge(x, owner, fmap, grid_h, grid_w)
        assert torch.equal(y.cpu(), reference_unmerge(x, owner, fmap, grid_h, grid_w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerge_argument_errors(kernels):
    lib = kernels.lib
    assert lib.staticprune_token_unmerge(None, 0, None, None, 1, 4, 8, 6, 1, 2, 2, None) == -1  # 2 x 2 != 6
    assert lib.staticprune_token_unmerge(None, 0, None, None, 1, 4, 0, 6, 0, 0, 0, None) == -1  # dim 0
    assert lib.staticprune_token_unmerge(None, 5, None, None, 1, 4, 8, 6, 0, 0, 0, None) == -3  # dtype
    assert lib.staticprune_token_unmerge(None, 0, None, None, 0, 4, 8, 6, 0, 0, 0, None) == 0  # empty batch


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unmerge_large(kernels, dtype):
    batch, tokens, d, grid = 2, 2049, 768, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, d, generator=g).to(dtype)
    owner = torch.randint(0, tokens, (batch, grid * grid), generator=g, dtype=torch.int32)
    for fmap in (False, True):
        y = kernels.unmerge(x, owner, fmap, grid, grid)
        assert torch.equal(y.cpu(), reference_unmerge(x, owner, fmap, grid, grid))
