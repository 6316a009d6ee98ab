"""Running exported graphs and engines: ONNX Runtime sessions, TensorRT engines, and the capacity-bucket
dispatcher. Imports neither torch nor onnx, so that it runs on the Jetson image."""
