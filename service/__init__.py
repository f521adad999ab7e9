"""Baton gRPC service: protobuf in, engine calls, protobuf out. Never touches tensors."""
