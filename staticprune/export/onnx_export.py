"""Export a SegmentationModel to a static ONNX graph, assert its opset, write it atomically."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from staticprune.fileio import make_temp_beside, write_bytes_atomic  # noqa: F401  (write_bytes_atomic re-exported)

MIN_OPSET, MAX_OPSET = 17, 20


class ExportError(RuntimeError):
    """The exporter produced something other than what was asked for."""


@dataclass
class ExportResult:
    model: onnx.ModelProto
    opset: int
    input_names: list[str]
    output_names: list[str]
    nodes: int


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is outside the supported range {MIN_OPSET}-{MAX_OPSET}; use e.g. --opset 17")


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ExportError("the exported graph declares no default-domain opset")


def export_to_proto(
    model: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    opset: int = 17,
    input_names: tuple[str, ...] = ("image",),
    output_names: list[str] | None = None,
    exporter: str = "torchscript",
    slim: bool = True,
    plugins: bool = False,
) -> ExportResult:
    """Trace `model` at the example's fixed shape and return the checked ONNX model (nothing written).

    plugins=True emits the TensorRT plugin graph (staticprune::StaticPrune* nodes) instead of the standard one.
    """
    check_opset(opset)
    if plugins and exporter != "torchscript":
        raise ValueError("the plugin graph is emitted by the torchscript exporter; drop --exporter dynamo")
    from staticprune.ops.plugin_nodes import NAMESPACE, plugin_export
    model = model.eval()
    names = output_names or ["logits"]
    args = example if isinstance(example, tuple) else (example,)  # a tuple: a graph with several inputs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        sink = io.StringIO()
        with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
            warnings.simplefilter("ignore")
            if exporter == "torchscript" and plugins:
                with plugin_export():
                    torch.onnx.export(
                        model, args, path, dynamo=False, opset_version=opset, input_names=list(input_names),
                        output_names=names, do_constant_folding=True, custom_opsets={NAMESPACE: 1},
                    )
            elif exporter == "torchscript":
                torch.onnx.export(
                    model, args, path, dynamo=False, opset_version=opset,
                    input_names=list(input_names), output_names=names, do_constant_folding=True,
                )
            elif exporter == "dynamo":
                torch.onnx.export(
                    model, args, path, dynamo=True, opset_version=opset,
                    input_names=list(input_names), output_names=names, external_data=False,
                )
            else:
                raise ValueError(f"unknown exporter '{exporter}'; use torchscript or dynamo")
        proto = onnx.load(path, load_external_data=True)
    got = default_opset(proto)
    if got != opset:
        # The dynamo exporter has been seen to return opset 18 when 17 was asked for: never trust it.
        raise ExportError(f"asked the {exporter} exporter for opset {opset} but the graph declares opset {got}")
    if slim:
        if plugins:  # onnxslim drops the declared shapes of outputs it renames; the plugin contract needs them
            from staticprune.export.plugin_graph import declare_plugin_output_shapes, plugin_output_shapes
            traced_plugin_shapes = plugin_output_shapes(proto)
        proto = slim_proto(proto)
        if plugins:
            declare_plugin_output_shapes(proto, traced_plugin_shapes)
        if default_opset(proto) != opset:
            raise ExportError(f"onnxslim changed the opset from {opset} to {default_opset(proto)}")
    onnx.checker.check_model(proto, full_check=False)
    return ExportResult(
        model=proto,
        opset=opset,
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        nodes=len(proto.graph.node),
    )


def weightless_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Copy whose large initializers keep their name, type and dims but no data: shape and type inference on it is
    cheap even for ViT-L (small ones are kept: they may feed data propagation)."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    for init in light.graph.initializer:
        if init.ByteSize() > 4096:
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.DEFAULT
            del init.float_data[:]
            init.raw_data = b""
    return light


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes of every tensor, inferred on a weightless copy."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(proto), data_prop=True)
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = [d.dim_value for d in t.shape.dim]
    return shapes


def fold_shape_ops(proto: onnx.ModelProto) -> int:
    """Replace Shape nodes of statically shaped tensors by constants (the TorchScript exporter leaves some)."""
    import numpy as np
    from onnx import helper, numpy_helper

    shapes = _static_shapes(proto)
    replaced = 0
    for node in proto.graph.node:
        if node.op_type != "Shape" or node.input[0] not in shapes:
            continue
        dims = shapes[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        value = np.array(dims[attrs.get("start", 0) : attrs.get("end", len(dims))], dtype=np.int64)
        node.CopyFrom(helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                       value=numpy_helper.from_array(value)))
        replaced += 1
    return replaced


def slim_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold shape arithmetic to constants, then constant-fold and clean up with onnxslim."""
    import onnxslim

    fold_shape_ops(proto)
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        # onnxslim's own shape inference costs 10x the rest on large graphs; shapes are already static here.
        slim = onnxslim.slim(proto, no_shape_infer=True)
    pin_output_shapes(slim)
    return slim


def pin_output_shapes(proto: onnx.ModelProto) -> int:
    """Give graph outputs their inferred static dims where the exporter declared symbolic ones.

    The TorchScript exporter declares a symbolic dim when it loses track of a shape upstream (a computed Expand or
    Pad); the graph is static all the same, and runtimes should be told so.
    """
    shapes = _static_shapes(proto)
    pinned = 0
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        known = shapes.get(out.name)
        if known is None or len(known) != len(dims) or all(d.HasField("dim_value") for d in dims):
            continue
        for d, value in zip(dims, known):
            d.Clear()
            d.dim_value = value
        pinned += 1
    return pinned


def save_atomic(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write next to the target then rename, so a failure never leaves a half-written model."""
    dest = Path(path)
    fd, tmp = make_temp_beside(dest)  # mode 0666 & ~umask, as an ordinary file (mkstemp alone gives 0600)
    os.close(fd)
    try:
        large = proto.ByteSize() > 1_900_000_000
        if large:  # protobuf cannot hold > 2 GB in one file: weights go next to it
            onnx.save_model(proto, tmp, save_as_external_data=True, location=dest.name + ".data")
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest
