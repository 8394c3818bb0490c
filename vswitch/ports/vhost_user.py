"""vhost-user ports: a QEMU guest or a DPDK virtio-user app on a UNIX socket.

The protocol lives in vswitch.vhost; this module ties one backend to one
`struct vs_vhost_dev` and turns its rings' counters into port counters.
Switch terms: rx is what the guest transmits (its odd, TX rings), tx is
what the switch delivers into the guest (its even, RX rings).

`features` turns offered virtio features off by name (FEATURE_GROUPS in
vhost/protocol.py).  The port's MTU is the `mtu` key, or for a session
the front-end's VHOST_USER_NET_SET_MTU: what the guest's driver was told.
"""

from __future__ import annotations

import logging
import os

from vswitch.config import DEFAULT_MAX_MEMORY, MAX_MAX_MEMORY, MIN_MAX_MEMORY
from vswitch.native import ffi, lib
from vswitch.ports import registry
from vswitch.ports.base import Port
from vswitch.ports.registry import (SOCKET_ACCESS_KEYS, Key, KeyProblem, mtu_key, parse_size_flag, queues_key,
                                    register, size_check)
from vswitch.vhost import protocol
from vswitch.vhost.connection import SocketAccess
from vswitch.vhost.backend import VhostUserBackend

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 107   # sun_path's size less its terminating NUL


def unix_socket_path(path) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise KeyProblem(f"{path!r} must be an absolute path to a UNIX socket")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise KeyProblem(f"{path} is longer than a UNIX socket path may be ({UNIX_PATH_MAX} bytes)")
    if not os.path.isdir(os.path.dirname(path)):
        raise KeyProblem(f"directory {os.path.dirname(path)} does not exist")
    return path


