"""Baton engine: scheduling, batching, K/V storage, model and sampling.

Knows nothing of gRPC or protobuf. The service holds an `engine.api.EngineHandle` (in-thread
`EngineClient` or `engine.process.EngineProcess`); both run the one command loop of
engine/loop.py around an `engine.engine.LLMEngine`.
"""
