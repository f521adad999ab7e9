"""The engine's domain errors: what a command can fail with, in the engine's own words.

Status codes are chosen only at the edge (service/servicer.py maps each class to one). Every
class takes a single message, so an error raised in the engine process can be rebuilt on the
server's side from (class name, message) (engine/loop.py).
"""
from __future__ import annotations


class EngineError(Exception):
    """Base class: a command the engine could not carry out."""


class UnknownRequest(EngineError):
    """No request with this id is in flight (and none finished recently)."""


class RequestFinished(EngineError):
    """The request has already finished: nothing to suspend, resume or cancel."""


class NotOwner(EngineError):
    """The request belongs to another caller."""


class DuplicateRequest(EngineError):
    """A request with this id is still in flight."""


class HostPoolFull(EngineError):
    """Host memory for parked K/V is full: the row cannot be parked now."""


class TooLarge(EngineError):
    """The request can never be admitted: its n rows exceed the batch or their K/V the device budget."""


class QueueFull(EngineError):
    """Too many unfinished requests; retry later."""


class EngineUnavailable(EngineError):
    """The engine loop is not running (not started, stopped, or died)."""


class EngineInternalError(EngineError):
    """A command failed inside the engine for a reason that is not the caller's."""


BY_NAME: dict[str, type[EngineError]] = {
    cls.__name__: cls for cls in (EngineError, UnknownRequest, RequestFinished, NotOwner, DuplicateRequest,
                                  HostPoolFull, TooLarge, QueueFull, EngineUnavailable, EngineInternalError)}
