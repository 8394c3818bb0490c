"""Capture and mirroring: the control plane's side (README "Capture and mirroring").

A capture is a ring in memory allocated here and written by the PMDs
(pmd/capture.h): the frames a port receives, is sent, or both, cut to a
snap length.  The control plane drains it every DRAIN_SECONDS and streams
the frames to `vswitchctl capture`, which writes the pcap file with scapy;
a ring the reader does not keep up with drops and counts (capture_dropped).

A mirror (`mirrors:` in the config, like Open vSwitch's) sends a copy of
every frame its selected ports receive and/or are sent to its output port.
The output port is then a mirror port only: it is left out of flooding and
what it receives is dropped (mirror_output_dropped), as in Open vSwitch.
"""

from __future__ import annotations

import re
import struct

from vswitch.native import ffi, lib

DIRECTIONS = ("rx", "tx", "both")
DEFAULT_SNAPLEN = 65535
MAX_SNAPLEN = 65535
# Ring memory per capture: as many slots as fit (a power of two), within these bounds.
RING_BYTES = 16 << 20
MIN_SLOTS = 256
MAX_SLOTS = 65536
READ_BYTES = 1 << 20
DRAIN_SECONDS = 0.005
MAX_MIRRORS_PER_PORT = 8        # VS_MONITOR_MAX in pmd/capture.h
MIRROR_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_RECORD = struct.Struct("<QQII")


class CaptureProblem(ValueError):
    """What is wrong with a capture request or a mirror, in one line."""


def slot_size(snaplen: int) -> int:
    return (lib.VS_CAPTURE_HDR + snaplen + 7) & ~7


