"""The TensorRT plugin contract, checked on ONNX graphs without TensorRT.

The creators of `plugins/` decide which attribute combinations they accept, and the plugins which output shapes
they report, by calling plain C functions (plugins/common/staticprunePluginContract.{h,cpp}). This module loads
those same functions through ctypes and asks them, for every StaticPrune* node of a graph:

* would the creator accept the node's attributes (as the TensorRT ONNX parser hands them over: INT -> INT32
  field, FLOAT -> FP32 field)?
* are the output shapes the plugin reports for the node's input shapes the ones the graph declares for its
  outputs (the shapes its consumers were built for)?

The library is `STATICPRUNE_CONTRACT_LIB` when set (any library of plugins/ exports the functions), else the
contract source compiled once with the C++ compiler (g++, or `CXX`) into a cache directory
(`STATICPRUNE_CACHE_DIR`, default ~/.cache/staticprune). Without a compiler the contract is unavailable
(`ContractUnavailable`); the lint then says so instead of checking.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import onnx
from onnx import helper

from staticprune.ops.plugin_nodes import MERGE_OP, UNMERGE_OP

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
CONTRACT_SOURCE = PLUGINS_DIR / "common" / "staticprunePluginContract.cpp"
CONTRACT_HEADERS = [PLUGINS_DIR / "common" / "staticprunePluginContract.h",
                    PLUGINS_DIR / "common" / "staticpruneKernelApi.h"]
MAX_RANK = 8  # STATICPRUNE_CONTRACT_MAX_RANK
PLUGIN_OPS = (MERGE_OP, UNMERGE_OP)
_NB_OUTPUTS = {MERGE_OP: 4, UNMERGE_OP: 1}
# Fields each creator reads, with the ONNX attribute type the parser must find to produce the right field type.
_INT, _FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT
FIELD_TYPES = {
    MERGE_OP: {"r": _INT, "threshold": _FLOAT, "capacity": _INT, "num_prefix": _INT, "inclusive": _INT,
               "absolute_parity": _INT, "kept_by_score": _INT, "threshold_input": _INT},
    UNMERGE_OP: {"to_feature_map": _INT, "grid_h": _INT, "grid_w": _INT},
}
_MESSAGE_SIZE = 512

Shape = tuple[int, ...]  # -1 marks an unknown extent


class ContractUnavailable(RuntimeError):
    """The contract library could not be found or built (the message says why)."""


# ---------------------------------------------------------------------------------------------- the C library


def _cache_dir() -> Path:
    env = os.environ.get("STATICPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "staticprune"


def _source_digest(compiler: str) -> str:
    digest = hashlib.sha256(compiler.encode())
    for path in [CONTRACT_SOURCE, *CONTRACT_HEADERS]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_contract_library(out_dir: Optional[Path] = None) -> Path:
    """Compile the contract source into a shared library (reused while the sources are unchanged)."""
    if not CONTRACT_SOURCE.exists():
        raise ContractUnavailable(f"the contract source {CONTRACT_SOURCE} is missing (plugins/ is not installed)")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise ContractUnavailable("no C++ compiler (g++, or CXX) to build the plugin contract library")
    out_dir = out_dir or _cache_dir()
    lib = out_dir / f"libstaticprune_contract-{_source_digest(compiler)}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, "-std=c++17", "-O1", "-fPIC", "-shared", f"-I{PLUGINS_DIR / 'common'}", str(CONTRACT_SOURCE),
           "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise ContractUnavailable(f"building the plugin contract library failed: {proc.stderr.strip()[:400]}")
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContractUnavailable(f"building the plugin contract library failed: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class ContractLibrary:
    """ctypes view of the contract functions."""

    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise ContractUnavailable(f"cannot load the plugin contract library {path}: {exc}") from None
        i32, i64p, i32p = ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32)
        msg = [ctypes.c_char_p, ctypes.c_size_t]
        try:
            lib.staticprune_plugin_contract_version.argtypes = []
            lib.staticprune_plugin_contract_version.restype = i32
            lib.staticprune_bipartite_merge_out_tokens.argtypes = [i32] * 4
            lib.staticprune_bipartite_merge_out_tokens.restype = i32
            lib.staticprune_bipartite_merge_check_fields.argtypes = [i32, i32, i32, ctypes.c_float] + [i32] * 6 + msg
            lib.staticprune_bipartite_merge_check_fields.restype = i32
            lib.staticprune_bipartite_merge_output_shapes.argtypes = [i32, i32p, i64p] + [i32] * 4 + [i32p, i64p] + msg
            lib.staticprune_bipartite_merge_output_shapes.restype = i32
            lib.staticprune_token_unmerge_check_fields.argtypes = [i32] * 3 + msg
            lib.staticprune_token_unmerge_check_fields.restype = i32
            lib.staticprune_token_unmerge_output_shapes.argtypes = [i32, i32p, i64p] + [i32] * 3 + [i32p, i64p] + msg
            lib.staticprune_token_unmerge_output_shapes.restype = i32
        except AttributeError as exc:
            raise ContractUnavailable(f"{path} lacks the plugin contract functions ({exc})") from None
        self.lib = lib
        self.path = path

    @staticmethod
    def _message() -> ctypes.Array:
        return ctypes.create_string_buffer(_MESSAGE_SIZE)

    def version(self) -> int:
        return self.lib.staticprune_plugin_contract_version()

    def merge_out_tokens(self, tokens: int, num_prefix: int, r: int, capacity: int) -> int:
        return self.lib.staticprune_bipartite_merge_out_tokens(tokens, num_prefix, r, capacity)

    def merge_fields(self, fields: dict) -> Optional[str]:
        """None when StaticPruneBipartiteMerge's creator accepts `fields`, else its reason."""
        msg = self._message()
        has_threshold = "threshold" in fields
        code = self.lib.staticprune_bipartite_merge_check_fields(
            int("r" in fields), int(fields.get("r", -1)), int(has_threshold),
            float(fields["threshold"]) if has_threshold else math.inf, int(fields.get("capacity", 0)),
            int(fields.get("num_prefix", 0)), int(fields.get("inclusive", 0)), int(fields.get("absolute_parity", 0)),
            int(fields.get("kept_by_score", 0)), int(fields.get("threshold_input", 0)), msg, _MESSAGE_SIZE)
        return None if code == 0 else msg.value.decode()

    def unmerge_fields(self, fields: dict) -> Optional[str]:
        msg = self._message()
        code = self.lib.staticprune_token_unmerge_check_fields(
            int(fields.get("to_feature_map", 0)), int(fields.get("grid_h", 0)), int(fields.get("grid_w", 0)),
            msg, _MESSAGE_SIZE)
        return None if code == 0 else msg.value.decode()

    def output_shapes(self, op: str, fields: dict, inputs: Sequence[Shape]) -> list[Shape] | str:
        """The plugin's output shapes for these input shapes, or the reason it refuses them."""
        n = len(inputs)
        if any(len(s) > MAX_RANK for s in inputs):
            return f"an input has rank above {MAX_RANK}"
        ranks = (ctypes.c_int32 * max(n, 1))(*[len(s) for s in inputs])
        dims = (ctypes.c_int64 * (max(n, 1) * MAX_RANK))()
        for i, shape in enumerate(inputs):
            for k, extent in enumerate(shape):
                dims[i * MAX_RANK + k] = extent
        n_out = _NB_OUTPUTS[op]
        out_ranks = (ctypes.c_int32 * n_out)()
        out_dims = (ctypes.c_int64 * (n_out * MAX_RANK))()
        msg = self._message()
        if op == MERGE_OP:
            code = self.lib.staticprune_bipartite_merge_output_shapes(
                n, ranks, dims, int(fields.get("r", -1)), int(fields.get("capacity", 0)),
                int(fields.get("num_prefix", 0)), int(fields.get("threshold_input", 0)), out_ranks, out_dims, msg,
                _MESSAGE_SIZE)
        else:
            code = self.lib.staticprune_token_unmerge_output_shapes(
                n, ranks, dims, int(fields.get("to_feature_map", 0)), int(fields.get("grid_h", 0)),
                int(fields.get("grid_w", 0)), out_ranks, out_dims, msg, _MESSAGE_SIZE)
        if code != 0:
            return msg.value.decode()
        return [tuple(int(out_dims[o * MAX_RANK + k]) for k in range(out_ranks[o])) for o in range(n_out)]


