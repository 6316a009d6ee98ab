"""Static lint of an ONNX graph against one TensorRT deployment target (rules per target: docs/foundation.md, Lint targets).

``lint_model(model, target)`` loads the model, runs ONNX shape inference and reports every construct
the target's TensorRT ONNX parser rejects, mis-imports or silently computes wrongly.

Rule ids: opset, forbidden-op, unsupported-op, plugin, plugin-contract, plugin-name-clash, local-function,
dynamic-shape, shape-inference, topk-k, topk-sorted, scatter-reduction, layernorm, cumsum-axis, cumsum-loop,
constant-input, einsum, resize, dtype, int64-io, fp16-decision. (ArgMax/ArgMin select_last_index=1 and Clip
with tensor min/max are imported correctly by the 8.5, 8.6 and 10.x parsers, so neither is a rule.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from staticprune.export.targets import Target, get_target

ERROR = "error"
WARNING = "warning"

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NON_TRT_DOMAINS = ("ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training")

_CONTROL_FLOW = "control flow: unroll loops / resolve branches in Python before export"
_SEQUENTIAL = ("TensorRT runs it as a loop layer, one iteration after another: unroll it in Python before export, "
               "or use a log-step formulation (staticprune.ops.scan for prefix sums)")
# First TensorRT with a cumulative layer (INetworkDefinition::addCumulative); the ONNX parsers before it lower CumSum
# to a Loop with one iteration per element of the summed axis.
_CUMULATIVE_LAYER_SINCE = (10, 8)
_DATA_DEPENDENT = "data-dependent output shape: keep token counts static"
_NO_SEQUENCES = "sequence/optional types are not supported by TensorRT"
_FORBIDDEN_OPS: dict[str, str] = {
    "Loop": _SEQUENTIAL,
    "If": _CONTROL_FLOW,
    "Scan": _SEQUENTIAL,
    "NonZero": _DATA_DEPENDENT,
    "NonMaxSuppression": _DATA_DEPENDENT,
    "Compress": _DATA_DEPENDENT,
    "Unique": "not supported by TensorRT (and data-dependent output shape)",
    "SplitToSequence": _NO_SEQUENCES,
    "ConcatFromSequence": _NO_SEQUENCES,
    "Optional": _NO_SEQUENCES,
    "OptionalGetElement": _NO_SEQUENCES,
    "OptionalHasElement": _NO_SEQUENCES,
}

_RESIZE_COORD_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
_STRIP_ABOVE_BYTES = 1 << 20  # initializers larger than this are shape-inferred without their data
_FOLD_MAX_ELEMENTS = 1 << 16  # only shape-sized computations are folded
_FOLD_ROUNDS = 8
_SHAPE_TENSOR_MAX = 64  # inputs this small are shape arithmetic, safe to evaluate without a known output
_VALUE_SIZED_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "EyeLike", "OneHot", "Resize",
                              "Upsample", "Pad"})


@dataclass
class Violation:
    """One finding: which rule, where (node name or tensor name), which op, and why."""

    rule: str
    node: str
    op: str
    message: str
    severity: str = ERROR


@dataclass
class LintReport:
    """All findings of one lint run."""

    target: str
    opset: int
    violations: list[Violation] = field(default_factory=list)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == ERROR]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {
            "target": self.target,
            "opset": self.opset,
            "ok": self.ok,
            "num_errors": len(self.errors),
            "num_warnings": len(self.warnings),
            "violations": [asdict(v) for v in self.violations],
        }

    def format(self) -> str:
        """Readable table, errors first, one line per violation."""
        head = (f"lint target={self.target} opset={self.opset}: "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        if not self.violations:
            return head + " - OK"
        rows = [(v.severity, v.rule, v.node or "-", v.op or "-", v.message)
                for v in sorted(self.violations, key=lambda v: v.severity != ERROR)]
        header = ("SEVERITY", "RULE", "NODE", "OP", "MESSAGE")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        lines = [head]
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        return "\n".join(lines)


@dataclass(frozen=True)
class _NodeRef:
    node: onnx.NodeProto
    path: str  # display name, prefixed with the owning node / function for nested graphs


@dataclass
class _Context:
    target: Target
    opset: int
    base_dir: str
    consts: dict[str, onnx.TensorProto]
    aliases: dict[str, str]
    types: dict[str, onnx.TypeProto]
    producers: dict[str, onnx.NodeProto]
    functions: set[tuple[str, str]]
    folded: dict[str, np.ndarray]
    violations: list[Violation] = field(default_factory=list)

    def add(self, rule: str, node: str, op: str, message: str, severity: str = ERROR) -> None:
        self.violations.append(Violation(rule, node, op, message, severity))


# ----------------------------------------------------------------------------------------------
# public entry point


def lint_model(model: onnx.ModelProto | str | os.PathLike, target: str) -> LintReport:
    """Lint ``model`` (a ModelProto or a path; external data allowed) for the named target."""
    tgt = get_target(target)
    model, base_dir = _load(model)
    opset = _default_opset(model)
    inference = _infer_shapes(model, opset, base_dir)
    inferred = inference.model
    ctx = _build_context(tgt, opset, base_dir, model, inference)

    _check_opset(ctx)
    if inference.error:
        ctx.add("shape-inference", "", "", f"ONNX shape inference failed ({inference.error}); "
                "static-shape checks used the declared shapes only", WARNING)
    for ref in _walk_model(model):
        _check_node(ctx, ref)
    _check_io_shapes(ctx, model.graph, inferred.graph)
    _check_value_info_shapes(ctx, model.graph, inferred.graph)
    _check_dtypes(ctx, model, inferred.graph)
    _check_fp16_decisions(ctx, model, inferred.graph)
    return LintReport(target=tgt.name, opset=opset, violations=ctx.violations)


def _check_fp16_decisions(ctx: _Context, model: onnx.ModelProto, inferred: onnx.GraphProto) -> None:
    """Mixed-precision graphs: nothing discrete (comparisons, ranks, counts, indices) may be computed in FP16."""
    from staticprune.export.precision_check import fp16_decision_problems

    for node, op, message in fp16_decision_problems(model, inferred):
        ctx.add("fp16-decision", node, op, message)


# ----------------------------------------------------------------------------------------------
# loading and context


def _load(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """Return the model and the directory its external data lives in.

    From a path, weights stored as external data are left on disk; the few small tensors the lint
    needs (TopK K, CumSum axis, ...) are read on demand.
    """
    if isinstance(model, onnx.ModelProto):
        return model, ""
    path = os.fspath(model)
    return onnx.load(path, load_external_data=False), os.path.dirname(os.path.abspath(path))


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return 0


@dataclass
class _Inference:
    model: onnx.ModelProto  # shape-inferred skeleton, or the model itself when inference failed
    folded: dict[str, np.ndarray]  # main-graph tensors whose values are known at build time
    error: str = ""


def _infer_shapes(model: onnx.ModelProto, opset: int, base_dir: str) -> _Inference:
    """Shape-inferred skeleton of the model (with the values folded on the way), or the model itself
    and the error text when inference fails.

    ONNX inference alone leaves exporter shape arithmetic (Shape -> Gather -> Mod -> Slice ...) unknown,
    although TensorRT resolves it at build time for static inputs. So each round folds the small
    shape computations whose inputs are known into Constant nodes and infers again.
    """
    skeleton, folded = _skeleton(model), {}
    try:
        inferred = _infer(skeleton)
    except Exception as exc:  # onnx raises several types (InferenceError, ValueError, RuntimeError)
        return _Inference(model, folded, f"{type(exc).__name__}: {exc}".splitlines()[0])
    for _ in range(_FOLD_ROUNDS):
        try:
            if not _fold_round(skeleton, inferred, opset, base_dir, folded):
                break
            inferred = _infer(skeleton)
        except Exception:  # keep the last successful inference
            break
    return _Inference(inferred, folded)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """Structural copy of the model whose big weights are marked external (shape only), so that shape
    inference and folding neither copy them nor hit the 2 GiB protobuf limit."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, copy = model.graph, skeleton.graph
    copy.name = graph.name
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(copy, field_name).extend(getattr(graph, field_name))
    copy.initializer.extend(_shape_only(init) for init in graph.initializer)
    return skeleton


