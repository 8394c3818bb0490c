"""Null ports: a port with nothing behind it, like OVS's dummy netdev.

`type: null`: what the switch sends there is counted and dropped; with
`rx_loop: true` it comes back in on the same port instead (a loopback),
which makes one guest and a null port enough for a benchmark or a test.
The fast path is the C operations table in null.c (`vs_null_port_ops`);
this module is its control side, and registers the type only when the
built library has that table.
"""

from __future__ import annotations

from vswitch.native import ffi, lib
from vswitch.ports.base import STAT_KEYS, Port
from vswitch.ports.registry import Key, register


def _null_ops():
    """The C table, whether the library exports it as a global or through an accessor."""
    ops = getattr(lib, "vs_null_port_ops", None)
    if ops is None:
        return None
    return ops() if callable(ops) else ffi.addressof(lib, "vs_null_port_ops")


def _has_struct(name: str) -> bool:
    try:
        ffi.typeof(name)
        return True
    except ffi.error:
        return False


class NullPort(Port):
    type = "null"
    help = "nothing behind it: frames are counted and dropped, or looped back (rx_loop)"
    keys = (
        Key("rx_loop", bool, "send every frame the port gets back into the switch through it", default=False),
    )

    def __init__(self, name: str, port_no: int, spec: dict, emit):
        super().__init__(name, port_no, spec, emit)
        self.rx_loop: bool = spec.get("rx_loop", False)
        self.c.ops = _null_ops()
        # The type's own state, if null.c has one (counters, the loop flag).
        self.state = ffi.new("struct vs_null_port *") if _has_struct("struct vs_null_port *") else None
        if self.state is not None:
            if hasattr(self.state, "rx_loop"):
                self.state.rx_loop = 1 if self.rx_loop else 0
            self.c.priv = self.state

    def start(self) -> None:
        self.set_link(True)

    async def stop(self) -> None:
        self.set_link(False)

    def poll_queues(self) -> list[int]:
        # Only a loopback has anything to receive.
        return [0] if self.rx_loop else []

    def stats(self) -> dict:
        counters = {key: int(getattr(self.state, key, 0)) if self.state is not None else 0 for key in STAT_KEYS}
        counters["tx_dropped"] += self.c.stats.tx_dropped_down
        counters["tx_errors"] += self.c.stats.tx_dropped_offload
        return counters

    def info(self) -> dict:
        info = super().info()
        info["mode"] = "loopback" if self.rx_loop else "sink"
        return info


# Until null.c is built in, the type does not exist rather than half-exist.
if hasattr(lib, "vs_null_port_ops"):
    register(NullPort)
