"""PMD threads: the C packet loop (pmd.c) running on its own thread.

`cffi` releases the GIL for the whole of `vs_pmd_run`, so the loop runs in
parallel with the Python control plane and never calls back into Python.

Reclamation is epoch-based.  A PMD bumps its epoch at the top of every pass,
so once the epoch has moved past the value read after a change, no pass
that could have seen the old state is still running.  Whatever the control
plane takes away from the PMDs (an old port table and the ports only it
referenced, replaced guest memory, the fds of stopped rings) goes to the
Reclaimer with the running PMDs' epochs at that moment, and is freed only
once each of them has moved.  The control loop waits for that at most
QUICK_WAIT_SECONDS; a PMD that is stuck (say, blocked in a write to a
front-end's fd) leaves the entry pending, retried from the event loop and
logged if it waits long, never freed early.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vswitch.native import ffi, lib
from vswitch.pmd import cpu_wake

log = logging.getLogger(__name__)

CALL_WATCHDOG_MS = 20          # how often CallWatchdog looks; stalls are cut after VS_PMD_CALL_STALL_MS
# The longest the control loop waits for the PMDs before deferring a free.
QUICK_WAIT_SECONDS = 0.005
# Halting a ring must know where the PMD left it, so that waits longer, but
# not for a PMD already known to be stuck (a free waited this long for it).
HALT_WAIT_SECONDS = 0.1
# How often pending reclaims are retried, and when a pending one is logged.
RECLAIM_RETRY_SECONDS = 0.02
RECLAIM_WARN_SECONDS = 2.0


class PmdThread:
    def __init__(self, index: int, fib, cpu: int | None = None, poll_only: bool = False, yield_light: bool = False):
        self.index = index
        self.cpu = cpu
        self.c = ffi.new("struct vs_pmd *")
        rc = lib.vs_pmd_init(self.c, fib.c)
        if rc != 0:
            raise OSError(-rc, f"PMD {index}: cannot create its wake-up eventfd or install its watchdog signal handler")
        self.c.poll_only = poll_only
        self.c.yield_light = yield_light
        self._thread: threading.Thread | None = None
        # The published table and every port it points to stay referenced here.
        self._table = None
        self._table_refs: list = []
        self._polls: list = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pmd{self.index}", daemon=True)
        self._thread.start()

    @property
    def epoch(self) -> int:
        return int(self.c.epoch)

    @property
    def running(self) -> bool:
        return bool(self.c.running)

    def wake(self) -> None:
        """Cuts a sleeping PMD's sleep short (and naps 20 us if its epoch has not moved)."""
        lib.vs_pmd_quiesce(self.c, 0)

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

    def quiesce(self, timeout: float = HALT_WAIT_SECONDS) -> bool:
        """True once the PMD has finished any pass that began before the call;
        False if it has not within `timeout` seconds (it may be stuck)."""
        return wait_for_epochs([(self, self.epoch)], timeout)

    def publish(self, ports: list, poll: list[tuple[object, int]]) -> tuple:
        """Swaps in a new port table: `ports` are Port objects, `poll` (port, queue) pairs.
        Returns the old table with what it references, for the caller to reclaim."""
        table = ffi.new("struct vs_port_table *")
        for port in ports:
            table.ports[port.port_no] = port.c
            table.n_vlan += port.c.vlan != ffi.NULL
            if getattr(port, "mirror_output", False):
                continue   # a mirror's output port takes only the mirror's copies, never a flood
            table.live[table.n_live] = port.port_no
            table.n_live += 1
        for port, queue in poll:
            table.poll[table.n_poll].port = port.c
            table.poll[table.n_poll].queue = queue
            table.n_poll += 1
        lib.vs_pmd_publish(self.c, table)
        old = (self._table, self._table_refs, self._polls)
        self._table = table
        self._table_refs = list(ports)
        self._polls = list(poll)
        return old

    def reset_max_gap(self) -> None:
        """Restarts max_gap_us: the thread zeroes it at the start of its next pass."""
        self.c.gap_reset = 1

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
            "poll_only": bool(self.c.poll_only), "sleeps": s.sleeps, "yield": bool(self.c.yield_light), "yields": s.yields, "yield_sleeps": s.yield_sleeps, "shared_sleeps": s.shared_sleeps, "kick_wakeups": s.kick_wakeups, "flooded": s.flooded, "unicast": s.unicast,
            "dropped_same_port": s.dropped_same_port, "calls_blocked": self.c.call_watch.blocked,
            "max_gap_us": round(s.max_gap_cycles * 1e6 / self.c.tsc_hz, 1) if self.c.tsc_hz else 0.0,
            "rx_queues": [{"port": port.name, "queue": queue} for port, queue in self._polls],
            "cpu_resume_latency": None if self.cpu is None else cpu_wake.current(self.cpu),
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
def wait_for_epochs(epochs: list[tuple[PmdThread, int]], timeout: float) -> bool:
    """True once every PMD in (pmd, epoch) pairs has stopped or moved past its epoch;
    False if some has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = [pmd for pmd, epoch in epochs if pmd.running and pmd.epoch == epoch]
        if not waiting:
            return True
        if time.monotonic() >= deadline:
            return False
        for pmd in waiting:
            pmd.wake()


@dataclass
class _Pending:
    what: str
    release: Callable[[], None]
    epochs: list[tuple[PmdThread, int]]
    since: float
    warned: bool = False


class Reclaimer:
    """Frees what the PMD threads may still read once each has moved on (see the module docstring)."""

    def __init__(self, pmds: list[PmdThread]):
        self.pmds = pmds
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending(self) -> list[str]:
        return [p.what for p in self._pending]

    def _epochs(self) -> list[tuple[PmdThread, int]]:
        return [(pmd, pmd.epoch) for pmd in self.pmds if pmd.running]

    def quiesce(self) -> bool:
        """Waits (at most HALT_WAIT_SECONDS) for every PMD to finish the pass it
        is in; False if one did not, at once for a PMD known to be stuck."""
        stuck = self._known_stuck()
        epochs = [(pmd, epoch) for pmd, epoch in self._epochs() if pmd not in stuck]
        return wait_for_epochs(epochs, HALT_WAIT_SECONDS) and not stuck

    def _known_stuck(self) -> set[PmdThread]:
        now = time.monotonic()
        return {pmd for entry in self._pending if now - entry.since > HALT_WAIT_SECONDS
                for pmd, epoch in entry.epochs if pmd.running and pmd.epoch == epoch}

    def defer(self, what: str, release: Callable[[], None]) -> bool:
        """Calls release() once no PMD can use what it frees: at once if the PMDs
        pass a quiescent point within QUICK_WAIT_SECONDS, else later from the
        event loop.  Returns True if it was released at once."""
        epochs = self._epochs()
        if wait_for_epochs(epochs, QUICK_WAIT_SECONDS):
            self._release(what, release)
            return True
        self._pending.append(_Pending(what, release, epochs, time.monotonic()))
        self._schedule()
        return False

    def _release(self, what: str, release: Callable[[], None]) -> None:
        try:
            release()
        except Exception:  # freeing one thing must not stop the others
            log.exception("reclaiming %s failed", what)

    def _schedule(self) -> None:
        if self._timer is not None or not self._pending:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None or self._loop.is_closed():
                return  # no loop yet: flush() or the next defer() picks it up
        self._timer = self._loop.call_later(RECLAIM_RETRY_SECONDS, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self.poll()
        self._schedule()

    def poll(self) -> None:
        """Frees every pending entry whose PMDs have all moved on."""
        now = time.monotonic()
        still = []
        for entry in self._pending:
            stuck = [pmd for pmd, epoch in entry.epochs if pmd.running and pmd.epoch == epoch]
            if not stuck:
                if entry.warned:
                    log.info("freed %s after %.1f s", entry.what, now - entry.since)
                self._release(entry.what, entry.release)
                continue
            for pmd in stuck:
                pmd.wake()
            if not entry.warned and now - entry.since > RECLAIM_WARN_SECONDS:
                entry.warned = True
                log.warning("PMD %s has not passed a quiescent point for %.1f s: %s stays allocated "
                            "until it does", ", ".join(str(p.index) for p in stuck), now - entry.since,
                            entry.what)
            still.append(entry)
        self._pending = still

    def flush(self) -> None:
        """At shutdown, after the PMDs stopped: frees what no running PMD can read."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.poll()
        if self._pending:
            log.warning("left allocated at shutdown (a PMD did not stop): %s", ", ".join(self.pending))
