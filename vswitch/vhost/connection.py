"""The socket side of a vhost-user port: the connection to its front-end.

Listens (server mode) or connects and reconnects with backoff (client
mode); reads messages with their SCM_RIGHTS fds; checks each one before any
handler sees it; replies; and closes the connection on a protocol error.
What the messages mean is the device's business (device.py), which this
module reaches only through the Device interface below.

Security model: the front-end is untrusted.  It is one step removed from the
guest (QEMU may be compromised by the guest it runs, and a virtio-user
process is simply another program), so every message is treated as hostile
input.  Before any handler runs, a message's header (version, flags, size
limit), its payload size, the number of fds attached to it and the syntax
of its fields are checked (protocol.py) against its row in the device's
message table.  A message that breaks the protocol closes that connection
only: fds it carried are closed, the device is torn down, `protocol_errors`
goes up, and the listening socket keeps accepting.

Error policy (DPDK lib/vhost, vhost_user_msg_handler): a request the
back-end refuses (an unknown or unsupported request, features it did not
offer, an MTU out of range) gets a failure ack when the front-end set
NEED_REPLY, and the connection stays open; without NEED_REPLY the
connection is closed, since the front-end would otherwise carry on with a
device that silently differs from what it asked for.  A malformed message
(ProtocolError) always closes the connection.  Refusals are budgeted: a
connection that keeps sending refused requests is closed after
MAX_PROTOCOL_VIOLATIONS in a burst, and the log lines they cause are
rate-limited per port, so that a front-end cannot flood the log or make us
write replies for ever.

Threading: everything here runs on the daemon's asyncio loop.  Sockets are
non-blocking and a message is assembled from as many reads as it takes, so
a front-end that sends half a message cannot stall the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import grp
import logging
import os
import pwd
import socket
import stat
import time
from typing import Callable, Protocol

from vswitch.ratelimit import RateLimitedLog
from vswitch.vhost import protocol
from vswitch.vhost.protocol import Fds, Header, MessageRule, ProtocolError, Request, RequestRefused

log = logging.getLogger(__name__)

RECONNECT_MIN_DELAY = 0.1      # seconds; doubled after each failed attempt
RECONNECT_MAX_DELAY = 2.0
# Messages handled per wake-up before yielding to the rest of the loop, so
# that a front-end flooding us cannot starve the other ports.
MAX_MESSAGES_PER_WAKEUP = 64
# Refused requests a connection may make in a burst before it is closed; one
# is forgiven every VIOLATION_FORGIVEN_AFTER seconds.  A correct front-end
# meets a refusal only when it probes something we do not support or sends
# a value we cannot take, a few times per device start (QEMU sends its
# MTU each time the device starts), so 16 is well above what it
# needs; a hostile one gets 16 failure acks and log lines (rate-limited)
# at most, instead of one each for as long as it likes.  The slow refill
# keeps a long-lived VM's occasional refusals from adding up over days.
MAX_PROTOCOL_VIOLATIONS = 16
VIOLATION_FORGIVEN_AFTER = 1.0
# Room for one more fd than any message may carry, so that too many fds
# shows up as a count we can report rather than only as MSG_CTRUNC.
_ANCILLARY_SPACE = socket.CMSG_SPACE((protocol.MAX_FDS_PER_MESSAGE + 1) * 4)
_FD_SIZE = 4

EventSink = Callable[[str, dict], None]


def close_fds(fds) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Message:
    """A message being read, and then handled.  Owns the fds received with
    it: a handler that keeps an fd takes it out of `fds`; whatever is left
    is closed when the message is done with."""

    def __init__(self):
        self.buf = bytearray()
        self.fds: list[int] = []
        self.header: Header | None = None

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        close_fds(fds)

    def take_fd(self) -> int:
        return self.fds.pop(0)


class Device(Protocol):
    """What the connection needs of the device behind it (device.py: VhostUserDevice)."""

    messages: dict[Request, MessageRule]    # the message table: requests missing there are refused

    def rule_for(self, request: Request) -> MessageRule | None:
        """The row a request is handled by now: its row in `messages`, or one the
        device's state calls for (None: not supported).  May raise ProtocolError
        when the device expects another message first."""

    def reply_fds(self, rule: MessageRule, value) -> list[int]:
        """The fds a reply carries (the device keeps them open)."""

    def handle(self, rule: MessageRule, msg: Message, body):
        """Runs a validated request; returns its reply's value (MessageRule)."""

    def request_done(self) -> None:
        """Called after each request, before its reply."""

    def describe_fault(self) -> str | None:
        """Why the C side flagged the device, if it did (counted once per call)."""

    def disconnected(self) -> None:
        """The front-end is gone: stop the device and forget the session."""