def _shape_only(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor itself when small, else a data-less stand-in with the same name, type and dims."""
    if tensor.ByteSize() <= _STRIP_ABOVE_BYTES:
        return tensor
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                            data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value="__weights_not_loaded_for_shape_inference__")
    return stub


def _fold_round(skeleton: onnx.ModelProto, inferred: onnx.ModelProto, opset: int, base_dir: str,
                folded: dict[str, np.ndarray]) -> bool:
    """Replace every foldable main-graph node by a Constant (recording its value in ``folded``);
    return whether any was replaced."""
    values = _known_values(skeleton.graph, base_dir)
    types = {vi.name: vi.type for vi in _value_infos(inferred.graph)}
    changed = False
    for node in skeleton.graph.node:
        if not _foldable(node):
            continue
        value = _fold_node(node, values, types, opset)
        if value is None:
            continue
        name = node.output[0]
        values[name] = folded[name] = value
        node.CopyFrom(onnx.helper.make_node("Constant", [], [name], name=node.name,
                                            value=numpy_helper.from_array(value, name)))
        changed = True
    return changed


def _known_values(graph: onnx.GraphProto, base_dir: str) -> dict[str, np.ndarray]:
    """Values of the small initializers and Constant outputs of ``graph``."""
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            tensor = _constant_tensor(node)
            if tensor is not None:
                tensors[node.output[0]] = tensor
    values: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if _numel(tensor.dims) > _FOLD_MAX_ELEMENTS:
            continue
        try:
            values[name] = numpy_helper.to_array(tensor, base_dir=base_dir)
        except Exception:  # stripped or unreadable data
            continue
    return values


def _numel(dims) -> int:
    return int(np.prod(list(dims), dtype=np.int64)) if len(dims) else 1


def _foldable(node: onnx.NodeProto) -> bool:
    return (node.domain in _DEFAULT_DOMAINS and len(node.output) == 1 and bool(node.output[0])
            and node.op_type != "Constant" and not node.op_type.startswith("Random")
            and not _forbidden_reason(node.op_type) and next(_subgraphs(node), None) is None)


def _fold_node(node: onnx.NodeProto, values: dict[str, np.ndarray], types: dict[str, onnx.TypeProto],
               opset: int) -> np.ndarray | None:
    """Value of the node's single output if it can be computed now and is small, else None."""
    if node.op_type in ("Shape", "Size"):
        return _shape_op_value(node, types.get(node.input[0]))
    names = [n for n in node.input if n]
    if not names or any(n not in values for n in names) or not _bounded_output(node, values, types):
        return None
    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
        result = np.asarray(evaluator.run(None, {n: values[n] for n in names})[0])
    except Exception:  # the reference runtime lacks the op or rejects the inputs: leave it to TensorRT
        return None
    return result if result.size <= _FOLD_MAX_ELEMENTS else None


def _bounded_output(node: onnx.NodeProto, values: dict[str, np.ndarray],
                    types: dict[str, onnx.TypeProto]) -> bool:
    """Whether evaluating the node cannot allocate a big tensor: its inferred output is small, or it is
    not sized by an input's value and all its inputs are shape-sized."""
    tp = types.get(node.output[0])
    if _has_shape(tp) and _is_static(tp, allow_empty=True):
        return _numel([d.dim_value for d in tp.tensor_type.shape.dim]) <= _FOLD_MAX_ELEMENTS
    return (node.op_type not in _VALUE_SIZED_OPS
            and all(values[n].size <= _SHAPE_TENSOR_MAX for n in node.input if n))


def _shape_op_value(node: onnx.NodeProto, tp: onnx.TypeProto | None) -> np.ndarray | None:
    if not _has_shape(tp) or not _is_static(tp, allow_empty=True):
        return None
    dims = np.array([d.dim_value for d in tp.tensor_type.shape.dim], dtype=np.int64)
    if node.op_type == "Size":
        return np.array(np.prod(dims), dtype=np.int64)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return dims[start:end]


def _build_context(tgt: Target, opset: int, base_dir: str, model: onnx.ModelProto,
                   inference: _Inference) -> _Context:
    consts: dict[str, onnx.TensorProto] = {}
    aliases: dict[str, str] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for graph in _all_graphs(model.graph):
        for init in graph.initializer:
            consts[init.name] = init
    for ref in _walk_model(model):
        node = ref.node
        for out in node.output:
            if out:
                producers.setdefault(out, node)
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            tensor = _constant_tensor(node)
            if tensor is not None:
                consts[node.output[0]] = tensor
        if node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS and node.input:
            aliases[node.output[0]] = node.input[0]
    types = {vi.name: vi.type for vi in _value_infos(inference.model.graph)}
    functions = {(f.domain, f.name) for f in model.functions}
    return _Context(tgt, opset, base_dir, consts, aliases, types, producers, functions, inference.folded)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """Tensor held by a Constant node, whatever attribute spells it."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return onnx.helper.make_tensor("", onnx.TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return onnx.helper.make_tensor("", onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
        if attr.name == "value_int":
            return onnx.helper.make_tensor("", onnx.TensorProto.INT64, [], [attr.i])
        if attr.name == "value_ints":
            return onnx.helper.make_tensor("", onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    return None


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from graph.input
    yield from graph.value_info
    yield from graph.output


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for _, sub in _subgraphs(node):
            yield from _all_graphs(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) for every graph-valued attribute (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for sub in attr.graphs:
                yield attr.name, sub


def _walk_model(model: onnx.ModelProto) -> Iterator[_NodeRef]:
    """Every node: main graph, nested subgraphs, and local function bodies."""
    yield from _walk_nodes(model.graph.node, "")
    for func in model.functions:
        yield from _walk_nodes(func.node, f"{func.domain}.{func.name}/")


def _walk_nodes(nodes: Iterable[onnx.NodeProto], prefix: str) -> Iterator[_NodeRef]:
    for node in nodes:
        path = prefix + _node_label(node)
        yield _NodeRef(node, path)
        for attr_name, sub in _subgraphs(node):
            yield from _walk_nodes(sub.node, f"{path}/{attr_name}/")


def _node_label(node: onnx.NodeProto) -> str:
    """The node's name, or a readable stand-in for unnamed nodes."""
    if node.name:
        return node.name
    first_output = node.output[0] if node.output else "?"
    return f"<{node.op_type} -> {first_output}>"


def _const_value(ctx: _Context, name: str) -> np.ndarray | None:
    """Value of a tensor that is an initializer or Constant output (through Identity), else None."""
    tensor = ctx.consts.get(_resolve_alias(ctx, name))
    if tensor is None:
        return None
    try:
        return numpy_helper.to_array(tensor, base_dir=ctx.base_dir)
    except Exception:  # unreadable external data: treat as "not known statically"
        return None


def _resolve_alias(ctx: _Context, name: str) -> str:
    """Follow Identity nodes back to the tensor they copy."""
    seen: set[str] = set()
    while name in ctx.aliases and name not in seen:
        seen.add(name)
        name = ctx.aliases[name]
    return name


def _is_const(ctx: _Context, name: str) -> bool:
    return _resolve_alias(ctx, name) in ctx.consts


def _elem_type(ctx: _Context, name: str) -> int | None:
    tensor = ctx.consts.get(_resolve_alias(ctx, name))
    if tensor is not None:
        return tensor.data_type
    tp = ctx.types.get(name)
    if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.elem_type:
        return tp.tensor_type.elem_type
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, index: int) -> str:
    """Name of input ``index``, or '' when absent / omitted."""
    return node.input[index] if index < len(node.input) else ""


