"""Every numerical comparison: one tolerance table (`tolerances`), layer metrics (`compare`), `dimoo check` across
backends (`backends`, `check`, `report`), ops against their reference (`op_parity`), the model against the public
goldens (`golden`) and exported ONNX files in onnxruntime (`onnx_check`)."""
