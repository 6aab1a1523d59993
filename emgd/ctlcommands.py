"""What the control socket can ask the daemon (``docs/control.md``).

Each handler is an ``async`` function of the request's ``args`` map returning a
msgpack-able result; errors are raised as :class:`~emgd.control.RequestError` or
:class:`~emgd.errors.EmgdError` and become ``{"ok": false, "error": ...}`` replies.
Anything that touches pipeline state runs in the pipeline thread (``Pipeline.submit``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from emgd import __version__
from emgd.control import RequestError, require

if TYPE_CHECKING:  # pragma: no cover
    from emgd.daemon import Daemon

MAX_MARKER_CHARS = 1000


def control_handlers(daemon: Daemon) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
    async def status(args: dict[str, Any]) -> dict[str, Any]:
        _no_args(args)
        pipeline = daemon.pipeline
        assert pipeline is not None
        info = dataclasses.asdict(daemon.device.info)
        return {"version": __version__, "device": info, "status": pipeline.last_status,
                "pub": pipeline.endpoint, "ctl": daemon.control.endpoint if daemon.control
                else None, "last_sample": pipeline.last_sample}

    async def marker(args: dict[str, Any]) -> dict[str, Any]:
        text = require(args, "text", str)
        if not text or len(text) > MAX_MARKER_CHARS:
            raise RequestError(f"marker text must be 1 to {MAX_MARKER_CHARS} characters")
        pipeline = daemon.pipeline
        assert pipeline is not None
        return await _in_pipeline(daemon, lambda ctx: pipeline.publish_marker(ctx, text, "ctl"))

    async def reset(args: dict[str, Any]) -> dict[str, Any]:
        _no_args(args)
        pipeline = daemon.pipeline
        assert pipeline is not None
        await _in_pipeline(daemon, pipeline.reset_stages)
        return {"resets": pipeline.resets}

    async def record(args: dict[str, Any]) -> dict[str, Any] | None:
        action = require(args, "action", str)
        if action == "start":
            path = require(args, "path", str, default="")
            if not path:
                path = default_recording_path()
            return await asyncio.to_thread(daemon.start_recording, path)
        if action == "stop":
            _only(args, {"action"})
            result = await asyncio.to_thread(daemon.stop_recording)
            if result is None:
                raise RequestError("not recording")
            return result
        raise RequestError(f"record action must be 'start' or 'stop', not {action!r}")

    async def reload(args: dict[str, Any]) -> dict[str, Any]:
        _no_args(args)
        return await asyncio.to_thread(daemon.reload_models)

    return {"status": status, "marker": marker, "reset": reset, "record": record,
            "reload": reload}


def default_recording_path() -> str:
    """``emgd-YYYYmmdd-HHMMSS.h5`` in the working directory (the service's StateDirectory)."""
    import time

    return time.strftime("emgd-%Y%m%d-%H%M%S.h5", time.localtime())


def _only(args: dict[str, Any], allowed: set[str]) -> None:
    extra = set(args) - allowed
    if extra:
        raise RequestError(f"unexpected arguments {sorted(extra)}")


async def _in_pipeline(daemon: Daemon, fn: Callable[[Any], Any]) -> Any:
    assert daemon.pipeline is not None
    return await asyncio.wait_for(asyncio.wrap_future(daemon.pipeline.submit(fn)), timeout=5.0)


def _no_args(args: dict[str, Any]) -> None:
    if args:
        raise RequestError(f"this command takes no arguments, got {sorted(args)}")


__all__ = ["control_handlers"]
