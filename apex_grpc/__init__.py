"""apex-grpc: an LLM inference server for memory-tight GPUs with hybrid CPU/GPU decode attention."""

__version__ = "0.1.0"
