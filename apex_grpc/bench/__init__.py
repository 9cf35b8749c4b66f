"""Benchmark commands (python -m apex_grpc.bench.<name>)."""
