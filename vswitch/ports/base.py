"""The Port interface every port type implements.

A port is two things: a `struct vs_port` (port.h) that the PMD threads read,
and a Python object that opens, configures and closes whatever feeds it (a
vhost-user socket, a TAP fd ...).  The PMD calls the C receive and transmit
functions through the port's operations table; Python is never on the packet path.
"""

from __future__ import annotations

import abc
from typing import Callable

from vswitch.native import ffi
from vswitch.ports import policing, vlan
from vswitch.ports.registry import MTU_FRAME_OVERHEAD

EventSink = Callable[[str, dict], None]

# The settings every port type takes, and the struct vs_port field the PMD reads each from.
C_SETTINGS_FIELDS = {"vlan": "vlan", "policing": "police"}

STAT_KEYS = ("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
             "tx_packets", "tx_bytes", "tx_dropped", "tx_errors")


class Port(abc.ABC):
    """Base class: the C struct, the link state and the event plumbing."""

    # What registry.register reads: the type's name, one line for help, and
    # its config keys (registry.Key) beyond name and type.
    help: str = ""
    keys: tuple = ()
    type: str = ""
    c_ops = None   # the type's struct vs_port_ops (port.h), e.g. lib.vs_tap_port_ops()

    def __init__(self, name: str, port_no: int, spec: dict, emit: EventSink):
        self.name = name
        self.port_no = port_no
        self.spec = dict(spec)
        self._emit = emit
        self.c = ffi.new("struct vs_port *")
        self.c.port_no = port_no
        self.c.ops = self.c_ops
        self.mtu: int | None = None           # None: the port takes frames of any length
        self.vlan: dict | None = None       # validated settings (vlan.check), None for none
        self.policing: dict | None = None   # validated settings (policing.check), None for none
        self._c_settings: dict = {}         # the C structs behind them, kept alive here
        self.capture_rings: list = []       # its running captures (vswitch/capture.py), kept by the switch
        self.capture_dropped_before = 0     # frames its ended captures lost to a full ring
        self.mirror_output = False          # the output of a mirror: out of flooding, receives nothing
        self.set_vlan(spec.get("vlan"))
        self.set_policing(spec.get("policing"))

    def set_mtu(self, mtu: int | None) -> None:
        """The largest IP packet the port takes; longer frames are dropped
        (tx_dropped_mtu), never truncated.  The PMDs see it at once."""
        self.mtu = mtu
        self.c.max_frame = mtu + MTU_FRAME_OVERHEAD if mtu else 0

    @classmethod
    def check_spec(cls, spec: dict) -> list[str]:
        """Problems between keys of a spec whose keys are each valid ("KEY: what is
        wrong"); a type with such rules overrides this."""
        return []

    def sub_name(self, sub: int) -> str | None:
        """What sub-destination sub of the port is (a tunnel's remote), for `fdb show`;
        None for a port without them."""
        return None

    @classmethod
    def create(cls, spec: dict, port_no: int, *, emit: EventSink, **services) -> "Port":
        """Builds the port for a validated spec.  `services` are the switch's
        hooks (quiesce, on_rarp, reclaim), for the types that need them."""
        return cls(spec["name"], port_no, spec, emit)

    @property
    def link_up(self) -> bool:
        return bool(self.c.link_up)

    def set_link(self, up: bool) -> None:
        if bool(self.c.link_up) != up:
            self.c.link_up = 1 if up else 0
            self.emit("link", {"state": "up" if up else "down"})

    def set_vlan(self, settings: dict | None):
        """Points the port at new VLAN settings (validated, or None); see _swap_settings."""
        return self._swap_settings("vlan", settings, vlan.to_c(settings))

    def set_policing(self, settings: dict | None):
        """Points the port at new policing settings (validated, or None); see _swap_settings."""
        return self._swap_settings("policing", settings, policing.to_c(settings))

    def _swap_settings(self, key: str, settings: dict | None, c_settings):
        """Publishes c_settings in the port's struct with one pointer store
        and returns the old C settings, which a PMD may still be reading: the
        caller keeps them until every PMD has moved on."""
        old = self._c_settings.get(key, ffi.NULL)
        self._c_settings[key] = c_settings
        setattr(self.c, C_SETTINGS_FIELDS[key], c_settings)
        setattr(self, key, settings)
        if settings is None:
            self.spec.pop(key, None)
        else:
            self.spec[key] = settings
        return old

    def counters(self) -> dict:
        """stats() and the counters every port type has (VLAN and policing drops, announcements)."""
        return {**self.stats(), "vlan_dropped": self.c.stats.vlan_dropped,
                "police_dropped": self.c.stats.police_dropped,
                "capture_dropped": self.capture_dropped_before + sum(c.dropped for c in self.capture_rings),
                "mirror_output_dropped": self.c.stats.mirror_output_dropped,
                "rarp_sent": self.c.stats.rarp_sent}

    def emit(self, kind: str, fields: dict) -> None:
        self._emit(kind, {"port": self.name, **fields})

    @abc.abstractmethod
    def start(self) -> None:
        """Opens the port (listen, connect, create the interface)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Closes the port; the switch has already unpublished it."""

    @abc.abstractmethod
    def poll_queues(self) -> list[int]:
        """The receive queues a PMD must poll."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Counters named as in STAT_KEYS, plus type-specific ones."""

    def queue_stats(self) -> list[dict]:
        """Per queue and direction: {"queue", "direction" ("rx" from the port, "tx" to it),
        "packets", "bytes", "dropped", "errors"}; empty if the type keeps none."""
        return []

    def error_counts(self) -> dict[str, int]:
        """Receive errors by reason (e.g. a malformed descriptor chain's), if the type tells them apart."""
        return {}

    def housekeep(self) -> None:
        """Called once a second by the switch (link state checks and the like)."""

    def errors(self) -> list[str]:
        """New error reports since the last call, one line each, for the log."""
        return []

    def info(self) -> dict:
        """What `vswitchctl show` prints about the port."""
        info = {"name": self.name, "type": self.type, "port_no": self.port_no, "vlan": self.vlan,
                "policing": self.policing,
                "link": "up" if self.link_up else "down", "stats": self.counters()}
        if self.mtu:
            info["mtu"] = self.mtu
        return info
