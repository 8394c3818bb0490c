"""Scale: a MAC table of millions of entries, and what the PMD feels of it.

The PMD threads here forward frames of null ports in generator mode
(null.h struct vs_null_gen), so the thread is busy the whole time without a
Python thread feeding it.  The stall the control plane causes is read from
the PMD's own counter, stats.max_gap_cycles (the longest time between the
starts of two passes), and from the MAC table's longest lock wait.

This host has 2 cores shared with other jobs: a thread preempted by the
kernel makes a gap that no code of ours made.  So an attempt counts only if
neither the PMD thread nor the thread doing the aging was switched out
out, by the kernel or the hypervisor: both threads never sleep, so a window
counts only if each ran for all of it but LOST_NS, by its own run time
(/proc/self/task/TID/schedstat, which leaves out the hypervisor's steal);
the test fails if too few are clean.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from tests.support.null_pmd import NullPort
from vswitch.config import ConfigError, parse
from vswitch.fib import BYTES_PER_ENTRY, MAX_ENTRIES, FibError, MacTable, capacity_for
from vswitch.native import ffi, lib

DEADLINE = 10.0
MILLION = 1 << 20


def on_cpu_ns(tid: int) -> int:
    """The time thread tid has run, in ns (/proc/self/task/TID/schedstat); time
    the hypervisor stole from this virtual machine is left out of it."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


# A window counts if each thread, never sleeping, ran for all but this much of it.
LOST_NS = 100_000


class GeneratorPmd:
    """A PMD thread forwarding between null ports in generator mode, over `fib`."""

    def __init__(self, fib: MacTable, ports: list[NullPort]):
        self.fib = fib
        self.ports = ports
        self.pmd = ffi.new("struct vs_pmd *")
        assert lib.vs_pmd_init(self.pmd, fib.c) == 0
        self.table = ffi.new("struct vs_port_table *")
        for p in ports:
            self.table.ports[p.port.port_no] = p.port
            self.table.live[self.table.n_live] = p.port.port_no
            self.table.n_live += 1
            for q in range(p.queues):
                self.table.poll[self.table.n_poll].port = p.port
                self.table.poll[self.table.n_poll].queue = q
                self.table.n_poll += 1
        lib.vs_pmd_publish(self.pmd, self.table)
        self.tid = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        lib.vs_pmd_run(self.pmd)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + DEADLINE
        while self.pmd.stats.packets < 100_000:
            assert time.monotonic() < deadline, "the PMD thread forwards nothing"
            time.sleep(0.01)

    def cycles_to_us(self, cycles: int) -> float:
        return cycles * 1e6 / self.pmd.tsc_hz

    def close(self) -> None:
        lib.vs_pmd_stop(self.pmd)
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "the PMD thread did not stop"
        lib.vs_pmd_fini(self.pmd)


def generate(port: NullPort, dst: int, src_base: int, n_src: int, length: int = 64) -> None:
    assert lib.vs_null_port_generate(port.np, dst.to_bytes(6, "big"), src_base, n_src, length) == 0


def fill(fib: MacTable, n: int, last_seen: int) -> None:
    """n dynamic entries spread over ports 10 to 17, all last seen at `last_seen`."""
    learn = lib.vs_fib_learn
    c = fib.c
    lib.vs_fib_lock(c)
    try:
        for i in range(n):
            learn(c, 0x0A0000000000 | i, 10 + (i & 7), last_seen)
    finally:
        lib.vs_fib_unlock(c)
    assert c.n_entries >= n


# --- Size -----------------------------------------------------------------------------

def test_the_table_takes_four_million_entries_and_memory_as_used():
    assert MAX_ENTRIES >= 4_194_304
    assert parse({"fdb": {"max_entries": 4194304}}).fdb_max_entries == 4_194_304
    with pytest.raises(ConfigError, match="max_entries"):
        parse({"fdb": {"max_entries": 4194305}})
    assert BYTES_PER_ENTRY == 40
    assert capacity_for(8192) == 1 << 16 and capacity_for(1_000_000) == 1 << 20

    rss0 = psutil.Process().memory_info().rss
    t = MacTable(max_entries=MAX_ENTRIES)
    try:
        assert t.capacity == MAX_ENTRIES
        # The bucket heads (8 bytes per entry) are written at creation; the entries
        # (32 bytes each) only as they are used.
        grown = psutil.Process().memory_info().rss - rss0
        assert grown < 48 << 20, f"{grown >> 20} MiB resident for an empty table"
        fill(t, 100_000, 1000)
        assert t.c.n_entries == 100_000
        assert t.lookup("0a:00:00:00:00:05") == 15
    finally:
        t.close()