# ----------------------------------------------------------------------------------------------
# graph-level checks


def _check_opset(ctx: _Context) -> None:
    tgt = ctx.target
    if ctx.opset == 0:
        ctx.add("opset", "", "", "model has no default-domain ('' / 'ai.onnx') opset import")
    elif ctx.opset > tgt.max_opset:
        ctx.add("opset", "", "", f"opset {ctx.opset} is above the ceiling {tgt.max_opset} of TensorRT "
                f"{tgt.trt_version} ({tgt.name}); re-export with opset <= {tgt.max_opset}")
    elif ctx.opset < tgt.min_opset:
        ctx.add("opset", "", "", f"opset {ctx.opset} is below the floor {tgt.min_opset} of TensorRT "
                f"{tgt.trt_version} ({tgt.name})")


def _dims_text(tp: onnx.TypeProto) -> str:
    dims = tp.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in dims) + "]"


def _has_shape(tp: onnx.TypeProto | None) -> bool:
    return tp is not None and tp.HasField("tensor_type") and tp.tensor_type.HasField("shape")


def _is_static(tp: onnx.TypeProto, allow_empty: bool = False) -> bool:
    """All dims known (and > 0 unless ``allow_empty``: empty intermediates are legal in TensorRT)."""
    lowest = 0 if allow_empty else 1
    return all(d.HasField("dim_value") and d.dim_value >= lowest for d in tp.tensor_type.shape.dim)


