"""Plans before hardware: per-rank memory and step time of a training layout, and the memory of sampling.

Everything here is arithmetic on a model config and a run config (no process group, no weights), so a user
can ask "does tp 4 x pp 2 x dp 2 fit 64 GB NPUs" on a laptop. The sharded byte counts are the ones the real
`dimoo_npu.parallel.parallelize` produces (tests/unit/test_plan_simulated_world.py builds them on a fake
process group and compares); the activation formula is fitted to measurement (benchmarks/bench_activations.py).
"""
