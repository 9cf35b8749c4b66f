"""Serve options for the tiny dummy model of the e2e tests (a module of its own: test files
import it by a name no other directory's conftest shares)."""

from __future__ import annotations

from apex_grpc.config import ServeOptions


def tiny_serve_options(config_path: str, **overrides) -> ServeOptions:
    options = dict(load_format="dummy", dummy_config=config_path, device="cpu", dtype="float32",
                   gpu_kv_blocks=128, host_kv_gb=0.01, max_num_seqs=16,
                   cpu_attention_threads=1)
    options.update(overrides)
    return ServeOptions(**options)
