"""Baton engine: scheduling, batching, K/V slab, model and sampling.

Knows nothing of gRPC or protobuf; the service talks to it through `engine.api.EngineClient`.
"""
