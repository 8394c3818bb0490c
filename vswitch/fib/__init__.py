"""The MAC learning table, seen from the control plane.

The table itself is C (fib.c), written by the PMD threads once per burst.
This view adds and removes static entries, flushes, ages and dumps it, each
through a C call that takes the table's lock, so Python never races the PMD.
"""

from __future__ import annotations

import dataclasses

from vswitch.native import ffi, lib

DEFAULT_AGING_SECONDS = 300
DEFAULT_MAX_ENTRIES = 8192
# The largest fdb.max_entries (fib.h VS_FIB_MAX_CAPACITY).
MAX_ENTRIES = lib.VS_FIB_MAX_CAPACITY
# The table is allocated once, for fdb.max_entries at start rounded up to a
# power of two and at least this; `set fdb-max` may move the limit anywhere
# below that, and beyond it after a restart.
MIN_CAPACITY = 1 << 16
# Memory per entry of capacity: the entry and two 4-byte bucket heads.
BYTES_PER_ENTRY = ffi.sizeof("struct vs_fib_entry") + 2 * ffi.sizeof("uint32_t")


def capacity_for(max_entries: int) -> int:
    """The entries allocated for a table started with this limit."""
    capacity = MIN_CAPACITY
    while capacity < max_entries:
        capacity <<= 1
    return capacity


class FibError(ValueError):
    """A request the table refused, e.g. a malformed MAC."""


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise FibError(f"'{text}' is not a MAC address (expected xx:xx:xx:xx:xx:xx)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise FibError(f"'{text}' is not a MAC address (expected xx:xx:xx:xx:xx:xx)") from None


def format_mac(key: int) -> str:
    mac = key & 0xFFFF_FFFF_FFFF
    return ":".join(f"{(mac >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


@dataclasses.dataclass(frozen=True)
class FibEntry:
    mac: str
    vlan: int
    port_no: int
    age: int
    static: bool
    sub: int = 0               # the port's sub-destination (a tunnel's remote, 1 ...); 0: none


class MacTable:
    """Owns the C table; frees it when closed."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES,
                 aging_seconds: int = DEFAULT_AGING_SECONDS):
        if not 0 < max_entries <= MAX_ENTRIES:
            raise FibError(f"fdb max_entries must be between 1 and {MAX_ENTRIES}, not {max_entries}")
        self._fib = lib.vs_fib_create(capacity_for(max_entries), max_entries, aging_seconds)
        if self._fib == ffi.NULL:
            raise MemoryError("cannot create the MAC table (out of memory, or no random hash key)")

    @property
    def c(self):
        """The `struct vs_fib *` the PMD threads use."""
        return self._fib

    def close(self) -> None:
        if self._fib is not None:
            lib.vs_fib_destroy(self._fib)
            self._fib = None

    @property
    def aging_seconds(self) -> int:
        return self._fib.aging_seconds

    @aging_seconds.setter
    def aging_seconds(self, seconds: int) -> None:
        if not 1 <= seconds <= 10**6:
            raise FibError(f"fdb aging must be between 1 and 1000000 seconds, not {seconds}")
        self._fib.aging_seconds = seconds

    @property
    def max_entries(self) -> int:
        return self._fib.max_entries

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        if not 1 <= n <= MAX_ENTRIES:
            raise FibError(f"fdb max_entries must be between 1 and {MAX_ENTRIES}, not {n}")
        if n > self.capacity:
            raise FibError(f"fdb max_entries {n} is above the {self.capacity} entries allocated at start: "
                           f"set fdb.max_entries in the configuration and restart")
        lib.vs_fib_set_max(self._fib, n)

    @property
    def capacity(self) -> int:
        return self._fib.capacity

    def add_static(self, mac: str, port_no: int, vlan: int = 0) -> None:
        key = lib.vs_fib_key(parse_mac(mac), vlan)
        if lib.vs_fib_add_static(self._fib, key, port_no) != 0:
            raise FibError(f"cannot add {mac}: the table is full of static entries, or its hash bucket is full")

    def learn(self, mac: str, port_no: int, vlan: int = 0) -> None:
        """Learns (or moves) a dynamic entry, as if a frame from `mac` arrived on the port."""
        lib.vs_fib_learn_locked(self._fib, lib.vs_fib_key(parse_mac(mac), vlan), port_no)

    def learn_sub(self, mac: str, port_no: int, sub: int, vlan: int = 0) -> None:
        """Learns (or moves) a dynamic entry behind sub-destination sub of the port."""
        lib.vs_fib_learn_sub_locked(self._fib, lib.vs_fib_key(parse_mac(mac), vlan), port_no, sub)

    def remove(self, mac: str, vlan: int = 0) -> bool:
        return lib.vs_fib_remove(self._fib, lib.vs_fib_key(parse_mac(mac), vlan)) == 0

    def lookup(self, mac: str, vlan: int = 0) -> int | None:
        port = lib.vs_fib_lookup_locked(self._fib, lib.vs_fib_key(parse_mac(mac), vlan))
        return None if port < 0 else port

    def flush(self, port_no: int | None = None, include_static: bool = False, vlan: int | None = None) -> int:
        """Removes entries, all or those on one port and/or in one VLAN; the number removed."""
        return lib.vs_fib_flush(self._fib, -1 if port_no is None else port_no, -1 if vlan is None else vlan,
                                int(include_static))

    def age(self, budget: int | None = None) -> int:
        """Removes entries idle for longer than the aging time, at most `budget` of them
        (the rest wait for the next call); run once a second."""
        if budget is None:
            return lib.vs_fib_age(self._fib, lib.vs_now_sec())
        return lib.vs_fib_age_some(self._fib, lib.vs_now_sec(), budget)

    def entries(self) -> list[FibEntry]:
        buf = ffi.new("struct vs_fib_entry[]", self._fib.n_entries + 64)
        n = lib.vs_fib_dump(self._fib, buf, len(buf))
        now = lib.vs_now_sec()
        return [FibEntry(mac=format_mac(e.key), vlan=(e.key >> 48) & 0xFFF, port_no=e.port_no,
                         age=max(0, now - e.last_seen), static=bool(e.flags & lib.VS_FIB_F_STATIC),
                         sub=e.sub)
                for e in buf[0:n]]

    def stats(self) -> dict:
        s = self._fib.stats
        return {"entries": self._fib.n_entries, "max_entries": self._fib.max_entries,
                "capacity": self._fib.capacity, "bytes_per_entry": BYTES_PER_ENTRY,
                "aging_seconds": self._fib.aging_seconds, "learned": s.learned, "moved": s.moved,
                "aged": s.aged, "evicted": s.evicted, "refused": s.refused, "lookups": s.lookups, "hits": s.hits,
                # Contention between PMDs (README "Multi-core plan"); waits in TSC cycles.
                "lock_acquired": s.lock_acquired, "lock_contended": s.lock_contended,
                "lock_wait_cycles": s.lock_wait_cycles, "lock_wait_max_cycles": s.lock_wait_max}
