"""The committed apex.v1 stubs are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts/gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_protos)
    fresh = {path.name: path.read_text() for path in gen_protos.generate(tmp_path / "out")}
    committed_dir = ROOT / "apex_grpc/proto"
    committed = {path.name: path.read_text() for path in committed_dir.glob("*_pb2*.py*")}
    assert sorted(fresh) == sorted(committed), "stub files differ: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run scripts/gen_protos.py"


def test_public_names_of_the_contract_exist():
    from apex_grpc.proto import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc

    assert hasattr(generation_pb2_grpc, "GenerationServiceStub")
    assert hasattr(model_pb2_grpc, "ModelServiceStub")
    reasons = {v.name for v in generation_pb2.FinishReason.DESCRIPTOR.values}
    assert reasons == {"FINISH_REASON_UNSPECIFIED", "FINISH_REASON_EOS", "FINISH_REASON_STOP",
                       "FINISH_REASON_LENGTH", "FINISH_REASON_CONTEXT_LIMIT",
                       "FINISH_REASON_TIME_LIMIT", "FINISH_REASON_ABORTED"}
    stats_fields = set(model_pb2.GetStatsResponse.DESCRIPTOR.fields_by_name)
    assert {"num_running", "num_waiting", "num_host_resident", "gpu_kv_used_blocks",
            "gpu_kv_total_blocks", "host_kv_used_blocks", "host_kv_total_blocks",
            "preemptions_total", "evictions_total", "restores_total", "prompt_tokens_total",
            "generation_tokens_total", "steps_gpu_only", "steps_async_overlap",
            "steps_asymmetric_pipeline"} <= stats_fields
