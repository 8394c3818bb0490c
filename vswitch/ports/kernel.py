"""What TAP and AF_PACKET ports share: a `struct vs_kport` (ports/kernel.h).

The C side does the work (opening the fds, the rings, the packet path);
this class opens it in the right network namespace, turns its per-queue
counters into port counters and makes the link follow the interface.

The link is looked at (vs_kport_link_state) when the kernel says something
changed, not on a timer: on a link notification from the port's rtnetlink
socket, and, for a TAP whose link is down, when its fd turns writable,
which the tun driver makes it when the TAP comes up, in whatever namespace
it lives by then (kernel.c says why both).  The switch's once-a-second
housekeeping looks too, as a backstop.  A port whose interface is down
reports the link down and why, and the PMD drops (and counts) what it
would send there; when the interface comes back up the link does too.
Only an interface that is gone (deleted; for AF_PACKET also moved to
another namespace) stops the port for good.  The other ports never notice.
The port's MTU follows the interface's the same way (a longer frame is
dropped and counted in tx_dropped_mtu); an `mtu` key sets the interface's
when the port opens it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from vswitch.native import ffi, lib
from vswitch.ports.base import Port
from vswitch.ports.registry import call_in_network_namespace

log = logging.getLogger(__name__)


class KernelPort(Port):
    """Base of TapPort and AfPacketPort."""

    def __init__(self, name: str, port_no: int, spec: dict, emit):
        super().__init__(name, port_no, spec, emit)
        self.ifname: str = spec["ifname"]
        self.netns: str | None = spec.get("netns")
        self.queues: int = spec.get("queues", 1)
        self.kp = self._make_native()
        self.c.priv = self.kp
        self._reason: str | None = None       # why the link is down, reported once
        self._pending_errors: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[tuple[str, int]] = []   # ("reader" | "writer", fd) on the loop

    # What a subclass with its own C state (AF_XDP) replaces: that state, its
    # link notification socket, and how it is read and closed.
    def _make_native(self):
        kp = ffi.new("struct vs_kport *")
        lib.vs_kport_init(kp)
        kp.mtu_request = self.spec.get("mtu") or 0   # given to the interface when the port opens it
        return kp

    def _link_fd(self) -> int:
        return self.kp.link_fd

    def _interface_mtu(self) -> int:
        """The interface's MTU, or -errno when it cannot be known now."""
        return lib.vs_kport_mtu(self.kp)

    def _link_events(self) -> int:
        return lib.vs_kport_link_events(self.kp)

    def _close_native(self) -> None:
        lib.vs_kport_close(self.kp)

    def _fd_to_watch_while_down(self) -> tuple[str, int] | None:
        """("writer" | "reader", fd), see _watch_fd_while_down."""
        fd = self.kp.fds[0]
        if fd < 0:
            return None
        return ("writer" if self.kp.kind == lib.VS_KPORT_TAP else "reader", fd)

    def _offloads(self) -> bool:
        return bool(self.kp.vnet_hdr)

    def _open(self, opener, describe) -> None:
        """Runs `opener(netns_fd)` (a C open call) in the port's namespace, on a helper thread."""
        rc = call_in_network_namespace(self.netns, opener, f"open-{self.name}")
        if rc < 0:
            message = describe(-rc)   # before closing: it may read what the C side recorded
            self._close_native()
            raise OSError(-rc, message)

    def _follow_link(self) -> None:
        """Looks at the link whenever the port's rtnetlink socket reports a change (kernel.c)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:   # no event loop (a port opened outside the daemon): housekeeping only
            return
        link_fd = self._link_fd()
        if link_fd >= 0:
            self._loop.add_reader(link_fd, self._on_link_notification)
            self._watched.append(("reader", link_fd))

    def _on_link_notification(self) -> None:
        if self._link_events() < 0:
            self._unwatch("reader", self._link_fd())   # broken: housekeeping still looks once a second
        self._check_link()

    def _on_fd_event(self) -> None:
        self._check_link()

    def _check_link(self) -> None:
        self.housekeep()
        for line in self.errors():
            log.warning("%s", line)

    def _watch_fd_while_down(self, down: bool) -> None:
        """While the link is down, wait on the port's own fd too.  A TAP's turns
        writable when the TAP comes up, wherever it lives by then; a packet
        socket's reports the error the kernel sets on it when its interface
        goes down, which may come after the notification, and which the link
        check takes (kernel.c).  Never while up: the fd is the PMD's and busy."""
        watch = self._fd_to_watch_while_down()
        if self._loop is None or watch is None:
            return
        kind, fd = watch
        if down and (kind, fd) not in self._watched:
            (self._loop.add_writer if kind == "writer" else self._loop.add_reader)(fd, self._on_fd_event)
            self._watched.append((kind, fd))
        elif not down:
            self._unwatch(kind, fd)

    def _unwatch(self, kind: str | None = None, fd: int | None = None) -> None:
        for entry in [w for w in self._watched if kind in (None, w[0]) and fd in (None, w[1])]:
            (self._loop.remove_reader if entry[0] == "reader" else self._loop.remove_writer)(entry[1])
            self._watched.remove(entry)

    async def stop(self) -> None:
        # The switch has unpublished the port and the PMDs have passed a quiescent point.
        self._unwatch()
        self.set_link(False)
        self._close_native()

    def poll_queues(self) -> list[int]:
        return list(range(self.kp.nqueues))

    def gone_reason(self, err: int) -> str:
        """Why the interface is gone, from the errno the link check got."""
        return os.strerror(err)

    def _follow_mtu(self) -> None:
        """The port takes what the interface takes: the kernel would refuse
        (AF_PACKET) or pass on (TAP) a longer frame.  Unknown (a TAP moved to
        another namespace): the last one seen stays."""
        mtu = self._interface_mtu()
        if mtu > 0 and mtu != self.mtu:
            if self.mtu is not None:
                log.info("port '%s': interface %s MTU %d", self.name, self.ifname, mtu)
            self.set_mtu(mtu)

    def housekeep(self) -> None:
        """Follows the interface's state into the link state and its MTU
        into the port's (once a second, and on notifications)."""
        self._follow_mtu()
        state = self.c.ops.link_state(self.c)
        if state < 0:
            reason = f"interface {self.ifname} is gone ({self.gone_reason(-state)})"
        elif state == 0:
            reason = f"interface {self.ifname} is down"
        else:
            reason = None
        if reason != self._reason:
            if reason:
                self._pending_errors.append(f"port '{self.name}': {reason}; link down")
            elif self._reason:
                log.info("port '%s': interface %s is up again", self.name, self.ifname)
            self._reason = reason
        self.set_link(state == 1)
        if state < 0:
            self._unwatch()   # gone for good: nothing more to hear
        else:
            self._watch_fd_while_down(state == 0)

    def errors(self) -> list[str]:
        lines, self._pending_errors = self._pending_errors, []
        return lines

    def stats(self) -> dict:
        total = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
                               "tx_packets", "tx_bytes", "tx_dropped", "tx_errors"), 0)
        for q in range(max(self.kp.nqueues, 1)):
            s = self.kp.stats[q]
            for key in total:
                total[key] += getattr(s, key)
        total["tx_dropped"] += self.c.stats.tx_dropped_down + self.c.stats.tx_dropped_mtu
        total["tx_dropped_mtu"] = self.c.stats.tx_dropped_mtu   # of tx_dropped: longer than the MTU
        total["tx_errors"] += self.c.stats.tx_dropped_offload
        return total

    def queue_stats(self) -> list[dict]:
        out = []
        for q in range(self.kp.nqueues):
            s = self.kp.stats[q]
            for direction in ("rx", "tx"):
                out.append({"queue": q, "direction": direction,
                            **{key: getattr(s, f"{direction}_{key}") for key in ("packets", "bytes", "dropped",
                                                                                 "errors")}})
        return out

    def info(self) -> dict:
        info = super().info()
        info.update({"ifname": self.ifname, "netns": self.netns, "queues": self.kp.nqueues or self.queues,
                     "offloads": self._offloads()})
        if self._reason:
            info["link_reason"] = self._reason
        return info
