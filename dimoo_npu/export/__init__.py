"""ONNX export of the transformer and the VQ decoder (needs the onnx extra); `dimoo_npu.numerics.onnx_check` checks
what it writes."""