class _Peer:
    """One front-end connection: its socket, the message being read, its refusal budget."""

    def __init__(self, sock: socket.socket, on_closed: asyncio.Future | None):
        self.sock = sock
        self.fd = sock.fileno()
        self.message = Message()
        self.on_closed = on_closed      # client mode: resolved when this connection ends
        self.violation_budget = float(MAX_PROTOCOL_VIOLATIONS)
        self.budget_checked_at: float | None = None

    def spend_violation(self, now: float) -> bool:
        """Counts one refused request; False once the budget is used up."""
        if self.budget_checked_at is not None:
            self.violation_budget = min(float(MAX_PROTOCOL_VIOLATIONS), self.violation_budget
                                        + (now - self.budget_checked_at) / VIOLATION_FORGIVEN_AFTER)
        self.budget_checked_at = now
        if self.violation_budget < 1.0:
            return False
        self.violation_budget -= 1.0
        return True


@dataclasses.dataclass(frozen=True)
class SocketAccess:
    """Owner, group and permission bits for a socket the switch creates; None leaves one as it is."""
    owner: str | int | None = None
    group: str | int | None = None
    mode: str | None = None          # octal, e.g. "0660"

    def apply(self, path: str) -> None:
        uid = -1 if self.owner is None else (self.owner if isinstance(self.owner, int)
                                              else pwd.getpwnam(self.owner).pw_uid)
        gid = -1 if self.group is None else (self.group if isinstance(self.group, int)
                                              else grp.getgrnam(self.group).gr_gid)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        if self.mode is not None:
            os.chmod(path, int(self.mode, 8))


