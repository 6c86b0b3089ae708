"""Tensor, pipeline and data parallelism composed onto the plain `DiMOOModel` from outside.

``dims = ParallelDims(pp, dp, tp); mesh = build_mesh(dims, device_type)``, then
``parallelize(model, dims, mesh, ParallelOptions(...), device)`` returns a `ParallelModel` whose
``forward_backward(input_ids, labels)`` runs one optimizer step's micro-batches and returns the loss.
"""

from dimoo_npu.parallel.mesh import ParallelDims, build_mesh
from dimoo_npu.parallel.parallelize import ParallelModel, ParallelOptions, parallelize

__all__ = ["ParallelDims", "ParallelModel", "ParallelOptions", "build_mesh", "parallelize"]
