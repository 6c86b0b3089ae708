"""Tensor, pipeline and data parallelism composed onto the plain `DiMOOModel` from outside.

``dims = ParallelDims(pp, dp, tp); mesh = build_mesh(dims, device_type)``, then
``part = parallelize(model, dims, mesh, ParallelOptions(...), device)`` returns the module this rank runs.
The layout comes from `dimoo_npu.train.layout.plan_layout`; `dimoo_npu.train.step.TrainStep` trains ``part``.
"""

from dimoo_npu.parallel.mesh import ParallelDims, build_mesh
from dimoo_npu.parallel.parallelize import ParallelOptions, parallelize

__all__ = ["ParallelDims", "ParallelOptions", "build_mesh", "parallelize"]