class VhostUserConnection:
    """The socket of one vhost-user port, and the one front-end connected to it.

    name:   the port name, used in log lines.
    path:   the UNIX socket; created by us in "server" mode, by the
            front-end (e.g. QEMU `server=on`) in "client" mode.
    device: handles the requests (Device).
    emit(kind, fields): "connected" {}, "disconnected" {}; must not raise.
    access: server mode: who may connect (SocketAccess), or None to leave
            the socket as bind() made it (the daemon's user, its umask).
    """

    def __init__(self, name: str, path: str, mode: str, device: Device, emit: EventSink,
                 loop: asyncio.AbstractEventLoop | None = None, access: "SocketAccess | None" = None):
        if mode not in ("server", "client"):
            raise ValueError(f"vhost-user port '{name}': mode must be 'server' or 'client', not {mode!r}")
        self.name = name
        self.path = os.fspath(path)
        self.mode = mode
        self.access = access
        self.device = device
        self._emit = emit
        self._loop = loop
        self.protocol_errors = 0
        self.clock: Callable[[], float] = time.monotonic   # replaceable by tests
        # A front-end decides how often these lines happen, so they are rate-limited.
        self._refusal_log = RateLimitedLog(log, f"vhost-user port '{name}'", clock=lambda: self.clock())
        self._failure_log = RateLimitedLog(log, f"vhost-user port '{name}'", clock=lambda: self.clock())
        self._listener: socket.socket | None = None
        self._listener_ino: tuple[int, int] | None = None
        self._client_task: asyncio.Task | None = None
        self._peer: _Peer | None = None
        self._stopping = False

    @property
    def connected(self) -> bool:
        return self._peer is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listens (server) or starts connecting (client).  Must be called on the loop's thread."""
        self._loop = loop
        self._stopping = False
        if self.mode == "server":
            self._listen()
        else:
            self._client_task = self._loop.create_task(self._client_loop(), name=f"vhost-user {self.name}")

    async def stop(self) -> None:
        """Closes the connection (the device is torn down), the sockets and, in
        server mode, removes the socket file.  Returns promptly."""
        self._stopping = True
        if self._client_task is not None:
            self._client_task.cancel()
            try:
                await self._client_task
            except asyncio.CancelledError:
                pass
            self._client_task = None
        if self._peer is not None:
            self.close("port stopped")
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self._remove_own_socket_file()
        self._refusal_log.flush()
        self._failure_log.flush()

    # ------------------------------------------------------------ the socket

    def _listen(self) -> None:
        self._clear_socket_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        bound = False
        try:
            sock.bind(self.path)
            bound = True
            if self.access is not None:
                # Before listen(): no front-end can connect until the socket is as configured.
                self.access.apply(self.path)
            sock.listen(8)
            sock.setblocking(False)
            st = os.stat(self.path)
        except OSError:
            sock.close()
            if bound:
                os.unlink(self.path)   # ours, just made: nothing half-created stays behind
            raise
        self._listener = sock
        self._listener_ino = (st.st_dev, st.st_ino)
        self._loop.add_reader(sock.fileno(), self._on_accept)
        log.info("vhost-user port '%s': listening on %s", self.name, self.path)

    def _clear_socket_path(self) -> None:
        """Removes a stale socket left by a crashed daemon; refuses to touch a
        file that is not a socket or a socket someone still listens on."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"vhost-user port '{self.name}': {self.path} exists "
                                  "and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            log.info("vhost-user port '%s': removed stale socket %s", self.name, self.path)
            return
        except OSError as exc:
            raise OSError(exc.errno, f"vhost-user port '{self.name}': cannot probe {self.path}: {exc.strerror}")
        finally:
            probe.close()
        raise FileExistsError(errno.EADDRINUSE, f"vhost-user port '{self.name}': {self.path} is in use "
                              "by another process")

    def _remove_own_socket_file(self) -> None:
        # Only unlink the file we created: another process may have replaced it.
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._listener_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _on_accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("vhost-user port '%s': accept failed: %s", self.name, exc)
            return
        if self._peer is not None:
            log.warning("vhost-user port '%s': refusing a second front-end on %s while one is connected",
                        self.name, self.path)
            sock.close()
            return
        self.attach(sock, None)

    async def _client_loop(self) -> None:
        delay = RECONNECT_MIN_DELAY
        failures = 0
        while not self._stopping:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await self._loop.sock_connect(sock, self.path)
            except asyncio.CancelledError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                if failures == 0:
                    log.info("vhost-user port '%s': cannot connect to %s (%s); retrying",
                             self.name, self.path, exc.strerror or exc)
                failures += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            failures = 0
            delay = RECONNECT_MIN_DELAY
            closed = self._loop.create_future()
            self.attach(sock, closed)
            await closed
            await asyncio.sleep(delay)

    def attach(self, sock: socket.socket, on_closed: asyncio.Future | None = None) -> None:
        """Serves a connected socket (accepted, connected, or one end of a socketpair)."""
        sock.setblocking(False)
        self._peer = _Peer(sock, on_closed)
        self._loop.add_reader(self._peer.fd, self._on_readable)
        log.info("vhost-user port '%s': front-end connected on %s (%s mode)", self.name, self.path, self.mode)
        self._emit("connected", {})

    def close(self, why: str) -> None:
        """Closes the connection, if any, and tears the device down."""
        peer, self._peer = self._peer, None
        if peer is None:
            return
        # A fault the C side flagged is the real reason, whoever closes first.
        fault = self.device.describe_fault()
        self._loop.remove_reader(peer.fd)
        peer.message.close_fds()
        peer.sock.close()
        self.device.disconnected()    # a fault is answered by this disconnect
        if fault:
            log.warning("vhost-user port '%s': %s; disconnected", self.name, fault)
        else:
            log.info("vhost-user port '%s': front-end disconnected: %s", self.name, why)
        self._emit("disconnected", {})
        if peer.on_closed is not None and not peer.on_closed.done():
            peer.on_closed.set_result(None)

    # ---------------------------------------------------------------- reading

    def _on_readable(self) -> None:
        peer = self._peer
        for _ in range(MAX_MESSAGES_PER_WAKEUP):
            if peer is not self._peer:
                return
            try:
                complete = self._read_some(peer)
            except ProtocolError as exc:
                self._protocol_failure(str(exc))
                return
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError as exc:
                self.close(str(exc))
                return
            if complete is None:
                return
            peer.message = Message()
            self._handle(peer, complete)

    def _read_some(self, peer: _Peer) -> Message | None:
        """Reads what the current message still needs (never past its end, so
        fds always belong to the message they arrived with).  Returns the
        message once it is whole, else None; raises BlockingIOError when the
        socket is drained and ConnectionError at end of file."""
        msg = peer.message
        while True:
            if msg.header is None:
                want = protocol.HEADER_SIZE - len(msg.buf)
            else:
                want = protocol.HEADER_SIZE + msg.header.size - len(msg.buf)
            if want == 0:
                return msg
            data, ancdata, flags, _ = peer.sock.recvmsg(want, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    count = len(payload) // _FD_SIZE
                    msg.fds.extend(int.from_bytes(payload[i * _FD_SIZE:(i + 1) * _FD_SIZE], "little", signed=True)
                                   for i in range(count))
            msg.buf += data
            if msg.header is None and len(msg.buf) == protocol.HEADER_SIZE:
                msg.header = protocol.parse_header(bytes(msg.buf))
            name = msg.header.name if msg.header else "message"
            if flags & socket.MSG_CTRUNC or len(msg.fds) > protocol.MAX_FDS_PER_MESSAGE:
                raise ProtocolError(f"{name}: more than {protocol.MAX_FDS_PER_MESSAGE} file descriptors attached")
            if not data:
                if msg.buf or msg.fds:
                    raise ConnectionError(f"connection closed in the middle of a {name}")
                raise ConnectionError("connection closed by the front-end")

    def _protocol_failure(self, why: str) -> None:
        self.protocol_errors += 1
        self._refusal_log.flush()
        self._failure_log.log(logging.WARNING, "vhost-user port '%s': protocol error, closing the connection: %s",
                              self.name, why)
        self.close(f"protocol error: {why}")

    # --------------------------------------------------------------- dispatch

    def _handle(self, peer: _Peer, msg: Message) -> None:
        header = msg.header
        payload = bytes(msg.buf[protocol.HEADER_SIZE:])
        try:
            reply, fds = None, []
            try:
                reply, fds = self._dispatch(msg, header, payload)
                ok = True
            except RequestRefused as exc:
                if not header.need_reply:
                    raise
                if not peer.spend_violation(self.clock()):
                    raise ProtocolError(f"too many refused requests (more than {MAX_PROTOCOL_VIOLATIONS} "
                                        f"in a burst), the last: {exc}") from None
                self.protocol_errors += 1
                self._refusal_log.log(logging.WARNING, "vhost-user port '%s': request refused: %s", self.name, exc)
                ok = False
            # Readiness first, so that a request's effects are visible once its reply arrives.
            self.device.request_done()
            if reply is not None:
                self._reply(peer, header.request, reply, fds)
            elif header.need_reply:
                # REPLY_ACK: only for requests that have no reply of their own.
                self._reply(peer, header.request, protocol.pack_u64(0 if ok else 1))
        except ProtocolError as exc:
            msg.close_fds()
            if peer is self._peer:
                self._protocol_failure(str(exc))
            return
        except Exception as exc:  # a bug here must cost one connection, not the daemon
            log.exception("vhost-user port '%s': internal error handling %s", self.name, header.name)
            msg.close_fds()
            if peer is self._peer:
                self.close(f"internal error handling {header.name}: {exc}")
            return
        msg.close_fds()

    def _dispatch(self, msg: Message, header: Header, payload: bytes) -> tuple[bytes | None, list[int]]:
        """Validates a message against its row and runs it; returns the reply payload, if any,
        and the fds to send with it."""
        try:
            request = Request(header.request)
        except ValueError:
            raise RequestRefused(f"{header.name}: not supported") from None
        rule = self.device.rule_for(request)
        if rule is None:
            raise RequestRefused(f"{header.name}: not supported")
        if msg.fds and rule.fds is Fds.NONE:
            raise ProtocolError(f"{request.name}: {len(msg.fds)} unexpected file descriptors attached")
        body = protocol.parse_payload(rule, payload, len(msg.fds))
        log.debug("vhost-user port '%s': %s %s", self.name, request.name, body)
        value = self.device.handle(rule, msg, body)
        return protocol.encode_reply_value(rule, value), self.device.reply_fds(rule, value)

    def _reply(self, peer: _Peer, request: int, payload: bytes, fds: list[int] = ()) -> None:
        data = protocol.encode_reply(request, payload)
        try:
            if fds:
                sent = peer.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   b"".join(fd.to_bytes(_FD_SIZE, "little") for fd in fds))])
            else:
                sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ProtocolError(f"{protocol.request_name(request)}: cannot send the reply: {exc}") from None
        # Replies are tiny; a socket too full to take one means the front-end
        # is not reading them, and queueing more for it would only grow.
        if sent != len(data):
            raise ProtocolError(f"{protocol.request_name(request)}: the front-end is not reading replies")