def default_slots(snaplen: int) -> int:
    fit = max(1, RING_BYTES // slot_size(snaplen))
    return min(MAX_SLOTS, max(MIN_SLOTS, 1 << (fit.bit_length() - 1)))


def check_direction(direction) -> str:
    if direction not in DIRECTIONS:
        raise CaptureProblem(f"direction {direction!r} must be one of {', '.join(DIRECTIONS)}")
    return direction


def check_snaplen(snaplen) -> int:
    if isinstance(snaplen, bool) or not isinstance(snaplen, int) or not 1 <= snaplen <= MAX_SNAPLEN:
        raise CaptureProblem(f"snaplen {snaplen!r} must be a whole number from 1 to {MAX_SNAPLEN}")
    return snaplen


class Capture:
    """One capture ring: `port` and `direction` say which frames go into it."""

    def __init__(self, port: str, direction: str = "both", snaplen: int = DEFAULT_SNAPLEN,
                 slots: int | None = None):
        self.port = port
        self.direction = check_direction(direction)
        self.snaplen = check_snaplen(snaplen)
        self.n_slots = slots or default_slots(snaplen)
        self._mem = ffi.new("uint8_t[]", self.n_slots * slot_size(snaplen))
        self.c = ffi.new("struct vs_capture *")
        rc = lib.vs_capture_init(self.c, self._mem, self.n_slots, snaplen)
        if rc != 0:
            raise CaptureProblem(f"cannot set up a capture ring of {self.n_slots} slots")
        self._buf = ffi.new("uint8_t[]", max(READ_BYTES, slot_size(snaplen)))
        self._frames = ffi.new("uint32_t *")
        self.ended: str | None = None    # why the switch ended it (its port went away), or None

    @property
    def rx(self) -> bool:
        return self.direction in ("rx", "both")

    @property
    def tx(self) -> bool:
        return self.direction in ("tx", "both")

    @property
    def captured(self) -> int:
        return int(self.c.captured)

    @property
    def dropped(self) -> int:
        return int(self.c.dropped)

    def read(self) -> list[tuple[int, int, bytes]]:
        """The frames written since the last read, oldest first: (time in ns, length on the wire, bytes kept)."""
        out = []
        while True:
            used = lib.vs_capture_read(self.c, self._buf, len(self._buf), self._frames)
            if not used:
                return out
            data = ffi.buffer(self._buf, used)[:]
            offset = 0
            for _ in range(self._frames[0]):
                _, time_ns, wire_len, caplen = _RECORD.unpack_from(data, offset)
                start = offset + lib.VS_CAPTURE_HDR
                out.append((time_ns, wire_len, data[start:start + caplen]))
                offset += (lib.VS_CAPTURE_HDR + caplen + 7) & ~7


def check_mirror(spec, ports: set[str] | None, where: str) -> dict:
    """A mirror entry, normalised ({name, select, output, select_direction}), or CaptureProblem
    naming the key.  `ports` are the port names that exist (None: not checked here)."""
    if not isinstance(spec, dict):
        raise CaptureProblem(f"{where}: must be a mapping with name, select, output")
    unknown = [k for k in spec if k not in ("name", "select", "output", "select_direction")]
    if unknown:
        raise CaptureProblem(f"{where}: unknown key '{unknown[0]}' (name, select, output, select_direction)")
    name = spec.get("name")
    if not isinstance(name, str) or not MIRROR_NAME.match(name):
        raise CaptureProblem(f"{where}.name: {name!r} is not a mirror name (a letter, then up to 31 letters, "
                             "digits, '-' or '_')")
    where = f"{where} ({name})"
    select = spec.get("select")
    if not isinstance(select, list) or not select or not all(isinstance(p, str) for p in select):
        raise CaptureProblem(f"{where}.select: {select!r} must be a list of port names")
    dup = [p for i, p in enumerate(select) if p in select[:i]]
    if dup:
        raise CaptureProblem(f"{where}.select: port '{dup[0]}' is listed twice")
    output = spec.get("output")
    if not isinstance(output, str):
        raise CaptureProblem(f"{where}.output: {output!r} must be a port name")
    if output in select:
        raise CaptureProblem(f"{where}.output: port '{output}' cannot be both selected and the output")
    direction = spec.get("select_direction", "both")
    if direction not in DIRECTIONS:
        raise CaptureProblem(f"{where}.select_direction: {direction!r} must be one of {', '.join(DIRECTIONS)}")
    if ports is not None:
        for p in select:
            if p not in ports:
                raise CaptureProblem(f"{where}.select: no port named '{p}'")
        if output not in ports:
            raise CaptureProblem(f"{where}.output: no port named '{output}'")
    out = {"name": name, "select": list(select), "output": output}
    if direction != "both":
        out["select_direction"] = direction
    return out


def check_mirrors(mirrors: list[dict], where: str) -> None:
    """Rules between mirrors: distinct names, and no output port selected by a mirror (a copy of a
    copy could loop between two mirrors)."""
    names: set[str] = set()
    for port in {p for m in mirrors for p in m["select"]}:
        if sum(port in m["select"] for m in mirrors) > MAX_MIRRORS_PER_PORT:
            raise CaptureProblem(f"{where}: port '{port}' is selected by more than {MAX_MIRRORS_PER_PORT} mirrors")
    selected = {p: m["name"] for m in mirrors for p in m["select"]}
    for i, m in enumerate(mirrors):
        if m["name"] in names:
            raise CaptureProblem(f"{where}[{i}].name: mirror '{m['name']}' is defined twice")
        names.add(m["name"])
        if m["output"] in selected:
            raise CaptureProblem(f"{where}[{i}] ({m['name']}).output: port '{m['output']}' is selected by "
                                 f"mirror '{selected[m['output']]}': an output port cannot be mirrored")


def build_monitor(port, captures: list[Capture], mirrors: list[dict], ports: dict):
    """The struct vs_monitor for `port` (a Port), and what it points to, or (ffi.NULL, []) if it needs none."""
    mine = [c for c in captures if c.port == port.name and c.ended is None]
    rx_mirrors = [ports[m["output"]] for m in mirrors if port.name in m["select"]
                  and m.get("select_direction", "both") in ("rx", "both") and m["output"] in ports]
    tx_mirrors = [ports[m["output"]] for m in mirrors if port.name in m["select"]
                  and m.get("select_direction", "both") in ("tx", "both") and m["output"] in ports]
    is_output = any(m["output"] == port.name for m in mirrors)
    if not mine and not rx_mirrors and not tx_mirrors and not is_output:
        return ffi.NULL, []
    rx_caps = [c for c in mine if c.rx][:lib.VS_MONITOR_MAX]
    tx_caps = [c for c in mine if c.tx][:lib.VS_MONITOR_MAX]
    monitor = ffi.new("struct vs_monitor *")
    for i, c in enumerate(rx_caps):
        monitor.rx_captures[i] = c.c
    for i, c in enumerate(tx_caps):
        monitor.tx_captures[i] = c.c
    monitor.n_rx_captures, monitor.n_tx_captures = len(rx_caps), len(tx_caps)
    for i, p in enumerate(rx_mirrors[:lib.VS_MONITOR_MAX]):
        monitor.rx_mirrors[i] = p.c
    for i, p in enumerate(tx_mirrors[:lib.VS_MONITOR_MAX]):
        monitor.tx_mirrors[i] = p.c
    monitor.n_rx_mirrors = min(len(rx_mirrors), lib.VS_MONITOR_MAX)
    monitor.n_tx_mirrors = min(len(tx_mirrors), lib.VS_MONITOR_MAX)
    monitor.mirror_output = int(is_output)
    return monitor, [*rx_caps, *tx_caps, *rx_mirrors, *tx_mirrors]