def test_raising_the_limit_past_the_allocation_is_refused_with_the_way_out():
    t = MacTable(max_entries=8192)
    try:
        t.max_entries = 1 << 16     # within what was allocated at start
        with pytest.raises(FibError, match="set fdb.max_entries in the configuration and restart"):
            t.max_entries = (1 << 16) + 1
        assert t.max_entries == 1 << 16
    finally:
        t.close()


def test_shrinking_a_full_table_leaves_the_limit_and_every_list_consistent():
    t = MacTable(max_entries=1 << 17)
    try:
        fill(t, 1 << 17, 1000)
        t.max_entries = 1000
        assert t.c.n_entries == 1000 and t.stats()["evicted"] == (1 << 17) - 1000
        assert len(t.entries()) == 1000
        # A learn into the full, shrunk table evicts one and adds one.
        t.learn("02:00:00:00:00:01", 3)
        assert t.c.n_entries == 1000 and t.lookup("02:00:00:00:00:01") == 3
        assert t.flush() == 1000 and t.c.n_entries == 0
    finally:
        t.close()


# --- The generator ----------------------------------------------------------------------

def test_the_null_generator_cycles_source_macs(closing):
    a, b = NullPort(0), NullPort(1)
    closing(a)
    closing(b)
    generate(a, dst=0x020000000001, src_base=0x020000100000, n_src=1000)
    assert lib.vs_null_port_generate(b.np, bytes(6), 0x010000000000, 1, 64) == -22   # multicast source
    assert lib.vs_null_port_generate(b.np, bytes(6), 1, 0, 64) == -22
    fib = MacTable(max_entries=4096)
    closing(fib)
    pmd = ffi.new("struct vs_pmd *")
    assert lib.vs_pmd_init(pmd, fib.c) == 0
    table = ffi.new("struct vs_port_table *")
    for p in (a, b):
        table.ports[p.port.port_no] = p.port
        table.live[table.n_live] = p.port.port_no
        table.n_live += 1
    table.poll[0].port = a.port
    table.n_poll = 1
    lib.vs_pmd_publish(pmd, table)
    try:
        for _ in range(100):
            assert lib.vs_pmd_poll_once(pmd) == lib.VS_BURST
    finally:
        lib.vs_pmd_fini(pmd)
    # 3200 frames from 1000 sources: each learned once on port 0, each flooded to port 1.
    assert fib.c.n_entries == 1000 and fib.c.stats.learned == 1000
    assert fib.lookup("02:00:00:10:00:00") == 0 and fib.lookup("02:00:00:10:03:e7") == 0
    assert fib.lookup("02:00:00:10:03:e8") is None
    assert b.np.queues[0].stats.tx_packets == 3200 and a.np.queues[0].stats.rx_packets == 3200


# --- Stalls -----------------------------------------------------------------------------

def age_in_windows(fib: MacTable, pmd: GeneratorPmd, me: int, clean_gaps: list[float]) -> int:
    """Ages the idle million 1024 entries at a time; appends the PMD's longest gap
    of each window in which both threads ran throughout.  The number of windows."""
    windows, aged = 0, 0
    while aged < MILLION:
        # The window opens before the counter restarts and closes after it is read,
        # so any gap it shows lies inside the window.
        ran0, start = (on_cpu_ns(pmd.tid), on_cpu_ns(me)), time.perf_counter_ns()
        pmd.pmd.gap_reset = 1
        while pmd.pmd.gap_reset:
            pass
        aged += lib.vs_fib_age_some(fib.c, 1000 + 300, 1024)
        gap = pmd.pmd.stats.max_gap_cycles
        ran1, end = (on_cpu_ns(pmd.tid), on_cpu_ns(me)), time.perf_counter_ns()
        windows += 1
        if all(end - start - (r1 - r0) < LOST_NS for r0, r1 in zip(ran0, ran1)):
            clean_gaps.append(pmd.cycles_to_us(gap))
    assert aged == MILLION
    return windows