def _check_io_shapes(ctx: _Context, graph: onnx.GraphProto, inferred: onnx.GraphProto) -> None:
    initializers = {init.name for init in graph.initializer}
    for vi in graph.input:
        if vi.name in initializers:
            continue
        if not _has_shape(vi.type):
            ctx.add("dynamic-shape", vi.name, "", f"graph input '{vi.name}' declares no shape; "
                    "TensorRT engines here use fully static input shapes")
        elif not _is_static(vi.type):
            ctx.add("dynamic-shape", vi.name, "", f"graph input '{vi.name}' has non-static dims "
                    f"{_dims_text(vi.type)}; export with fixed dims (batch included)")
    inferred_out = {vi.name: vi.type for vi in inferred.output}
    for vi in graph.output:
        tp = vi.type if _has_shape(vi.type) else inferred_out.get(vi.name)
        if not _has_shape(tp):
            ctx.add("dynamic-shape", vi.name, "", f"graph output '{vi.name}' has no shape information; "
                    "cannot verify it is static", WARNING)
        elif not _is_static(tp):
            ctx.add("dynamic-shape", vi.name, "", f"graph output '{vi.name}' has non-static dims "
                    f"{_dims_text(tp)}")


def _check_value_info_shapes(ctx: _Context, graph: onnx.GraphProto, inferred: onnx.GraphProto) -> None:
    """Intermediate tensors with unknown dims; dims named after a symbolic graph-input dim are skipped
    because the input itself is already reported."""
    io_names = {vi.name for vi in graph.input} | {vi.name for vi in graph.output}
    input_params = {d.dim_param for vi in graph.input if _has_shape(vi.type)
                    for d in vi.type.tensor_type.shape.dim if d.dim_param}
    for vi in inferred.value_info:
        if vi.name in io_names or not _has_shape(vi.type):
            continue
        unknown = [d for d in vi.type.tensor_type.shape.dim if not d.HasField("dim_value")]
        if not unknown or all(d.dim_param in input_params for d in unknown):
            continue
        node = ctx.producers.get(vi.name)
        label, op = (_node_label(node), node.op_type) if node is not None else (vi.name, "")
        ctx.add("dynamic-shape", label, op, f"tensor '{vi.name}' has non-static inferred dims "
                f"{_dims_text(vi.type)}: a data-dependent or symbolic shape")


