"""apex-grpc clients: the Python client library (client.py), the `apex-client` command
(apex_client.py) and the `apex-bench` load generator (bench/)."""

from clients.client import (ApexClient, ApexError, AsyncApexClient, GenerationResult, RetryPolicy,
                            Timing, TokenLogprob, build_request)

__all__ = ["ApexClient", "ApexError", "AsyncApexClient", "GenerationResult", "RetryPolicy",
           "Timing", "TokenLogprob", "build_request"]
