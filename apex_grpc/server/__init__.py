"""The gRPC front end: servicers (servicer.py), request validation (validation.py), wire
conversions (convert.py), launch, health and shutdown (app.py), auth and TLS (auth.py) and
Prometheus metrics (metrics.py). It reaches the engine only through engine.protocol."""
