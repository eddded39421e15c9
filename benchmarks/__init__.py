"""Speed and memory benchmarks: the training-step harness, its profiler and the planner check."""
