"""The performance model: its tables (perf_model), the profiler that measures them, the shipped
profiles, and the simulator that runs the real scheduler against a profile in simulated time."""
