"""Transport security and caller identity: TLS / mTLS credentials and bearer-token auth.

Token auth is a grpc.aio server interceptor. With a tokens file set, every RPC except
`grpc.health.v1.Health` must carry the metadata `authorization: Bearer <token>`; anything else
ends with UNAUTHENTICATED before the request message is even parsed. The interceptor resolves the
token to an `Identity` and runs the handler with that identity in the `CALLER` context variable;
the servicer reads it through `request_owner()` / `preempt_namespace()`. No client-supplied identity header is ever read:
the only input is the token, compared against the file's tokens in constant time.

Tokens file: one caller per line, `token caller_name [admin]`; blank lines and lines starting
with `#` are ignored. A request records its caller as owner, and its id lives in that caller's
namespace (engine.inputs.request_key): callers A and B may both use id "x", and to A an id of B's
is simply unknown (NOT_FOUND, as for an id nobody uses), never PERMISSION_DENIED. An admin acts
on its own ids, or on another caller's by naming it in `PreemptRequest.caller`.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import structlog

log = structlog.get_logger("baton.auth")

OPEN_SERVICES = ("/grpc.health.v1.Health/",)   # method prefixes that need no token
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Identity:
    name: str
    admin: bool = False


CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("baton_caller", default=None)


def request_owner() -> str:
    """Owner recorded on a new request: the caller's name ('' when auth is off: anyone may Preempt)."""
    caller = CALLER.get()
    return caller.name if caller is not None else ""


def preempt_owner() -> str | None:
    """`owner` for EngineHandle.preempt: None (no check) for admins and when auth is off."""
    caller = CALLER.get()
    return None if caller is None or caller.admin else caller.name


class NotAdmin(Exception):
    """A non-admin named another caller's namespace."""


def preempt_namespace(named_caller: str) -> str:
    """Whose namespace a Preempt's request_id is in: the caller's own, or (admins only) the one
    `named_caller` names. '' when auth is off. Raises ValueError (a caller named with auth off)
    or NotAdmin, whether or not that caller has such a request (nothing is learnt either way)."""
    caller = CALLER.get()
    if caller is None:
        if named_caller:
            raise ValueError("caller: only used when auth is on; leave it empty")
        return ""
    if not named_caller or named_caller == caller.name:
        return caller.name
    if not caller.admin:
        raise NotAdmin("caller: only an admin may act on another caller's requests")
    return named_caller


# ---- tokens file ----------------------------------------------------------------------------
def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """Token -> Identity. Only SHA-256 digests of the tokens are kept in memory."""

    def __init__(self, entries: dict[str, Identity]) -> None:
        if not entries:
            raise ValueError("no tokens")
        self._entries = [(_digest(token), ident) for token, ident in entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, token: str) -> Identity | None:
        """Constant-time with respect to which token matched (every entry is compared)."""
        digest = _digest(token)
        found = None
        for candidate, ident in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = ident
        return found

    @classmethod
    def parse(cls, text: str, source: str = "tokens file") -> "TokenTable":
        entries: dict[str, Identity] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{source}:{lineno}"
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
                raise ValueError(f"{where}: expected `token caller_name [admin]`")
            token, name = parts[0], parts[1]
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"{where}: token shorter than {MIN_TOKEN_CHARS} characters")
            if not token.isascii() or not token.isprintable():
                raise ValueError(f"{where}: token must be printable ASCII")
            if token in entries:
                raise ValueError(f"{where}: duplicate token")
            entries[token] = Identity(name=name, admin=len(parts) == 3)
        if not entries:
            raise ValueError(f"{source}: no tokens")
        return cls(entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenTable":
        path = Path(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("tokens_file_permissions", path=str(path), mode=oct(mode & 0o777),
                        hint="readable by group/others; chmod 600")
        return cls.parse(path.read_text(encoding="utf-8"), str(path))


# ---- the interceptor ------------------------------------------------------------------------
def bearer_token(metadata) -> str | None:
    """The token of the single `authorization: Bearer <token>` entry, else None."""
    values = [m.value for m in (metadata or ()) if m.key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _handler_factory(handler: grpc.RpcMethodHandler) -> tuple[Callable, Callable]:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _with_caller(handler: grpc.RpcMethodHandler, caller: Identity) -> grpc.RpcMethodHandler:
    """The same handler, run with CALLER set to `caller`. It is set at the start of every wrapped
    call, and grpc.aio runs each RPC in its own asyncio task (its own copy of the context)."""
    behaviour, factory = _handler_factory(handler)
    if inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            CALLER.set(caller)
            inner = behaviour(request, context)
            try:
                async for item in inner:
                    yield item
            finally:   # closed rather than cancelled: the inner `finally` (engine abort) runs now
                await inner.aclose()
    elif inspect.iscoroutinefunction(behaviour):
        async def wrapped(request, context):
            CALLER.set(caller)
            return await behaviour(request, context)
    else:  # a synchronous handler (run in a thread by grpc.aio)
        def call(request, context):
            CALLER.set(caller)
            return behaviour(request, context)

        def wrapped(request, context):   # a fresh context: a pool thread must not keep the caller
            return contextvars.copy_context().run(call, request, context)
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that only aborts. The request bytes are never parsed."""
    _behaviour, factory = _handler_factory(handler)

    async def refuse(_request, context):
        await context.abort(code, details)

    return factory(refuse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenTable, open_services: tuple[str, ...] = OPEN_SERVICES) -> None:
        self.tokens = tokens
        self.open_services = open_services

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_services):
            return handler
        token = bearer_token(details.invocation_metadata)
        caller = self.tokens.resolve(token) if token is not None else None
        if caller is None:
            # Never log the presented token (not even a prefix).
            log.warning("unauthenticated", method=details.method,
                        reason="no bearer token" if token is None else "unknown token")
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "missing or invalid `authorization: Bearer <token>` metadata")
        return _with_caller(handler, caller)


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Requests of `prefix` methods that do not parse (bad wire format, a string field that is not
    UTF-8) end with INVALID_ARGUMENT instead of grpc's generic UNKNOWN. Unary requests only."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if (handler is None or handler.request_streaming or handler.request_deserializer is None
                or not details.method.startswith(self.prefix)):
            return handler
        behaviour, factory = _handler_factory(handler)
        if not (inspect.isasyncgenfunction(behaviour) or inspect.iscoroutinefunction(behaviour)):
            return handler
        decode = handler.request_deserializer
        problem = (f"request: not a valid message for {details.method} "
                   "(malformed protobuf, or a string field that is not UTF-8)")

        async def parse(raw, context):
            try:
                return decode(raw)
            except Exception:  # noqa: BLE001 - any parse failure is the client's bytes
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(raw, context):
                request = await parse(raw, context)
                inner = behaviour(request, context)
                try:
                    async for item in inner:
                        yield item
                finally:
                    await inner.aclose()
        else:
            async def wrapped(raw, context):
                request = await parse(raw, context)
                return await behaviour(request, context)
        return factory(wrapped, request_deserializer=None, response_serializer=handler.response_serializer)


# ---- TLS ------------------------------------------------------------------------------------
def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS with the given certificate chain and key; with a client CA, mutual TLS: a client
    must present a certificate signed by that CA or the handshake fails."""
    cert = Path(cert_file).read_bytes()
    key = Path(key_file).read_bytes()
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=ca is not None)
