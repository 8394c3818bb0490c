"""The control socket: newline-delimited JSON requests and replies.

A request is `{"command": NAME, "args": {...}}`; a reply is
`{"ok": true, "result": ...}` or `{"ok": false, "error": "one line"}`.
`events/subscribe` turns the connection into a stream of event lines.
A malformed request gets an error reply; an oversized one, or one left
half-sent, closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os

from vswitch.control.commands import registry
from vswitch.control.registry import CommandError
from vswitch.switch import Switch

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT = 30.0
SOCKET_MODE = 0o660


class ControlServer:
    def __init__(self, switch: Switch, path: str, group: str | None = None):
        self.switch = switch
        self.path = path
        self.group = group
        self._server: asyncio.base_events.Server | None = None
        self.bad_requests = 0

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, SOCKET_MODE)
        if self.group:
            os.chown(self.path, 0, grp.getgrnam(self.group).gr_gid)
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                except (asyncio.LimitOverrunError, ValueError):
                    self.bad_requests += 1
                    await self._reply(writer, {"ok": False, "error": f"request larger than {MAX_REQUEST_BYTES} bytes"})
                    return
                except asyncio.TimeoutError:
                    return
                if not line:
                    return
                if not line.endswith(b"\n"):
                    return  # half-sent, then closed
                reply = await self._handle(line, writer)
                if reply is None:
                    return  # the connection became an event stream and has ended
                await self._reply(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict) -> None:
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()

    async def _handle(self, line: bytes, writer: asyncio.StreamWriter) -> dict | None:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.bad_requests += 1
            return {"ok": False, "error": "request is not valid JSON"}
        if not isinstance(request, dict):
            self.bad_requests += 1
            return {"ok": False, "error": "request must be a JSON object with 'command' and 'args'"}
        name = request.get("command")
        if name == "events/subscribe":
            await self._stream_events(writer)
            return None
        try:
            command = registry.get(name)
            args = command.check_args(request.get("args") or {})
            result = await command.handler(self.switch, **args)
            return {"ok": True, "result": result}
        except CommandError as exc:
            self.bad_requests += 1
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("command %s failed", name)
            return {"ok": False, "error": f"{name}: internal error: {exc}"}

    async def _stream_events(self, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=10000)

        def deliver(event: dict) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

        unsubscribe = self.switch.subscribe(deliver)
        try:
            await self._reply(writer, {"ok": True, "result": {"subscribed": True}})
            while True:
                event = await queue.get()
                writer.write(json.dumps(event).encode() + b"\n")
                await writer.drain()
        finally:
            unsubscribe()
