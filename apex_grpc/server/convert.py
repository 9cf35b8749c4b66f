"""Conversions from engine-side types to apex.v1 response messages.

Owns the mapping RequestOutput -> GenerateResponse (streamed deltas and the merged unary
result) and the introspection messages of ModelService (model info, server info, stats).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import apex_grpc
from apex_grpc.engine.protocol import EngineClient, EngineStats
from apex_grpc.proto import generation_pb2, model_pb2
from apex_grpc.request import FinishReason, RequestOutput, TokenLogprob


@dataclasses.dataclass(frozen=True)
class ResponseOptions:
    """What the client asked to get back besides text."""

    request_id: str
    return_token_ids: bool
    return_logprobs: bool


def _token_text(tokenizer: Any, token_id: int) -> str:
    """Display text of a token; "" without a tokenizer or for ids it does not know (the
    model's embedding table may be padded past the tokenizer's vocabulary)."""
    if tokenizer is None:
        return ""
    try:
        return tokenizer.id_to_token(token_id)
    except (ValueError, IndexError, KeyError):
        return ""


def _logprob_messages(tokenizer: Any,
                      logprobs: list[TokenLogprob]) -> list[generation_pb2.TokenLogprob]:
    messages = []
    for entry in logprobs:
        top = [generation_pb2.TopLogprob(token_id=token_id, logprob=logprob,
                                         token=_token_text(tokenizer, token_id))
               for token_id, logprob in entry.top]
        messages.append(generation_pb2.TokenLogprob(
            token_id=entry.token_id, logprob=entry.logprob,
            token=_token_text(tokenizer, entry.token_id), top=top))
    return messages


def _set_final_fields(response: generation_pb2.GenerateResponse, last: RequestOutput) -> None:
    response.finish_reason = int(last.finish_reason)
    response.matched_stop = last.matched_stop
    response.usage.prompt_tokens = last.prompt_tokens
    response.usage.completion_tokens = last.completion_tokens
    response.timing.queue_ms = last.queue_ms
    response.timing.ttft_ms = last.ttft_ms
    response.timing.decode_ms = last.decode_ms
    response.timing.num_preemptions = last.num_preemptions


def stream_response(output: RequestOutput, options: ResponseOptions,
                    tokenizer: Any) -> generation_pb2.GenerateResponse:
    """One streamed message: the delta of one engine output (finish fields on the last)."""
    response = generation_pb2.GenerateResponse(request_id=options.request_id, text=output.text)
    if options.return_token_ids:
        response.token_ids.extend(output.token_ids)
    if options.return_logprobs:
        response.logprobs.extend(_logprob_messages(tokenizer, output.logprobs))
    if output.finished:
        _set_final_fields(response, output)
    return response


def unary_response(outputs: list[RequestOutput], options: ResponseOptions,
                   tokenizer: Any) -> generation_pb2.GenerateResponse:
    """The whole result: the concatenation of all deltas, finish fields from the last output."""
    response = generation_pb2.GenerateResponse(
        request_id=options.request_id, text="".join(out.text for out in outputs))
    for output in outputs:
        if options.return_token_ids:
            response.token_ids.extend(output.token_ids)
        if options.return_logprobs:
            response.logprobs.extend(_logprob_messages(tokenizer, output.logprobs))
    _set_final_fields(response, outputs[-1])
    return response


def finish_reason_name(reason: FinishReason) -> str:
    """Lower-case label used in metrics and logs ("eos", "stop", ...)."""
    return reason.name.lower()


def stats_response(stats: EngineStats, block_size: int,
                   num_active_streams: int) -> model_pb2.GetStatsResponse:
    # EngineStats field names match the message's by contract, so the copy is by name.
    response = model_pb2.GetStatsResponse(**dataclasses.asdict(stats))
    response.load.CopyFrom(load_message(stats, block_size, num_active_streams))
    return response


def free_kv_tokens(stats: EngineStats, block_size: int) -> int:
    """Free KV capacity of both tiers, in tokens."""
    free_blocks = (stats.gpu_kv_total_blocks - stats.gpu_kv_used_blocks
                   + stats.host_kv_total_blocks - stats.host_kv_used_blocks)
    return free_blocks * block_size


def load_message(stats: EngineStats, block_size: int, num_active_streams: int) -> model_pb2.Load:
    total_blocks = stats.gpu_kv_total_blocks + stats.host_kv_total_blocks
    return model_pb2.Load(num_requests=stats.num_waiting + stats.num_running,
                          num_active_streams=num_active_streams,
                          free_kv_tokens=free_kv_tokens(stats, block_size),
                          total_kv_tokens=total_blocks * block_size)


def model_info_response(engine: EngineClient) -> model_pb2.GetModelInfoResponse:
    config = engine.model_config
    response = model_pb2.GetModelInfoResponse(
        model_name=engine.model_name,
        architecture=config.architecture,
        vocab_size=config.vocab_size,
        max_model_len=engine.engine_config.max_model_len,
        eos_token_ids=list(config.eos_token_ids),
        dtype=engine.dtype_name,
        num_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        has_chat_template=engine.tokenizer is not None and engine.tokenizer.has_chat_template,
    )
    if config.bos_token_id is not None:
        response.bos_token_id = config.bos_token_id
    return response


def server_info_response(engine: EngineClient,
                         replica_id: str) -> model_pb2.GetServerInfoResponse:
    config = engine.engine_config
    return model_pb2.GetServerInfoResponse(
        version=apex_grpc.__version__,
        device_name=engine.device_name,
        policy=config.policy.value,
        block_size=config.block_size,
        gpu_kv_blocks=config.num_gpu_blocks,
        host_kv_blocks=config.num_host_blocks,
        max_num_seqs=config.max_num_seqs,
        max_batched_tokens=config.max_batched_tokens,
        cpu_attention_threads=config.cpu_attention_threads,
        kv_placement=config.kv_placement.value,
        max_model_len=config.max_model_len,
        replica_id=replica_id,
    )