def test_aging_a_million_entries_never_stalls_the_pmd_for_a_millisecond(closing):
    """A PMD forwards between two null ports while learning 65536 new source
    MACs in turn; meanwhile the control plane ages 2^20 idle entries.

    Two measures.  (1) The CPU time of the longest hold of
    the lock while vs_fib_age ages the whole million in one call: what the
    design lets a PMD wait, preemption of the holder left out.  (2) The PMD's
    own longest gap between passes, while the million is aged again in
    windows of 1024 entries (vs_fib_age_some), counting only the windows in
    which both threads ran all the time (see LOST_NS); at least 16 must
    be clean, or the host is too busy to say.  (1) stays under 1 ms; (2) in
    nine windows of ten (wall time on a shared host, see below)."""
    fib = MacTable(max_entries=MILLION + (1 << 17), aging_seconds=300)
    closing(fib)
    a, b = NullPort(0), NullPort(1)
    closing(a)
    closing(b)
    generate(a, dst=0x020000000002, src_base=0x020000100000, n_src=1 << 16)
    generate(b, dst=0x020000100000, src_base=0x020000000002, n_src=1)
    pmd = GeneratorPmd(fib, [a, b])
    closing(pmd)
    pmd.start()

    # (1) One call, as the switch's housekeeping makes it.
    fill(fib, MILLION, last_seen=1000)
    fib.c.stats.hold_cpu_max_ns = 0
    packets = pmd.pmd.stats.packets
    start = time.perf_counter()
    assert lib.vs_fib_age(fib.c, 1000 + 300) == MILLION
    took = time.perf_counter() - start
    hold_us = fib.c.stats.hold_cpu_max_ns / 1000
    assert pmd.pmd.stats.packets > packets, "the PMD forwarded nothing while the table aged"
    print(f"aged {MILLION} in {took * 1e3:.0f} ms; longest hold of the lock {hold_us:.0f} us of CPU time")
    assert hold_us < 1000, f"one hold of the lock took {hold_us:.0f} us of CPU time"

    # (2) The PMD's own view, window by window, for up to three million-entry rounds.
    me = threading.get_native_id()
    clean_gaps, windows = [], 0
    for _ in range(3):
        if len(clean_gaps) >= 16:
            break
        fill(fib, MILLION, last_seen=1000)
        windows += age_in_windows(fib, pmd, me, clean_gaps)
    worst = max(clean_gaps, default=0.0)
    print(f"{windows} windows, {len(clean_gaps)} without preemption; longest PMD gap in those {worst:.0f} us; "
          f"slowest ten {sorted(round(g) for g in clean_gaps)[-10:]}")
    assert len(clean_gaps) >= 16, f"only {len(clean_gaps)} of {windows} windows ran unpreempted: the host is too busy"
    # Wall time on a shared virtual machine: an interrupt or a stolen slice the
    # run times do not show can still land in a window, so one window in ten may
    # exceed the bound (the design's bound is (1)), none by more than 5 times.
    over = [g for g in clean_gaps if g >= 1000]
    assert len(over) <= len(clean_gaps) // 10, f"the PMD stood still for 1 ms or more in {len(over)} windows: {over}"
    assert worst < 5000, f"the PMD stood still for {worst:.0f} us"


