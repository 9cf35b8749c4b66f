from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "architecture", "vocab_size", "max_model_len", "eos_token_ids", "bos_token_id", "dtype", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "has_chat_template")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    architecture: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_token_id: int
    dtype: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    has_chat_template: bool
    def __init__(self, model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bos_token_id: _Optional[int] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., has_chat_template: _Optional[bool] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "device_name", "policy", "block_size", "gpu_kv_blocks", "host_kv_blocks", "max_num_seqs", "max_batched_tokens", "cpu_attention_threads", "kv_placement", "max_model_len", "replica_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CPU_ATTENTION_THREADS_FIELD_NUMBER: _ClassVar[int]
    KV_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    version: str
    device_name: str
    policy: str
    block_size: int
    gpu_kv_blocks: int
    host_kv_blocks: int
    max_num_seqs: int
    max_batched_tokens: int
    cpu_attention_threads: int
    kv_placement: str
    max_model_len: int
    replica_id: str
    def __init__(self, version: _Optional[str] = ..., device_name: _Optional[str] = ..., policy: _Optional[str] = ..., block_size: _Optional[int] = ..., gpu_kv_blocks: _Optional[int] = ..., host_kv_blocks: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_batched_tokens: _Optional[int] = ..., cpu_attention_threads: _Optional[int] = ..., kv_placement: _Optional[str] = ..., max_model_len: _Optional[int] = ..., replica_id: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("num_running", "num_waiting", "num_host_resident", "gpu_kv_used_blocks", "gpu_kv_total_blocks", "host_kv_used_blocks", "host_kv_total_blocks", "preemptions_total", "evictions_total", "restores_total", "prompt_tokens_total", "generation_tokens_total", "steps_gpu_only", "steps_async_overlap", "steps_asymmetric_pipeline", "last_step_predicted_ms", "last_step_measured_ms", "requests_finished_total", "requests_aborted_total", "load", "steps_graphed")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    GPU_KV_USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GPU_KV_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_KV_USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_KV_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESTORES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_GPU_ONLY_FIELD_NUMBER: _ClassVar[int]
    STEPS_ASYNC_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    STEPS_ASYMMETRIC_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_MEASURED_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ABORTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STEPS_GRAPHED_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    num_host_resident: int
    gpu_kv_used_blocks: int
    gpu_kv_total_blocks: int
    host_kv_used_blocks: int
    host_kv_total_blocks: int
    preemptions_total: int
    evictions_total: int
    restores_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_gpu_only: int
    steps_async_overlap: int
    steps_asymmetric_pipeline: int
    last_step_predicted_ms: float
    last_step_measured_ms: float
    requests_finished_total: int
    requests_aborted_total: int
    load: Load
    steps_graphed: int
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_host_resident: _Optional[int] = ..., gpu_kv_used_blocks: _Optional[int] = ..., gpu_kv_total_blocks: _Optional[int] = ..., host_kv_used_blocks: _Optional[int] = ..., host_kv_total_blocks: _Optional[int] = ..., preemptions_total: _Optional[int] = ..., evictions_total: _Optional[int] = ..., restores_total: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., generation_tokens_total: _Optional[int] = ..., steps_gpu_only: _Optional[int] = ..., steps_async_overlap: _Optional[int] = ..., steps_asymmetric_pipeline: _Optional[int] = ..., last_step_predicted_ms: _Optional[float] = ..., last_step_measured_ms: _Optional[float] = ..., requests_finished_total: _Optional[int] = ..., requests_aborted_total: _Optional[int] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., steps_graphed: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("num_requests", "num_active_streams", "free_kv_tokens", "total_kv_tokens")
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_requests: int
    num_active_streams: int
    free_kv_tokens: int
    total_kv_tokens: int
    def __init__(self, num_requests: _Optional[int] = ..., num_active_streams: _Optional[int] = ..., free_kv_tokens: _Optional[int] = ..., total_kv_tokens: _Optional[int] = ...) -> None: ...