_LIBRARY: Optional[ContractLibrary] = None
_FAILURE: Optional[str] = None


def load_contract() -> ContractLibrary:
    """The contract library (loaded once per process); ContractUnavailable when it cannot be had."""
    global _LIBRARY, _FAILURE
    if _LIBRARY is not None:
        return _LIBRARY
    if _FAILURE is not None:
        raise ContractUnavailable(_FAILURE)
    try:
        explicit = os.environ.get("STATICPRUNE_CONTRACT_LIB")
        _LIBRARY = ContractLibrary(Path(explicit) if explicit else build_contract_library())
    except ContractUnavailable as exc:
        _FAILURE = str(exc)
        raise
    return _LIBRARY


# ---------------------------------------------------------------------------------------------- ONNX nodes


@dataclass
class ContractProblem:
    """One way a plugin node breaks the contract: TensorRT would refuse it, or build a different shape."""

    node: str
    op: str
    message: str


def is_plugin_node(node: onnx.NodeProto) -> bool:
    # The TensorRT ONNX parser looks plugins up by op type, whatever the node's domain.
    return node.op_type in PLUGIN_OPS


def node_fields(node: onnx.NodeProto) -> tuple[dict, list[str]]:
    """The creator's fields as the parser passes them, and the attributes whose ONNX type would be refused."""
    expected = FIELD_TYPES[node.op_type]
    fields, problems = {}, []
    for attr in node.attribute:
        want = expected.get(attr.name)
        if want is None:
            continue  # plugin_version / plugin_namespace select the creator; unknown fields are ignored
        if attr.type != want:
            kind = "INT" if want == _INT else "FLOAT"
            problems.append(f"attribute '{attr.name}' is {onnx.AttributeProto.AttributeType.Name(attr.type)}; "
                            f"the creator reads an {kind} (INT32/FP32 field)")
            continue
        value = helper.get_attribute_value(attr)
        if want == _INT and not -2**31 <= value < 2**31:
            problems.append(f"attribute '{attr.name}' = {value} does not fit the INT32 field")
            continue
        fields[attr.name] = value
    return fields, problems