def test_the_gap_counter_sees_a_stall_and_restarts_on_request(closing):
    """The counter can fail: a control-plane hold of the lock for 5 ms shows as a gap of at least that."""
    fib = MacTable(max_entries=4096)
    closing(fib)
    a, b = NullPort(0), NullPort(1)
    closing(a)
    closing(b)
    generate(a, dst=0x020000000002, src_base=0x020000000001, n_src=1)
    pmd = GeneratorPmd(fib, [a, b])
    closing(pmd)
    pmd.start()
    lib.vs_fib_lock(fib.c)
    # The hold counts from the moment the PMD queues for the lock (a second ticket handed out):
    # on a busy host the PMD may not run for a while after the lock is taken.
    deadline = time.monotonic() + DEADLINE
    while fib.c.lock_next == fib.c.lock_owner + 1:
        assert time.monotonic() < deadline, "the PMD never waited for the lock"
        time.sleep(0.0005)
    time.sleep(0.005)
    lib.vs_fib_unlock(fib.c)
    time.sleep(0.05)
    assert pmd.cycles_to_us(pmd.pmd.stats.max_gap_cycles) >= 5000
    assert pmd.cycles_to_us(fib.c.stats.lock_wait_max) >= 4000
    pmd.pmd.gap_reset = 1
    deadline = time.monotonic() + DEADLINE
    while pmd.pmd.gap_reset or pmd.pmd.stats.max_gap_cycles == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert pmd.cycles_to_us(pmd.pmd.stats.max_gap_cycles) < 5000


def test_a_port_table_swap_with_64_ports_takes_under_a_millisecond(closing):
    """Hotplug publishes a new port table; the old one may be freed once the PMD has
    started a new pass (vs_pmd_quiesce).  With 64 ports forwarding, that takes under
    1 ms, and the PMD's longest gap meanwhile too, in the windows where both threads
    ran throughout (as above: wall time on a shared host)."""
    fib = MacTable(max_entries=8192)
    closing(fib)
    ports = [NullPort(i) for i in range(64)]
    for i, p in enumerate(ports):
        closing(p)
        generate(p, dst=0x020000000001 + (i + 1) % 64, src_base=0x020000000001 + i, n_src=1)
    pmd = GeneratorPmd(fib, ports)
    closing(pmd)
    pmd.start()
    me = threading.get_native_id()
    tables, swaps, gaps = [], [], []
    # On a busy host few swaps run unpreempted: keep trying for up to a minute.
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            table = ffi.new("struct vs_port_table *")
            ffi.memmove(table, pmd.table, ffi.sizeof("struct vs_port_table"))
            # Kept alive: the PMD may still read the one before until the quiesce below.
            tables = tables[-1:] + [table]
            ran0, start = (on_cpu_ns(pmd.tid), on_cpu_ns(me)), time.perf_counter_ns()
            pmd.pmd.gap_reset = 1
            while pmd.pmd.gap_reset:
                pass
            # Publish, then wait, spinning as vs_pmd_quiesce does but without its sleeps, until
            # the PMD starts a pass: from then on it reads the new table only.
            t0 = time.perf_counter_ns()
            lib.vs_pmd_publish(pmd.pmd, table)
            epoch = pmd.pmd.epoch
            while pmd.pmd.epoch == epoch:
                pass
            took = time.perf_counter_ns() - t0
            gap = pmd.pmd.stats.max_gap_cycles
            ran1, end = (on_cpu_ns(pmd.tid), on_cpu_ns(me)), time.perf_counter_ns()
            assert lib.vs_pmd_quiesce(pmd.pmd, 1000) == 0   # it sleeps: outside the window
            if all(end - start - (r1 - r0) < LOST_NS for r0, r1 in zip(ran0, ran1)):
                swaps.append(took / 1000)
                gaps.append(pmd.cycles_to_us(gap))
            if len(swaps) >= 30:
                break
    finally:
        lib.vs_pmd_publish(pmd.pmd, pmd.table)
        assert lib.vs_pmd_quiesce(pmd.pmd, 1000) == 0
    print(f"{len(swaps)} clean swaps: longest {max(swaps, default=0):.0f} us, "
          f"median {sorted(swaps)[len(swaps) // 2] if swaps else 0:.0f} us; longest PMD gap {max(gaps, default=0):.0f} us")
    assert len(swaps) >= 10, f"only {len(swaps)} swaps ran unpreempted: the host is too busy"
    assert max(swaps) < 1000 and max(gaps) < 1000


def test_aging_with_a_budget_leaves_the_rest_for_the_next_call():
    t = MacTable(max_entries=1000, aging_seconds=1)
    try:
        fill(t, 100, last_seen=1)
        assert t.age(budget=30) == 30 and t.c.n_entries == 70
        assert t.age() == 70 and t.c.n_entries == 0
    finally:
        t.close()