def _check_dtypes(ctx: _Context, model: onnx.ModelProto, inferred: onnx.GraphProto) -> None:
    seen: set[str] = set()
    graph = model.graph
    for init in graph.initializer:
        _check_dtype(ctx, init.name, init.data_type, "initializer", init.name, "", seen)
    initializers = {init.name for init in graph.initializer}
    for vi in [*graph.input, *graph.output]:
        _check_dtype(ctx, vi.name, vi.type.tensor_type.elem_type, "graph I/O tensor", vi.name, "", seen)
        if vi.name not in initializers:
            _check_int64_io(ctx, vi)
    for ref in _walk_model(model):
        if ref.node.op_type == "Constant" and ref.node.output:
            tensor = _constant_tensor(ref.node)
            if tensor is not None:
                _check_dtype(ctx, ref.node.output[0], tensor.data_type, "Constant", ref.path, "Constant", seen)
    for vi in inferred.value_info:
        node = ctx.producers.get(vi.name)
        label, op = (_node_label(node), node.op_type) if node is not None else (vi.name, "")
        _check_dtype(ctx, vi.name, vi.type.tensor_type.elem_type, "tensor", label, op, seen)


def _check_dtype(ctx: _Context, name: str, elem_type: int, kind: str, node: str, op: str,
                 seen: set[str]) -> None:
    if not elem_type or name in seen:
        return
    try:
        type_name = onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:  # an element type newer than this onnx package
        return
    if type_name not in ctx.target.unsupported_dtypes:
        return
    seen.add(name)
    hint = "TensorRT has no float64: cast to float32 before export" if type_name == "DOUBLE" else (
        f"not supported by TensorRT {ctx.target.trt_version} on {ctx.target.name}")
    ctx.add("dtype", node, op, f"{kind} '{name}' is {type_name}: {hint}")


def _check_int64_io(ctx: _Context, vi: onnx.ValueInfoProto) -> None:
    if ctx.target.native_int64 or vi.type.tensor_type.elem_type != onnx.TensorProto.INT64:
        return
    ctx.add("int64-io", vi.name, "", f"graph I/O '{vi.name}' is INT64; TensorRT {ctx.target.trt_version} "
            "has no INT64 tensors: cast to INT32 in the graph", WARNING)


