"""What TAP and AF_PACKET ports share: a `struct vs_kport` (ports/kernel.h).

The C side does the work (opening the fds, the rings, the packet path);
this class opens it in the right network namespace, turns its per-queue
counters into port counters and watches the link once a second.  A port
whose interface goes down or disappears reports the link down; the PMD
stops using an fd that failed (kernel.c) and the other ports never notice.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from vswitch.native import ffi, lib
from vswitch.ports.base import Port

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"   # where `ip netns add` keeps its namespaces


class KernelPort(Port):
    """Base of TapPort and AfPacketPort."""

    def __init__(self, name: str, port_no: int, spec: dict, emit):
        super().__init__(name, port_no, spec, emit)
        self.ifname: str = spec["ifname"]
        self.netns: str | None = spec.get("netns")
        self.queues: int = spec.get("queues", 1)
        self.kp = ffi.new("struct vs_kport *")
        lib.vs_kport_init(self.kp)
        self.c.kport = self.kp
        self._reason: str | None = None       # why the link is down, reported once
        self._pending_errors: list[str] = []

    def _open(self, opener, describe) -> None:
        """Runs `opener(netns_fd)` (a C open call) on a helper thread.

        The C side enters the namespace with setns(), which changes only the
        calling thread; a short-lived thread keeps the event loop's thread
        in the switch's own namespace whatever happens.
        """
        netns_fd = -1
        if self.netns:
            try:
                netns_fd = os.open(os.path.join(NETNS_DIR, self.netns), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OSError(exc.errno, f"network namespace {self.netns}: {exc.strerror}") from None
        result: list[int] = []
        try:
            helper = threading.Thread(target=lambda: result.append(opener(netns_fd)),
                                      name=f"open-{self.name}")
            helper.start()
            helper.join()
        finally:
            if netns_fd >= 0:
                os.close(netns_fd)
        rc = result[0] if result else -errno.EIO
        if rc < 0:
            lib.vs_kport_close(self.kp)
            raise OSError(-rc, describe(-rc))

    async def stop(self) -> None:
        # The switch has unpublished the port and the PMDs have passed a quiescent point.
        self.set_link(False)
        lib.vs_kport_close(self.kp)

    def poll_queues(self) -> list[int]:
        return list(range(self.kp.nqueues))

    def housekeep(self) -> None:
        """Once a second: follow the interface's state into the link state."""
        state = lib.vs_kport_link_state(self.kp)
        if state < 0:
            reason = f"interface {self.ifname} is gone ({os.strerror(-state)})"
        elif state == 0:
            reason = f"interface {self.ifname} is down"
        else:
            reason = None
        if reason != self._reason:
            if reason:
                self._pending_errors.append(f"port '{self.name}': {reason}; link down")
            self._reason = reason
        self.set_link(state == 1)

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
        total["tx_dropped"] += self.c.stats.tx_dropped_down
        total["tx_errors"] += self.c.stats.tx_dropped_offload
        return total

    def info(self) -> dict:
        info = super().info()
        info.update({"ifname": self.ifname, "netns": self.netns, "queues": self.kp.nqueues or self.queues,
                     "offloads": bool(self.kp.vnet_hdr)})
        if self._reason:
            info["link_reason"] = self._reason
        return info
