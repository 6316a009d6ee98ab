"""ONNX export, graph optimisation and target lint."""