# ----------------------------------------------------------------------------------------------
# node checks


def _check_node(ctx: _Context, ref: _NodeRef) -> None:
    node = ref.node
    if node.domain not in _DEFAULT_DOMAINS:
        _check_custom_op(ctx, ref)
        return
    reason = _forbidden_reason(node.op_type)
    if reason:
        if node.op_type == "If" and _input(node, 0) in ctx.folded:
            reason += ("; its condition is a build-time constant, so constant folding (onnxslim, polygraphy "
                       "surgeon sanitize --fold-constants) removes it")
        ctx.add("forbidden-op", ref.path, node.op_type, f"{node.op_type} is not allowed: {reason}")
        return
    if node.op_type not in ctx.target.supported_ops and node.op_type != "LayerNormalization":
        ctx.add("unsupported-op", ref.path, node.op_type, f"{node.op_type} is not supported by the "
                f"TensorRT {ctx.target.trt_version} ONNX parser ({ctx.target.ops_source})")
        return
    _check_constant_inputs(ctx, ref)
    check = _NODE_CHECKS.get(node.op_type)
    if check is not None:
        check(ctx, ref)


def _forbidden_reason(op_type: str) -> str:
    if op_type.startswith("Sequence"):
        return _NO_SEQUENCES
    return _FORBIDDEN_OPS.get(op_type, "")


def _check_custom_op(ctx: _Context, ref: _NodeRef) -> None:
    node, tgt = ref.node, ctx.target
    if node.domain in _NON_TRT_DOMAINS:
        ctx.add("forbidden-op", ref.path, node.op_type, f"domain '{node.domain}' ops are not supported by TensorRT")
        return
    if node.op_type in tgt.supported_ops:
        ctx.add("plugin-name-clash", ref.path, node.op_type, f"custom op '{node.domain}::{node.op_type}' has the "
                f"name of a built-in ONNX op; TensorRT {tgt.trt_version} dispatches on op type alone and would "
                "import it as the built-in op: rename it")
        return
    if (node.domain, node.op_type) in ctx.functions:
        _check_local_function_call(ctx, ref)
        return
    _check_plugin_attrs(ctx, ref)
    _check_plugin_contract(ctx, ref)


def _check_local_function_call(ctx: _Context, ref: _NodeRef) -> None:
    if ctx.target.supports_local_functions:
        return
    ctx.add("local-function", ref.path, ref.node.op_type, f"call of ONNX local function "
            f"'{ref.node.domain}::{ref.node.op_type}': TensorRT {ctx.target.trt_version} imports no local "
            "functions (it would look for a plugin): inline them (onnx.inliner.inline_local_functions)")


def _check_plugin_attrs(ctx: _Context, ref: _NodeRef) -> None:
    node = ref.node
    missing = [a for a in ("plugin_version", "plugin_namespace") if _attr(node, a) is None]
    where = f"TensorRT plugin '{node.op_type}' (domain '{node.domain}')"
    if missing:
        message = (f"{where}: missing attribute(s) {', '.join(missing)}; the parser falls back to "
                   "version '1' / namespace ''")
    else:
        message = (f"{where} version {_attr(node, 'plugin_version')!r} namespace "
                   f"{_attr(node, 'plugin_namespace')!r}: its library must be loaded before parsing")
    ctx.add("plugin", ref.path, node.op_type, message, WARNING)


def _check_plugin_contract(ctx: _Context, ref: _NodeRef) -> None:
    """A StaticPrune* plugin node against the plugins' own C rules (plugins/common/staticprunePluginContract.h):
    attributes the creator would reject, or output shapes that differ from what the graph declares (what the
    consumers were built for), are errors, because TensorRT would refuse the node or build another network."""
    from staticprune.export.plugin_contract import ContractUnavailable, check_node, is_plugin_node, type_shape

    node = ref.node
    if not is_plugin_node(node):
        return

    def shape_of(name: str) -> tuple[int, ...] | None:
        tp = ctx.types.get(name)
        shape = type_shape(tp) if tp is not None else None
        if shape is None and _resolve_alias(ctx, name) in ctx.consts:
            shape = tuple(int(d) for d in ctx.consts[_resolve_alias(ctx, name)].dims)
        return shape

    try:
        problems = check_node(node, shape_of)
    except ContractUnavailable as exc:
        if not any(v.rule == "plugin-contract" for v in ctx.violations):
            ctx.add("plugin-contract", ref.path, node.op_type, f"plugin contract not checked: {exc}", WARNING)
        return
    for problem in problems:
        ctx.add("plugin-contract", ref.path, node.op_type, f"TensorRT plugin '{node.op_type}': {problem}")


