"""The control socket: a ZeroMQ REP endpoint speaking msgpack requests and replies.

Protocol (``docs/control.md``): a request is one ZeroMQ frame holding a msgpack map
``{"cmd": NAME, "args": {...}}``; the reply is one frame holding
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": MESSAGE}``. A malformed
request (not msgpack, not a map, unknown command, bad arguments) gets an error reply; the
daemon never crashes on one.

The socket lives in the daemon's asyncio loop (main thread). Commands that touch the
pipeline's state are handed to the pipeline thread through its command queue and
answered when it has run them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from emgd.errors import EmgdError, EndpointError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 64 * 1024


class ControlServer:
    """Binds the REP socket and answers requests with registered async handlers."""

    def __init__(self, endpoint: str, handlers: dict[str, Handler]) -> None:
        self.endpoint = endpoint
        self._handlers = handlers
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise EndpointError(
                f"cannot bind the control socket {endpoint}: {exc} (is another emgd running? "
                f"pass another endpoint with --ctl tcp://127.0.0.1:PORT)") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.requests = 0
        self.errors = 0

    async def serve(self, stop: asyncio.Event) -> None:
        """Answer requests until ``stop`` is set."""
        while not stop.is_set():
            if not await self._sock.poll(100):
                continue
            frames = await self._sock.recv_multipart()
            reply = await self.handle(frames)
            await self._sock.send(msgpack.packb(reply, use_bin_type=True))

    async def handle(self, frames: list[bytes]) -> dict[str, Any]:
        self.requests += 1
        try:
            cmd, args = parse_request(frames)
            handler = self._handlers.get(cmd)
            if handler is None:
                raise RequestError(f"unknown command {cmd!r}; commands: "
                                   f"{', '.join(sorted(self._handlers))}")
            return {"ok": True, "result": await handler(args)}
        except (RequestError, EmgdError) as exc:
            self.errors += 1
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in a handler: answer, log, keep serving
            self.errors += 1
            log.exception("control command failed")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)


class RequestError(ValueError):
    """A request that does not follow the control protocol."""


def parse_request(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    if len(frames) != 1:
        raise RequestError(f"a request is one frame, got {len(frames)}")
    try:
        msg = msgpack.unpackb(frames[0], raw=False)
    except Exception as exc:
        raise RequestError(f"request is not msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise RequestError("request must be a msgpack map with 'cmd' and 'args'")
    cmd = msg.get("cmd")
    args = msg.get("args", {})
    if not isinstance(cmd, str):
        raise RequestError("request lacks a string 'cmd'")
    if not isinstance(args, dict):
        raise RequestError("'args' must be a map")
    unknown = set(msg) - {"cmd", "args"}
    if unknown:
        raise RequestError(f"unknown request keys {sorted(unknown)}")
    return cmd, args


def require(args: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """Fetch one argument of a request, with a clear error when missing or mistyped."""
    if name not in args:
        if default is ...:
            raise RequestError(f"missing argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"argument {name!r} must be {kind.__name__}, got {value!r}")
    return value


# --------------------------------------------------------------------------- client


def request(endpoint: str, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
    """Send one request and wait for the reply (used by ``emgd ctl`` and tests)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"cmd": cmd, "args": args or {}}, use_bin_type=True))
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply from {endpoint} within {timeout:g} s "
                               f"(is the daemon running with --ctl {endpoint}?)")
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(linger=0)


__all__ = ["ControlServer", "RequestError", "parse_request", "request", "require"]
