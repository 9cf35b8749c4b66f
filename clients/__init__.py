"""apex-grpc clients: the Python client library (client.py, its typed results in results.py,
several replicas in fleet.py), the `apex-client` command (apex_client.py) and the `apex-bench`
load generator (bench/)."""

from clients.client import ApexClient, AsyncApexClient, RetryPolicy, build_request
from clients.results import ApexError, GenerationResult, Timing, TokenLogprob

__all__ = ["ApexClient", "ApexError", "AsyncApexClient", "GenerationResult", "RetryPolicy",
           "Timing", "TokenLogprob", "build_request"]