@register
class VhostUserPort(Port):
    type = "vhost-user"
    c_ops = lib.vs_vhost_port_ops()

    # The back-end defers what the PMDs may still read (memory, ring fds) by
    # itself, so the switch may stop the port right after unpublishing it.
    reclaims_itself = True

    help = "a QEMU guest or a DPDK virtio-user app on a UNIX socket"
    keys = (
        Key("path", str, "the vhost-user socket's absolute path", required=True, check=unix_socket_path,
            metavar="PATH"),
        Key("mode", str, "server: the switch listens; client: it connects", default="server",
            choices=("server", "client")),
        queues_key(),
        *SOCKET_ACCESS_KEYS,
        Key("max_memory", int, "most guest memory the port maps, e.g. 64G (default 1T)",
            check=size_check(MIN_MAX_MEMORY, MAX_MAX_MEMORY, "1M to 64T"), parse_flag=parse_size_flag,
            metavar="SIZE", type_name="size"),
        Key("features", dict, "virtio features not to offer, e.g. mrg_rxbuf=off,tso=off "
            f"({', '.join(protocol.FEATURE_GROUPS)})", names=tuple(protocol.FEATURE_GROUPS),
            metavar="NAME=off,...", type_name="features"),
        Key("iommu", bool, "offer VIRTIO_F_ACCESS_PLATFORM: a guest behind a vIOMMU (QEMU iommu_platform=on) "
            "gives IOVAs, translated and checked through an IOTLB (default off)"),
        Key("postcopy", bool, "offer VHOST_USER_PROTOCOL_F_PAGEFAULT: the guest may arrive by postcopy live "
            "migration (guest memory registered with a userfaultfd; the PMD waits on pages not yet migrated; "
            "no memory hotplug slots; default off)"),
        mtu_key("largest IP packet delivered to the guest (the front-end's NET_SET_MTU overrides it)"),
    )

    @classmethod
    def create(cls, spec, port_no, *, emit, quiesce, on_rarp=None, reclaim=None, port_defaults=None, **services):
        # The switch-wide socket_owner/group/mode apply where the port sets none.
        defaults = {k.name: port_defaults[k.name] for k in SOCKET_ACCESS_KEYS
                    if port_defaults and port_defaults.get(k.name) is not None}
        return cls(spec["name"], port_no, {**defaults, **spec}, emit, quiesce, on_rarp, reclaim)

    def __init__(self, name, port_no, spec, emit, quiesce, on_rarp=None, reclaim=None):
        super().__init__(name, port_no, spec, emit)
        self.queues = spec.get("queues", 1)
        self.dev = ffi.new("struct vs_vhost_dev *")
        lib.vs_vhost_dev_init(self.dev, self.queues)
        self.c.priv = self.dev
        self._on_rarp = on_rarp
        self._reported_errors = [[0] * lib.VS_VQ_ERR_MAX for _ in range(lib.VS_MAX_VRINGS)]
        self.max_memory = spec.get("max_memory", DEFAULT_MAX_MEMORY)
        self.features = spec.get("features") or {}
        self.iommu = bool(spec.get("iommu", False))
        self.postcopy = bool(spec.get("postcopy", False))
        self.configured_mtu = spec.get("mtu", registry.DEFAULT_MTU)
        self.set_mtu(self.configured_mtu)
        self.backend = VhostUserBackend(name, spec["path"], spec.get("mode", "server"), self.queues,
                                        self.dev, quiesce, self._on_backend_event, reclaim=reclaim,
                                        max_memory=self.max_memory, access=self._socket_access(spec),
                                        disabled_features=protocol.disabled_features(self.features),
                                        iommu=self.iommu, postcopy=self.postcopy)

    @staticmethod
    def _socket_access(spec: dict) -> SocketAccess | None:
        access = SocketAccess(spec.get("socket_owner"), spec.get("socket_group"), spec.get("socket_mode"))
        return None if access == SocketAccess() else access

    def _on_backend_event(self, kind: str, fields: dict) -> None:
        if kind == "link":
            self.set_link(fields["up"])
        elif kind == "queue":
            index = fields["queue"]
            self.emit("queue", {"queue": index // 2, "direction": "tx" if index % 2 else "rx",
                                "vring": index, "state": "enabled" if fields["enabled"] else "disabled"})
        elif kind == "mtu":
            # The guest's driver was told this MTU (QEMU host_mtu=): it is what it can take.
            self.set_mtu(fields["mtu"] or self.configured_mtu)
        elif kind == "rarp":
            if self._on_rarp:
                self._on_rarp(self, fields["mac"])
        else:
            self.emit(kind, fields)

    def start(self) -> None:
        self.backend.start()

    async def stop(self) -> None:
        await self.backend.stop()
        self.set_link(False)

    def poll_queues(self) -> list[int]:
        return list(range(self.queues))

    def _rings(self, parity: int):
        return [self.dev.vrings[i] for i in range(parity, 2 * self.queues, 2)]

    def stats(self) -> dict:
        guest_tx, guest_rx = self._rings(1), self._rings(0)
        return {
            "rx_packets": sum(r.stats.packets for r in guest_tx),
            "rx_bytes": sum(r.stats.bytes for r in guest_tx),
            "rx_dropped": sum(r.stats.dropped for r in guest_tx),
            "rx_errors": sum(r.stats.errors for r in guest_tx),
            "tx_packets": sum(r.stats.packets for r in guest_rx),
            "tx_bytes": sum(r.stats.bytes for r in guest_rx),
            "tx_dropped": sum(r.stats.dropped for r in guest_rx) + self.c.stats.tx_dropped_down
            + self.c.stats.tx_dropped_mtu,
            # Of tx_dropped: longer than the port's MTU; larger than the guest's receive buffers.
            "tx_dropped_mtu": self.c.stats.tx_dropped_mtu,
            "tx_dropped_too_big": sum(r.stats.too_big for r in guest_rx),
            "tx_errors": sum(r.stats.errors for r in guest_rx) + self.c.stats.tx_dropped_offload,
            "notifications": sum(r.stats.notifications for r in guest_tx + guest_rx),
            "protocol_errors": self.backend.protocol_errors,
            # NET_SET_MTU requests outside 68..65535, refused.
            "mtu_refused": self.backend.device.mtu_refused,
            # Front-ends disconnected because their guest memory faulted (truncated, unmapped).
            "mem_faults": self.backend.fault_counts["mem_faults"],
            # Front-ends disconnected because a notification to them would block.
            "call_blocked_faults": self.backend.fault_counts["call_blocked_faults"],
        }

    def housekeep(self) -> None:
        # The fault eventfd wakes the back-end at once; this catches a fault
        # bit some thread set without writing it.
        self.backend.check_fault()

    def queue_stats(self) -> list[dict]:
        out = []
        for i in range(2 * self.queues):
            r = self.dev.vrings[i]
            # The switch's view, as for every port: it receives from the guest's TX rings (odd).
            out.append({"vring": i, "queue": i // 2, "direction": "rx" if i % 2 else "tx",
                        "enabled": bool(r.enabled), "broken": bool(r.broken), "size": r.size,
                        "packets": r.stats.packets, "bytes": r.stats.bytes, "dropped": r.stats.dropped,
                        "errors": r.stats.errors, "notifications": r.stats.notifications})
        return out

    def error_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in range(2 * self.queues):
            r = self.dev.vrings[i]
            for e in range(1, lib.VS_VQ_ERR_MAX):
                if r.error_count[e]:
                    name = ffi.string(lib.vs_vq_error_name(e)).decode()
                    counts[name] = counts.get(name, 0) + r.error_count[e]
        return counts

    def errors(self) -> list[str]:
        lines = []
        for i in range(2 * self.queues):
            r = self.dev.vrings[i]
            counts = [r.error_count[e] for e in range(lib.VS_VQ_ERR_MAX)]
            seen = self._reported_errors[i]
            if counts == seen:
                continue
            self._reported_errors[i] = counts
            reasons = ", ".join(f"{now - before} x {ffi.string(lib.vs_vq_error_name(e)).decode()}"
                                for e, (now, before) in enumerate(zip(counts, seen)) if now != before)
            state = " (ring stopped)" if r.broken else ""
            lines.append(f"port '{self.name}' vring {i}: dropped malformed descriptor chains: {reasons}; "
                         f"last at index {r.last_error_index}{state}")
        return lines

    def info(self) -> dict:
        info = super().info()
        info.update({"mode": self.backend.mode, "path": self.spec["path"], "queues": self.queues,
                     "max_memory": self.max_memory, "features": self.features, "iommu": self.iommu,
                     "postcopy": self.postcopy,
                     "vhost": self.backend.info(), "queue_stats": self.queue_stats()})
        return info
