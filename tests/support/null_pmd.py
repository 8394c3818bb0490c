"""Null ports and a PMD over a table of them, as the switch builds them, for unit tests.

The PMD is driven from the test's thread (vs_pmd_poll_once) or by a thread of
its own (vs_pmd_run) where sleeping is the point.  two_null_ports is the
common pair that tests measuring the PMD's work use; the caller sets each
port's generator.
"""

from __future__ import annotations

import threading
import time

import pytest

from vswitch.fib import MacTable
from vswitch.native import ffi, lib

DEADLINE = 10.0


class NullPort:
    """A null port as the switch would build it: the C state and its struct vs_port."""

    def __init__(self, port_no: int, queues: int = 1):
        self.np = ffi.new("struct vs_null_port *")
        assert lib.vs_null_port_init(self.np, queues) == 0
        self.port = ffi.new("struct vs_port *")
        self.port.port_no = port_no
        self.port.ops = lib.vs_null_port_ops()
        self.port.priv = self.np
        self.port.link_up = 1
        self.queues = queues

    def inject(self, data: bytes, queue: int = 0) -> int:
        return lib.vs_null_port_inject(self.np, queue, ffi.from_buffer("uint8_t[]", data), len(data))

    def close(self) -> None:
        lib.vs_null_port_fini(self.np)


class Pmd:
    """A PMD over a table of ports: `ports` are delivered to, `polled` (port, queue) are received from."""

    def __init__(self, ports, polled):
        self.fib = MacTable(max_entries=1024)
        self.pmd = ffi.new("struct vs_pmd *")
        assert lib.vs_pmd_init(self.pmd, self.fib.c) == 0
        self.table = ffi.new("struct vs_port_table *")
        for p in ports:
            self.table.ports[p.port_no] = p
            self.table.live[self.table.n_live] = p.port_no
            self.table.n_live += 1
        for p, q in polled:
            self.table.poll[self.table.n_poll].port = p
            self.table.poll[self.table.n_poll].queue = q
            self.table.n_poll += 1
        lib.vs_pmd_publish(self.pmd, self.table)
        self.thread: threading.Thread | None = None

    def poll(self, passes: int = 1) -> int:
        return sum(lib.vs_pmd_poll_once(self.pmd) for _ in range(passes))

    def start(self) -> None:
        self.thread = threading.Thread(target=lib.vs_pmd_run, args=(self.pmd,), daemon=True)
        self.thread.start()

    def wait_asleep(self) -> None:
        """Until the thread made no pass for a while: it sleeps in idle_sleep."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            before = self.pmd.epoch
            time.sleep(0.3)
            if self.pmd.epoch == before:
                return
        pytest.fail("the PMD thread never went to sleep")

    def close(self) -> None:
        if self.thread:
            lib.vs_pmd_stop(self.pmd)
            self.thread.join(DEADLINE)
            assert not self.thread.is_alive(), "the PMD thread did not stop"
        lib.vs_pmd_fini(self.pmd)
        self.fib.close()


def null_stats(port: NullPort, queue: int = 0) -> dict:
    s = port.np.queues[queue].stats
    return {k: getattr(s, k) for k in ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes")}



def two_null_ports(closing, polled: int = 2) -> tuple[NullPort, NullPort, Pmd]:
    """Null ports 0 and 1, both live, and a PMD (no thread) over a new MAC table that
    polls the first `polled` of them; closing() closes them all after the test."""
    a, b = NullPort(0), NullPort(1)
    closing(a)
    closing(b)
    pmd = Pmd([a.port, b.port], [(p.port, 0) for p in (a, b)[:polled]])
    closing(pmd)
    return a, b, pmd
