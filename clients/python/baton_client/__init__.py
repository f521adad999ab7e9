"""Typed Python client for the Baton generation service (sync and asyncio)."""
from baton_client.client import AsyncBatonClient, BatonClient, Choice, Completion, GenerationOptions

__all__ = ["AsyncBatonClient", "BatonClient", "Choice", "Completion", "GenerationOptions"]
