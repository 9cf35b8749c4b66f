"""apex-bench: a gRPC load generator for apex-grpc with the metrics and result keys of
`vllm bench serve`.

Modules: workloads (what to send), arrivals (when to send it), runner (sending it over grpc.aio
and timing every streamed message), metrics (TTFT/TPOT/ITL/E2EL statistics, throughput,
goodput), report (summary table and result JSON), plot (throughput vs latency per policy),
cli (the `apex-bench` console script).
"""