def check_node(node: onnx.NodeProto, shape_of: Callable[[str], Optional[Shape]],
               contract: Optional[ContractLibrary] = None) -> list[str]:
    """Contract violations of one plugin node (empty: TensorRT's creator and shape rules agree with the graph).

    shape_of(name) gives a tensor's static shape from the graph (-1 for unknown extents), or None if the graph
    declares none. Raises ContractUnavailable when the library cannot be loaded.
    """
    contract = contract or load_contract()
    fields, problems = node_fields(node)
    reason = contract.merge_fields(fields) if node.op_type == MERGE_OP else contract.unmerge_fields(fields)
    if reason:
        problems.append(f"the creator rejects the attributes ({reason}): the parser stops with "
                        "'Could not create the plugin'")
    if problems:
        return problems
    inputs = [name for name in node.input]
    shapes = [shape_of(name) if name else None for name in inputs]
    if any(s is None for s in shapes):
        missing = [name or "<omitted>" for name, s in zip(inputs, shapes) if s is None]
        return [f"no shape known for input(s) {', '.join(missing)}: the output shapes cannot be checked"]
    outputs = contract.output_shapes(node.op_type, fields, shapes)
    if isinstance(outputs, str):
        return [f"the plugin refuses its inputs {_fmt_shapes(shapes)}: {outputs}"]
    if len(node.output) != len(outputs):
        return [f"{len(node.output)} outputs; the plugin has {len(outputs)}"]
    for index, (name, want) in enumerate(zip(node.output, outputs)):
        if not name:
            continue
        declared = shape_of(name)
        if declared is None:
            continue  # nothing in the graph depends on a declared shape there
        if not _same_shape(declared, want):
            problems.append(f"output {index} '{name}' is {_fmt(declared)} in the graph, but the plugin reports "
                            f"{_fmt(want)} for inputs {_fmt_shapes(shapes)}")
    return problems


def _same_shape(declared: Shape, reported: Shape) -> bool:
    return len(declared) == len(reported) and all(a < 0 or b < 0 or a == b for a, b in zip(declared, reported))


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("?" if d < 0 else str(d) for d in shape) + ")"


def _fmt_shapes(shapes: Sequence[Shape]) -> str:
    return ", ".join(_fmt(s) for s in shapes)


def shape_table(model: onnx.ModelProto, infer: bool = True) -> dict[str, Shape]:
    """Static shapes of the model's tensors: initializers, declared value_info and (optionally) ONNX inference."""
    graph = model.graph
    if infer:
        try:
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # inference failures leave the declared shapes
            graph = model.graph
    table: dict[str, Shape] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        shape = type_shape(vi.type)
        if shape is not None:
            table[vi.name] = shape
    for init in model.graph.initializer:
        table[init.name] = tuple(int(d) for d in init.dims)
    return table


def type_shape(tp: onnx.TypeProto) -> Optional[Shape]:
    """The tensor shape of a TypeProto (-1 for symbolic extents), or None when it has no shape."""
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tp.tensor_type.shape.dim)


def check_model(model: onnx.ModelProto, contract: Optional[ContractLibrary] = None) -> list[ContractProblem]:
    """Every contract violation of every plugin node of the model's main graph."""
    nodes = [n for n in model.graph.node if is_plugin_node(n)]
    if not nodes:
        return []
    contract = contract or load_contract()
    table = shape_table(model)
    problems = []
    for node in nodes:
        for message in check_node(node, table.get, contract):
            problems.append(ContractProblem(node.name or node.output[0], node.op_type, message))
    return problems
