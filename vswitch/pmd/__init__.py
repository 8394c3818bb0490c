"""PMD threads: the C packet loop (pmd.c) running on its own thread.

`cffi` releases the GIL for the whole of `vs_pmd_run`, so the loop runs in
parallel with the Python control plane and never calls back into Python.
"""

from __future__ import annotations

import logging
import os
import threading

from vswitch.native import ffi, lib

log = logging.getLogger(__name__)

QUIESCE_TIMEOUT_MS = 2000
CALL_WATCHDOG_MS = 20          # how often CallWatchdog looks; stalls are cut after VS_PMD_CALL_STALL_MS


class PmdThread:
    def __init__(self, index: int, fib, cpu: int | None = None):
        self.index = index
        self.cpu = cpu
        self.c = ffi.new("struct vs_pmd *")
        rc = lib.vs_pmd_init(self.c, fib.c)
        if rc != 0:
            raise OSError(-rc, f"PMD {index}: cannot create its wake-up eventfd or install its watchdog signal handler")
        self._thread: threading.Thread | None = None
        # The published table and every port it points to stay referenced here.
        self._table = None
        self._table_refs: list = []
        self._polls: list = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pmd{self.index}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        lib.vs_pmd_run(self.c)

    def stop(self) -> None:
        if self._thread:
            lib.vs_pmd_stop(self.c)
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.error("PMD %d did not stop within 5 s", self.index)
            self._thread = None
        lib.vs_pmd_fini(self.c)

    def quiesce(self) -> None:
        """Returns once the PMD has finished any pass that began before the call."""
        if lib.vs_pmd_quiesce(self.c, QUIESCE_TIMEOUT_MS) != 0:
            log.error("PMD %d did not pass a quiescent point within %d ms",
                      self.index, QUIESCE_TIMEOUT_MS)

    def publish(self, ports: list, poll: list[tuple[object, int]]) -> None:
        """Swaps in a new port table: `ports` are Port objects, `poll` (port, queue) pairs."""
        table = ffi.new("struct vs_port_table *")
        for port in ports:
            table.ports[port.port_no] = port.c
            table.live[table.n_live] = port.port_no
            table.n_live += 1
        for port, queue in poll:
            table.poll[table.n_poll].port = port.c
            table.poll[table.n_poll].queue = queue
            table.n_poll += 1
        lib.vs_pmd_publish(self.c, table)
        self.quiesce()
        # Only now is the old table (and any port only it referenced) unused.
        self._table = table
        self._table_refs = list(ports)
        self._polls = list(poll)

    def stats(self) -> dict:
        """Counters since start, plus the derived figures OVS's pmd-perf-show prints."""
        s = self.c.stats
        busy, idle = s.busy_cycles, s.idle_cycles
        return {
            "pmd": self.index, "cpu": self.cpu, "loops": s.loops, "packets": s.packets, "bursts": s.bursts,
            "busy_cycles": busy, "idle_cycles": idle,
            "busy_percent": round(100.0 * busy / (busy + idle), 1) if busy + idle else 0.0,
            "cycles_per_packet": round(busy / s.packets, 1) if s.packets else 0.0,
            "packets_per_burst": round(s.packets / s.bursts, 1) if s.bursts else 0.0,
            "sleeps": s.sleeps, "kick_wakeups": s.kick_wakeups, "flooded": s.flooded, "unicast": s.unicast,
            "dropped_same_port": s.dropped_same_port, "calls_blocked": self.c.call_watch.blocked,
            "rx_queues": [{"port": port.name, "queue": queue} for port, queue in self._polls],
        }


class CallWatchdog:
    """Keeps a front-end from stalling a PMD through its call eventfd.

    A front-end shares each call eventfd with us; it can clear O_NONBLOCK and
    fill the counter, and our next write() to it then blocks.  A C loop on a
    thread of its own (vs_call_watchdog_run, GIL released) looks at each
    PMD's pending call write every CALL_WATCHDOG_MS and interrupts one older
    than VS_PMD_CALL_STALL_MS; the PMD then stops notifying that ring and
    sets the device's VS_DEV_FAULT_CALL_BLOCKED, which the port reacts to.
    Stop it before the PMD threads.
    """

    def __init__(self, pmds: list[PmdThread]):
        self._pmd_ptrs = ffi.new("struct vs_pmd *[]", [p.c for p in pmds])
        self.c = ffi.new("struct vs_call_watchdog *")
        self.c.pmds = self._pmd_ptrs
        self.c.n_pmds = len(pmds)
        self.c.interval_ms = CALL_WATCHDOG_MS
        self.c.stall_ms = lib.VS_PMD_CALL_STALL_MS
        self._pmds = pmds        # the structs above point into these
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lib.vs_call_watchdog_run, args=(self.c,),
                                        name="call-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            self.c.stop = 1
            self._thread.join(timeout=5)
            self._thread = None
