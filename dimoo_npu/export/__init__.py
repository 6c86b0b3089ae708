"""ONNX export of the transformer and the VQ decoder, and their checks in onnxruntime (needs the onnx extra)."""
