"""Null ports: a port with no device behind it, like OVS's dummy netdev.

`type: null`, `queues` (default 1), `offloads` (default true: it takes
frames with partial checksums and TSO as they are; false makes the switch
do them in software first, which tests that path).  What the switch sends
there is counted and dropped; what it receives is only what `inject()`
queues, so a test or a benchmark needs no guest and no interface.  The
fast path is null.c's operations table; this module is its control side.
"""

from __future__ import annotations

import os

from vswitch.native import ffi, lib
from vswitch.ports.base import Port
from vswitch.ports.registry import Key, queues_key, register

@register
class NullPort(Port):
    type = "null"
    c_ops = lib.vs_null_port_ops()
    help = "no device behind it: what it is sent is counted and dropped, it receives what a test injects"
    keys = (
        queues_key("receive queues"),
        Key("offloads", bool, "take checksum and TSO offloads as they are (false: done in software first)",
            default=True),
    )

    def __init__(self, name: str, port_no: int, spec: dict, emit):
        super().__init__(name, port_no, spec, emit)
        self.queues: int = spec.get("queues", 1)
        self.offloads: bool = spec.get("offloads", True)
        self.np = ffi.new("struct vs_null_port *")
        self._ready = False   # vs_null_port_init ran: fini has something to release

    def start(self) -> None:
        rc = lib.vs_null_port_init(self.np, self.queues)
        self._ready = True
        if rc < 0:
            raise OSError(-rc, f"cannot set up the null port: {os.strerror(-rc)}")
        if not self.offloads:
            self.np.offload_caps = 0
        self.c.priv = self.np
        self.set_link(True)

    async def stop(self) -> None:
        # The switch has unpublished the port and the PMDs have passed a quiescent point.
        self.set_link(False)
        if self._ready:
            lib.vs_null_port_fini(self.np)
            self._ready = False

    def poll_queues(self) -> list[int]:
        return list(range(self.queues))

    def inject(self, frame: bytes, queue: int = 0) -> int:
        """Queues one frame for the switch to receive from this port: 0 or -errno (null.h)."""
        return lib.vs_null_port_inject(self.np, queue, ffi.from_buffer("uint8_t[]", frame), len(frame))

    def stats(self) -> dict:
        total = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes"), 0)
        for q in range(self.queues):
            s = self.np.queues[q].stats
            for key in total:
                total[key] += getattr(s, key)
        total.update(rx_errors=0, tx_dropped=self.c.stats.tx_dropped_down,
                     tx_errors=self.c.stats.tx_dropped_offload)
        return total

    def queue_stats(self) -> list[dict]:
        out = []
        for q in range(self.queues):
            s = self.np.queues[q].stats
            out.append({"queue": q, "direction": "rx", "packets": s.rx_packets, "bytes": s.rx_bytes,
                        "dropped": s.rx_dropped, "errors": 0})
            out.append({"queue": q, "direction": "tx", "packets": s.tx_packets, "bytes": s.tx_bytes,
                        "dropped": 0, "errors": 0})
        return out

    def info(self) -> dict:
        info = super().info()
        info.update({"mode": "null", "queues": self.queues, "offloads": self.offloads})
        return info