def _check_constant_inputs(ctx: _Context, ref: _NodeRef) -> None:
    node = ref.node
    for index, input_name in ctx.target.constant_inputs.get(node.op_type, {}).items():
        name = _input(node, index)
        if name and not _is_const(ctx, name):
            ctx.add("constant-input", ref.path, node.op_type, f"input '{input_name}' ({name}) of {node.op_type} "
                    f"must be an initializer or Constant for TensorRT {ctx.target.trt_version}")


def _check_topk(ctx: _Context, ref: _NodeRef) -> None:
    node, tgt = ref.node, ctx.target
    k, source = _topk_k(ctx, node)
    if source != "constant" and tgt.topk_k_must_be_initializer:
        ctx.add("topk-k", ref.path, "TopK", f"K is computed in the graph; TensorRT {tgt.trt_version} requires K "
                "to be an initializer (fold constants before export, e.g. polygraphy surgeon sanitize "
                "--fold-constants)")
    elif k is None:
        ctx.add("topk-k", ref.path, "TopK", f"K is not known statically; TensorRT {tgt.trt_version} fails at "
                f"runtime if K > {tgt.topk_max_k}", WARNING)
    if k is not None and k > tgt.topk_max_k:
        ctx.add("topk-k", ref.path, "TopK", f"K={k} exceeds the TensorRT limit K <= {tgt.topk_max_k}: "
                "split the sort into chunks or move it into a plugin")
    if tgt.topk_requires_sorted and _attr(node, "sorted", 1) == 0:
        ctx.add("topk-sorted", ref.path, "TopK", f"sorted=0: the TensorRT {tgt.trt_version} parser requires "
                "sorted=1")


def _topk_k(ctx: _Context, node: onnx.NodeProto) -> tuple[int | None, str]:
    """K and where it came from: 'constant' (attribute, initializer or Constant) or 'graph' (computed;
    K is then its folded value or the inferred output dim, None when neither is static)."""
    if ctx.opset < 10:
        return _attr(node, "k"), "constant"
    value = _const_value(ctx, _input(node, 1))
    if value is not None and value.size == 1:
        return int(value.reshape(-1)[0]), "constant"
    value = ctx.folded.get(_input(node, 1))
    if value is not None and value.size == 1:
        return int(value.reshape(-1)[0]), "graph"
    return _static_dim(ctx, node.output[0] if node.output else "", _attr(node, "axis", -1)), "graph"


def _static_dim(ctx: _Context, name: str, axis: int) -> int | None:
    tp = ctx.types.get(name)
    if not _has_shape(tp):
        return None
    dims = tp.tensor_type.shape.dim
    if not -len(dims) <= axis < len(dims):
        return None
    dim = dims[axis]
    return dim.dim_value if dim.HasField("dim_value") else None


def _check_scatter_elements(ctx: _Context, ref: _NodeRef) -> None:
    node, tgt = ref.node, ctx.target
    reduction = _attr(node, "reduction", "none")
    if reduction == "none":
        return
    if not tgt.scatter_reduction:
        ctx.add("scatter-reduction", ref.path, node.op_type, f"reduction='{reduction}' is silently ignored by "
                f"TensorRT {tgt.trt_version}: wrong results (the scatter becomes an overwrite)")
    elif _elem_type(ctx, _input(node, 1)) == onnx.TensorProto.INT32:
        ctx.add("scatter-reduction", ref.path, node.op_type, f"reduction='{reduction}' runs through the "
                f"libnvinfer_plugin ScatterElements plugin on TensorRT {tgt.trt_version}, which accepts only "
                "INT64 indices; these indices are INT32")
    else:
        ctx.add("scatter-reduction", ref.path, node.op_type, f"reduction='{reduction}' needs the "
                "libnvinfer_plugin ScatterElements plugin (initLibNvInferPlugins) and INT64 indices", WARNING)


