"""The control socket: newline-delimited JSON requests and replies.

A request is `{"command": NAME, "args": {...}}`; a reply is
`{"ok": true, "result": ...}` or `{"ok": false, "error": "one line"}`.
A streaming command (`events/subscribe`) turns the connection into a
stream: its reply says `"stream": true`, and lines follow until either end
closes.
A malformed request gets an error reply; an oversized one, or one left
half-sent, closes that connection only.

Who may connect.  The socket is 0660 and owned by `control_group`, so the
kernel keeps others out; we check again with the peer's credentials, in
case the socket's mode or owner were loosened, and to know whom to log.
Allowed are root, the daemon's own user and members of `control_group`
(by primary or supplementary group).  Anyone else gets one error reply and
the connection is closed.  Every command that changes the switch is logged
with the client's uid and pid, the command, its arguments and its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass

from vswitch.control.commands import registry
from vswitch.control.registry import Command, CommandError, Stream
from vswitch.ratelimit import RateLimitedLog
from vswitch.switch import Switch

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT = 30.0
SOCKET_MODE = 0o660
# A refused client is answered on its first request, so that it sees why;
# it gets this long to send one, not REQUEST_TIMEOUT.
REFUSED_CLIENT_TIMEOUT = 2.0
# Not in Python's socket module; the same on every architecture that uses
# asm-generic/socket.h (x86, arm, riscv ...).  Linux 4.13 and later.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Python's getsockopt takes at most 1024 bytes: 256 groups.
_PEERGROUPS_BUFLEN = 1024
_PLAIN_VALUE = re.compile(r"[\w.:/@+-]{1,100}")


class ConnectionStream(Stream):
    """A streaming command's side of its connection."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.started = False

    async def start(self, result) -> None:
        await ControlServer._reply(self.writer, {"ok": True, "result": result, "stream": True})
        self.started = True

    async def send(self, item) -> None:
        self.writer.write(json.dumps(item).encode() + b"\n")
        await self.writer.drain()


@dataclass(frozen=True)
class Peer:
    """A control client as the kernel saw it when it connected."""
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


def peer_of(sock) -> Peer:
    """The credentials of the process at the other end of a UNIX socket.

    Groups come from SO_PEERGROUPS, like uid and gid from SO_PEERCRED: the
    kernel records both when the client connects, so they are the groups
    the kernel itself checked the socket's mode against.  The alternatives
    are worse: /proc/<pid>/status is read later (the client may have exited
    and its pid been reused, or live in another pid namespace), and
    os.getgrouplist() trusts /etc/group rather than the process, so it
    would admit a process that dropped the group (setpriv --clear-groups)
    and refuse a container user with no passwd entry.
    """
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize("3i")))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUFLEN)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:
        # More than 256 groups (ERANGE), or a kernel before 4.13: fall back to
        # the client's /proc entry, which is what it is now rather than at connect.
        groups = _proc_groups(pid)
    return Peer(pid, uid, gid, tuple(groups))


def _proc_groups(pid: int) -> tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def _show_args(args) -> str:
    """Arguments for a log line: plain values as they are, anything else as
    JSON (a client must not be able to forge log lines with newlines)."""
    def show(value) -> str:
        text = str(value)
        return text if isinstance(value, (int, str)) and _PLAIN_VALUE.fullmatch(text) else json.dumps(value)[:200]
    if not isinstance(args, dict):
        return show(args)
    return " ".join(f"{show(key)}={show(value)}" for key, value in args.items() if value is not None)


class ControlServer:
    def __init__(self, switch: Switch, path: str, group: str | None = None):
        self.switch = switch
        self.path = path
        self.group = group
        self._server: asyncio.base_events.Server | None = None
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self.connections = 0
        self.refused_clients = 0
        self.bad_requests = 0
        self.changes = 0
        self._refusal_log = RateLimitedLog(log, "control socket")

    def stats(self) -> dict:
        return {"connections": self.connections, "refused_clients": self.refused_clients,
                "bad_requests": self.bad_requests, "changes": self.changes}

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, SOCKET_MODE)
        if self.gid is not None:
            os.chown(self.path, 0, self.gid)
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._refusal_log.flush()

    def refusal(self, peer: Peer) -> str | None:
        """Why this client may not use the socket, or None if it may."""
        if peer.uid in (0, os.geteuid()):
            return None
        if self.gid is None:
            return f"permission denied: uid {peer.uid} is not root and no control_group is configured"
        if self.gid == peer.gid or self.gid in peer.groups:
            return None
        return f"permission denied: uid {peer.uid} is not root and not in group '{self.group}'"

    async def _refuse(self, peer: Peer, why: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.refused_clients += 1
        self._refusal_log.log(logging.WARNING, "refused a control client: uid %d gid %d pid %d: %s",
                              peer.uid, peer.gid, peer.pid, why)
        # Wait for the request (briefly), so that the client reads the reply
        # instead of finding the connection gone when it sends.
        with contextlib.suppress(asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError):
            await asyncio.wait_for(reader.readline(), REFUSED_CLIENT_TIMEOUT)
        await self._reply(writer, {"ok": False, "error": why})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            why = self.refusal(peer)
            if why is not None:
                await self._refuse(peer, why, reader, writer)
                return
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
                reply = await self._handle(line, writer, peer)
                if reply is None:
                    return  # the connection became a stream and has ended
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

    async def _handle(self, line: bytes, writer: asyncio.StreamWriter, peer: Peer) -> dict | None:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.bad_requests += 1
            return {"ok": False, "error": "request is not valid JSON"}
        if not isinstance(request, dict):
            self.bad_requests += 1
            return {"ok": False, "error": "request must be a JSON object with 'command' and 'args'"}
        name = request.get("command")
        try:
            command = registry.get(name)
        except CommandError as exc:
            self.bad_requests += 1
            return {"ok": False, "error": str(exc)}
        raw_args = request.get("args") or {}
        reply = await self._run(command, raw_args, writer)
        if reply is None:
            return None
        if command.changes:
            self.changes += reply["ok"]
            error = reply.get("error", "")
            # An error may quote the client's own words: keep them on one line.
            outcome = "done" if reply["ok"] else f"failed: {error if error.isprintable() else json.dumps(error)}"
            log.info("control client uid %d pid %d: %s %s: %s", peer.uid, peer.pid, command.name,
                     _show_args(raw_args), outcome)
        return reply

    async def _run(self, command: Command, raw_args, writer: asyncio.StreamWriter) -> dict | None:
        """The command's reply, or None once a streaming command has streamed."""
        stream = ConnectionStream(writer) if command.streams else None
        try:
            args = command.check_args(raw_args)
            if command.wants_server:
                args["server"] = self
            if stream is not None:
                args["stream"] = stream
            result = await command.handler(self.switch, **args)
            return None if stream is not None and stream.started else {"ok": True, "result": result}
        except ConnectionError:
            raise  # the client went away: nothing to reply to
        except CommandError as exc:
            if stream is not None and stream.started:
                return None
            self.bad_requests += 1
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("command %s failed", command.name)
            if stream is not None and stream.started:
                return None
            return {"ok": False, "error": f"{command.name}: internal error: {exc}"}
