"""The vhost-user back-end of one port: a device (device.py: state, message
table, handlers, rings) behind a connection (connection.py: socket,
reconnects, framing, validation, replies).

This module only ties the two together, with what belongs to neither: the
guest memory fault watch (a fault the C side flags disconnects the
front-end, with one log line and a counter per reason) and the port's
public surface (start, stop, info, counters) for vswitch/ports/vhost_user.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from vswitch.config import DEFAULT_MAX_MEMORY
from vswitch.native import lib
from vswitch.vhost import guestmem
from vswitch.vhost.connection import EventSink, SocketAccess, VhostUserConnection
from vswitch.vhost.device import Reclaim, VhostUserDevice

log = logging.getLogger(__name__)


class VhostUserBackend:
    """The vhost-user back-end of one port.

    name:    the port name, used in log lines.
    path:    the UNIX socket; created by us in "server" mode, by the
             front-end (e.g. QEMU `server=on`) in "client" mode.
    queues:  queue pairs offered (GET_QUEUE_NUM); vrings 0 .. 2*queues-1.
    dev:     the port's `struct vs_vhost_dev *`, already vs_vhost_dev_init'ed.
    quiesce: waits (briefly) until the PMD threads no longer use anything
             they read before the call.
    reclaim(what, release): calls release() once no PMD thread can still
             use what it frees (guest memory, ring fds); by default at once.
    max_memory: the most bytes of guest memory the port maps.
    disabled_features: feature bits the port's config turned off.
    iommu:   offer VIRTIO_F_ACCESS_PLATFORM (vIOMMU; vhost/iotlb.py).
    postcopy: offer PROTOCOL_F_PAGEFAULT (postcopy live migration; vhost/userfault.py).
    on_event(kind, fields): "connected" {}, "disconnected" {},
             "link" {"up": bool}, "queue" {"queue": vring, "enabled": bool},
             "rarp" {"mac": "aa:bb:cc:dd:ee:ff"}, "mtu" {"mtu": int or None}.
    on_rarp(mac_bytes): optional, called on SEND_RARP as well.
    """

    def __init__(self, name: str, path: str, mode: str, queues: int, dev,
                 quiesce: Callable[[], None], on_event: EventSink,
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_rarp: Callable[[bytes], None] | None = None,
                 reclaim: Reclaim | None = None, max_memory: int = DEFAULT_MAX_MEMORY,
                 access: SocketAccess | None = None, disabled_features: int = 0, iommu: bool = False,
                 postcopy: bool = False):
        self.name = name
        self.dev = dev
        self._on_event = on_event
        self._loop = loop
        self._unwatch_faults: Callable[[], None] | None = None
        self.device = VhostUserDevice(name, queues, dev, quiesce, self._emit, on_rarp=on_rarp,
                                      reclaim=reclaim, max_memory=max_memory,
                                      disabled_features=disabled_features, iommu=iommu, postcopy=postcopy)
        self.connection = VhostUserConnection(name, path, mode, self.device, self._emit, loop=loop,
                                              access=access)

    @property
    def mode(self) -> str:
        return self.connection.mode

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def protocol_errors(self) -> int:
        return self.connection.protocol_errors

    @property
    def fault_counts(self) -> dict[str, int]:
        return self.device.fault_counts

    def info(self) -> dict:
        """State for `vswitchctl show`."""
        return {"connected": self.connected, "mode": self.mode, "path": self.connection.path,
                **self.device.info(), "protocol_errors": self.protocol_errors}

    def _emit(self, kind: str, fields: dict) -> None:
        try:
            self._on_event(kind, fields)
        except Exception:  # a broken listener must not break the protocol
            log.exception("vhost-user port '%s': event handler failed on %s", self.name, kind)

    def start(self) -> None:
        """Listens (server) or starts connecting (client).  Must be called on the loop's thread."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._unwatch_faults is None:
            self._unwatch_faults = guestmem.watch(self._loop, self.check_fault)
        self.connection.start(self._loop)

    async def stop(self) -> None:
        """Tears the device down, closes the sockets and, in server mode,
        removes the socket file.  Returns promptly."""
        await self.connection.stop()
        if self._unwatch_faults is not None:
            self._unwatch_faults()
            self._unwatch_faults = None

    def check_fault(self) -> None:
        """Disconnects the front-end if the C side flagged the device (vs_vhost_dev.fault):
        its guest memory faulted, or it does not read its notifications.  One log line.
        The same wake-up carries the IOTLB misses the PMDs recorded: those are sent."""
        self.device.send_iotlb_misses()
        if not self.dev.fault:
            return
        if self.connection.connected:
            self.connection.close("device fault")
        else:
            fault = self.device.describe_fault()
            lib.vs_vhost_dev_take_fault(self.dev)
            log.warning("vhost-user port '%s': %s (no front-end connected)", self.name, fault)