def _check_scatter_nd(ctx: _Context, ref: _NodeRef) -> None:
    reduction = _attr(ref.node, "reduction")
    if reduction is None:
        return
    ctx.add("scatter-reduction", ref.path, "ScatterND", f"ScatterND with a reduction attribute "
            f"(reduction='{reduction}') is unsupported by every TensorRT version (TensorRT 10 rejects the "
            "attribute even when it is 'none'): drop the attribute / use plain assignment")


def _check_layernorm(ctx: _Context, ref: _NodeRef) -> None:
    node, tgt = ref.node, ctx.target
    if not tgt.supports_layernorm:
        ctx.add("layernorm", ref.path, node.op_type, f"TensorRT {tgt.trt_version} has no LayerNormalization "
                f"importer: export for target '{tgt.name}' with a decomposed LayerNorm "
                "(ReduceMean/Sub/Pow/Sqrt/Div), which TensorRT fuses")
    elif any(node.output[1:]):
        ctx.add("layernorm", ref.path, node.op_type, "only the first LayerNormalization output (Y) is supported; "
                "remove the Mean / InvStdDev outputs")


def _check_cumsum(ctx: _Context, ref: _NodeRef) -> None:
    name = _input(ref.node, 1)
    if not _is_const(ctx, name):
        ctx.add("cumsum-axis", ref.path, "CumSum", f"CumSum axis ({name or 'missing'}) must be an initializer "
                "or Constant")
    tgt = ctx.target
    if _version_tuple(tgt.trt_version) >= _CUMULATIVE_LAYER_SINCE:
        return
    value = _const_value(ctx, name)
    axis = int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None
    length = None if axis is None else _static_dim(ctx, _input(ref.node, 0), axis)
    where = "an unknown axis" if axis is None else f"axis {axis}"
    trips = "one iteration per element" if length is None else f"trip count {length}"
    ctx.add("cumsum-loop", ref.path, "CumSum", f"CumSum along {where} becomes a sequential Loop ({trips}) in the "
            f"TensorRT {tgt.trt_version} ONNX parser (a cumulative layer exists only from TensorRT 10.8): use the "
            "INT32 log-step scan of staticprune.ops.scan (Slice/Concat/Add)")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _check_einsum(ctx: _Context, ref: _NodeRef) -> None:
    if not ctx.target.einsum_restricted:
        return
    equation = str(_attr(ref.node, "equation", "")).replace(" ", "")
    operands = equation.split("->")[0].split(",")
    version = ctx.target.trt_version
    if "..." in equation:
        ctx.add("einsum", ref.path, "Einsum", f"equation '{equation}' uses an ellipsis, unsupported by TensorRT "
                f"{version}: rewrite as MatMul/Transpose")
    elif any(len(set(term)) != len(term) for term in operands):
        ctx.add("einsum", ref.path, "Einsum", f"equation '{equation}' takes a diagonal, unsupported by TensorRT "
                f"{version}: rewrite as MatMul/Transpose")
    else:
        ctx.add("einsum", ref.path, "Einsum", f"TensorRT {version} Einsum does not broadcast between inputs and "
                "has no ellipsis/diagonal support; prefer MatMul/Transpose", WARNING)


def _check_resize(ctx: _Context, ref: _NodeRef) -> None:
    node = ref.node
    coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if coord not in _RESIZE_COORD_MODES:
        ctx.add("resize", ref.path, "Resize", f"coordinate_transformation_mode='{coord}' is not supported "
                f"(supported: {', '.join(_RESIZE_COORD_MODES)})")
    if _attr(node, "antialias", 0):
        ctx.add("resize", ref.path, "Resize", "antialias=1 is not supported by TensorRT")
    policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        ctx.add("resize", ref.path, "Resize", f"keep_aspect_ratio_policy='{policy}' is not supported "
                "(only 'stretch')")
    if _attr(node, "mode", "nearest") == "cubic":
        ctx.add("resize", ref.path, "Resize", "mode='cubic' is not in the documented Resize modes (nearest, "
                "linear) although the parser source maps it to cubic: check the result numerically", WARNING)


_NODE_CHECKS: dict[str, Callable[[_Context, _NodeRef], None]] = {
    "TopK": _check_topk,
    "ScatterElements": _check_scatter_elements,
    "ScatterND": _check_scatter_nd,
    "LayerNormalization": _check_layernorm,
    "CumSum": _check_cumsum,
    "Einsum": _check_einsum,
    "Resize": _check_resize,
}
