"""Engine: the asyncio front (async_engine), the synchronous core (core) and the builder."""
