"""Guest memory the switch cannot trust: faults, reclamation, address space.

* A front-end may truncate (or hole-punch) the file behind its guest memory
  at any moment.  Touching such a mapping raises SIGBUS; the switch must
  survive it, disconnect only that front-end and count the fault.
* Memory, fds and port tables a PMD may still read are freed only once every
  running PMD has passed a quiescent point, and the control loop never waits
  long for that (a PMD may be stuck).
* Guest memory is mapped from the region's page-aligned offset, and the
  total per port is capped (`max_memory`).

Tests that could kill the process under test run vswitchd as a child
(tests/support/daemon.py) or run the code in a child interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for
from tests.support.frontend import BackendClosed, RequestFailed, VhostUserFrontend
from tests.support.virtio_driver import GuestMemory
from tests.unit.test_vhost_protocol import Harness, LoopThread
from vswitch.config import Config, ConfigError, parse
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.protocol import Request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vhost_ports(tmp_path, n):
    return [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(n)]


def run_child(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs Python code in a child interpreter (cwd: the repository)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- the SIGBUS handler itself

def test_a_fault_in_registered_guest_memory_reads_zeros_and_flags_the_device():
    out = run_child("""
        import mmap, os
        from vswitch.native import ffi, lib
        from vswitch.vhost import guestmem
        fd = os.memfd_create("guest")
        os.ftruncate(fd, 1 << 20)
        m = mmap.mmap(fd, 1 << 20)
        m[4096] = 7
        dev = ffi.new("struct vs_vhost_dev *")
        lib.vs_vhost_dev_init(dev, 1)
        buf = ffi.from_buffer(m)
        slot = guestmem.register(buf, 1 << 20, dev, 3)
        os.ftruncate(fd, 0)                     # the front-end takes its memory away
        p = ffi.cast("uint8_t *", buf)
        print(p[4096], p[8192])                 # SIGBUS, recovered: zeros
        p[100] = 5                              # writes land in the replacement
        print(p[100])
        print(dev.fault == lib.VS_DEV_FAULT_MEMORY,
              lib.vs_guestmem_fault_addr(slot) == int(ffi.cast("uintptr_t", p)) + 4096)
        print(os.read(lib.vs_guestmem_eventfd(), 8) != b"")
        guestmem.unregister(slot)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["0 0", "5", "True True", "True"]


def test_a_fault_outside_guest_memory_still_crashes():
    # Real bugs must not be hidden: an unregistered mapping keeps the default SIGBUS.
    out = run_child("""
        import mmap, os
        from vswitch.native import ffi, lib
        from vswitch.vhost import guestmem
        guestmem.install()
        fd = os.memfd_create("not-guest")
        os.ftruncate(fd, 1 << 20)
        m = mmap.mmap(fd, 1 << 20)
        os.ftruncate(fd, 0)
        p = ffi.cast("uint8_t *", ffi.from_buffer(m))
        print(p[0])
    """)
    assert out.returncode == -7, (out.returncode, out.stdout, out.stderr)


def test_a_fault_in_hugetlb_guest_memory_is_recovered_too():
    from tests.conftest import require_hugepages

    require_hugepages(4)
    out = run_child("""
        import mmap, os
        from vswitch.native import ffi, lib
        from vswitch.vhost import guestmem
        size = 4 << 20
        fd = os.memfd_create("guest", os.MFD_HUGETLB)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        m[0] = 1
        dev = ffi.new("struct vs_vhost_dev *")
        buf = ffi.from_buffer(m)
        slot = guestmem.register(buf, size, dev, 0)
        os.ftruncate(fd, 0)
        p = ffi.cast("uint8_t *", buf)
        print(p[0], p[size - 1], dev.fault)
        guestmem.unregister(slot)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "1"]


def test_any_fault_bit_raised_by_another_thread_disconnects_with_its_reason(tmp_path, caplog):
    lt = LoopThread()
    h = Harness(lt, tmp_path / "vhost.sock")
    h.start()
    fe = VhostUserFrontend(h.path).connect()
    try:
        fe.handshake()
        # What the PMD does when a call fd write would block: any thread may raise a fault bit.
        lib.vs_vhost_dev_raise_fault(h.dev, lib.VS_DEV_FAULT_CALL_BLOCKED)
        assert fe.wait_closed(timeout=5)
        info = h.info()
        assert info["call_blocked_faults"] == 1 and info["mem_faults"] == 0 and h.dev.fault == 0
        lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
        assert len(lines) == 1 and "call fd write would block" in lines[0], lines
        h.wait_connected(False)
        fe2 = VhostUserFrontend(h.path).connect()       # server mode keeps listening
        fe2.handshake()
        assert h.info()["connected"]
        fe2.close()
    finally:
        fe.close()
        h.stop()
        lt.close()


# --------------------------------------------------------------------------- faults with the daemon

class Traffic(threading.Thread):
    """src -> dst in bursts of 32 frames, each burst received before the next;
    every fourth burst is broadcast, so it floods to every other port too."""

    def __init__(self, src, dst, bursts, dst_mac, src_mac):
        super().__init__(daemon=True)
        self.src, self.dst, self.bursts, self.dst_mac, self.src_mac = src, dst, bursts, dst_mac, src_mac
        self.done_bursts = 0
        self.received = 0
        self.error: Exception | None = None

    def run(self):
        try:
            for i in range(self.bursts):
                self.dst.post_rx(0, 32)
                dest = BROADCAST if i % 4 == 0 else self.dst_mac
                for _ in range(32):
                    self.src.send_frame(0, frame(dest, self.src_mac))
                got = len(self.dst.receive(0, 32, timeout=10))
                self.received += got
                if got < 32:
                    return
                self.src.wait_tx_done(0)
                self.done_bursts += 1
        except Exception as exc:  # reported by the test
            self.error = exc


def test_truncated_guest_memory_while_forwarding_disconnects_only_that_port(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3)) as d:
        g0, g1, bad = d.connect_guests(["vm0", "vm1", "vm2"])
        try:
            g1.send_frame(0, frame(BROADCAST, mac(2)))      # learned: g0 -> g1 is unicast
            assert len(g0.receive(0, 1)) == 1 and len(bad.receive(0, 1)) == 1
            traffic = Traffic(g0, g1, 100, mac(2), mac(1))
            traffic.start()
            wait_for(lambda: traffic.done_bursts >= 10, timeout=30, what="traffic flowing")
            bad.truncate_memory()
            # Its kick wakes the PMD onto its truncated TX ring; the broadcasts land in its RX ring.
            bad.kick(bad.tx_ring(0).index)
            assert traffic.is_alive(), "the traffic ended before the fault"
            assert bad.wait_closed(timeout=10), "the faulty front-end is still connected"
            traffic.join(timeout=60)
            assert traffic.error is None and traffic.received == 3200, (traffic.error, traffic.received)
            assert d.proc.poll() is None, d.log()
            p = d.port("vm2")
            assert p["vhost"]["mem_faults"] == 1 and p["stats"]["mem_faults"] == 1
            assert not p["vhost"]["connected"] and p["link"] == "down"
            stats = {q["name"]: q["stats"] for q in d.ctl("show")["ports"]}
            assert stats["vm0"]["rx_packets"] == 3200 and stats["vm1"]["tx_packets"] == 3200
            assert stats["vm0"]["mem_faults"] == stats["vm1"]["mem_faults"] == 0
            assert all(stats[n]["rx_errors"] == stats[n]["tx_dropped"] == 0 for n in ("vm0", "vm1"))
            assert "mem_faults 1" in d.ctl_raw("show").stdout
            lines = [line for line in d.log().splitlines() if "guest memory fault" in line]
            assert len(lines) == 1, lines
            assert "port 'vm2'" in lines[0] and "region 0" in lines[0] and "disconnected" in lines[0]
            # Server mode keeps listening: the guest comes back with fresh memory.
            again = VhostUserFrontend(tmp_path / "vm2.sock").connect()
            again.handshake()
            again.post_rx(0, 8)
            wait_for(lambda: d.port("vm2")["link"] == "up", what="vm2 up again")
            g0.send_frame(0, frame(BROADCAST, mac(1)))
            assert len(again.receive(0, 1)) == 1
            again.close()
        finally:
            for fe in (g0, g1):
                fe.close()
            bad.close()
        assert d.stop() == 0


def test_truncated_guest_memory_before_the_rings_start(tmp_path):
    # The control thread faults: vs_vring_setup writes used->flags.
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2)) as d:
        [g0] = d.connect_guests(["vm0"])
        bad = VhostUserFrontend(tmp_path / "vm1.sock").connect()
        try:
            bad.handshake(stop_before=Request.SET_VRING_ENABLE)
            bad.truncate_memory()
            try:
                for ring in bad.rings:
                    bad.set_vring_enable(ring.index, True)
            except (BackendClosed, RequestFailed):
                pass
            assert bad.wait_closed(timeout=5)
            assert d.proc.poll() is None, d.log()
            p = d.port("vm1")
            assert p["vhost"]["mem_faults"] == 1 and not p["vhost"]["connected"]
            assert [line for line in d.log().splitlines() if "guest memory fault" in line]
            assert d.port("vm0")["link"] == "up"
        finally:
            g0.close()
            bad.close()
        assert d.stop() == 0


def test_client_mode_reconnects_after_a_memory_fault(tmp_path):
    path = tmp_path / "vm0.sock"
    bad = VhostUserFrontend(path).listen()
    port = {"name": "vm0", "type": "vhost-user", "path": str(path), "mode": "client"}
    with Vswitchd(tmp_path, ports=[port]) as d:
        good = VhostUserFrontend(path)
        try:
            bad.accept()
            bad.handshake(stop_before=Request.SET_VRING_ENABLE)
            bad.truncate_memory()
            try:
                bad.set_vring_enable(0, True)
            except (BackendClosed, RequestFailed):
                pass
            assert bad.wait_closed(timeout=5)
            # The switch connects again, to a front-end with memory that stays.
            good._listener, bad._listener = bad._listener, None
            good.accept()
            good.handshake()
            wait_for(lambda: d.port("vm0")["link"] == "up", what="vm0 up again")
            assert d.port("vm0")["vhost"]["mem_faults"] == 1
        finally:
            bad.close()
            good.close()
        assert d.stop() == 0


# --------------------------------------------------------------------------- deferred reclaim

@pytest.fixture
def stuck_switch(tmp_path):
    """A Switch on a loop thread whose one PMD counts as running but never moves its epoch."""
    from vswitch.switch import Switch

    lt = LoopThread()
    switch = lt.call(Switch, Config(control_socket=str(tmp_path / "ctl.sock")))
    pmd = switch.pmds[0]
    pmd.c.running = 1
    yield lt, switch, pmd
    pmd.c.running = 0
    lt.run(switch.stop())
    lt.close()


def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def test_a_stuck_pmd_delays_reclaim_but_never_blocks_the_control_loop(stuck_switch, tmp_path, monkeypatch,
                                                                      caplog):
    import vswitch.pmd

    monkeypatch.setattr(vswitch.pmd, "RECLAIM_WARN_SECONDS", 0.3)
    lt, switch, pmd = stuck_switch
    path = str(tmp_path / "vm.sock")
    port, took = timed(lambda: lt.run(switch.add_port({"name": "vm", "type": "vhost-user", "path": path})))
    assert took < 1.0
    fe = VhostUserFrontend(path).connect()
    (_, took) = timed(fe.handshake)
    assert took < 2.0
    backend = port.backend.device
    assert lt.call(lambda: all(r.started for r in backend._rings))

    # A new memory table: the old mapping stays until the PMD moves on.
    old_region = lt.call(lambda: backend._regions[0])
    fresh = GuestMemory(8 << 20)
    regions = [protocol.MemoryRegion(fresh.gpa_base, fresh.size, fresh.uva_base, 0)]
    (_, took) = timed(lambda: fe.request(Request.SET_MEM_TABLE, protocol.pack_memory_table(regions), [fresh.fd]))
    assert took < 1.0
    time.sleep(0.1)
    assert not old_region.mapping.closed

    # Removing the port: its fds, memory and device wait too, and del-port returns at once.
    ring_fds = lt.call(lambda: [fd for r in backend._rings for fd in (r.kickfd, r.callfd)])
    new_region = lt.call(lambda: backend._regions[0])
    port_ref = weakref.ref(port)
    del port, backend
    (_, took) = timed(lambda: lt.run(switch.del_port("vm")))
    assert took < 1.0
    assert fe.wait_closed(timeout=2)
    time.sleep(0.1)
    assert port_ref() is not None
    assert not new_region.mapping.closed and not old_region.mapping.closed
    for fd in ring_fds:
        os.fstat(fd)                # still open
    wait_for(lambda: "PMD 0 has not passed a quiescent point" in caplog.text, timeout=2,
             what="the long wait logged")

    pmd.c.epoch += 1                # the PMD passes a quiescent point
    wait_for(lambda: old_region.mapping.closed and new_region.mapping.closed, timeout=2, what="unmapped")
    for fd in ring_fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    import gc
    wait_for(lambda: gc.collect() is not None and port_ref() is None, timeout=2, what="the port freed")
    fe.close()
    fresh.close()


def test_publish_keeps_the_old_port_table_until_the_epoch_moves(stuck_switch, tmp_path):
    lt, switch, pmd = stuck_switch
    first = lt.call(lambda: pmd.c.table)
    assert first == ffi.NULL
    lt.run(switch.add_port({"name": "a", "type": "vhost-user", "path": str(tmp_path / "a.sock")}))
    table_a = lt.call(lambda: pmd.c.table)
    ref = weakref.ref(lt.call(lambda: pmd._table))
    (_, took) = timed(lambda: lt.run(switch.add_port({"name": "b", "type": "vhost-user",
                                                        "path": str(tmp_path / "b.sock")})))
    assert took < 1.0
    assert lt.call(lambda: pmd.c.table) != table_a
    import gc
    gc.collect()
    assert ref() is not None, "the old table was freed while the PMD may read it"
    pmd.c.epoch += 1
    wait_for(lambda: gc.collect() is not None and ref() is None, timeout=2, what="the old table freed")


# --------------------------------------------------------------------------- address space

@pytest.fixture
def harness(tmp_path):
    lt = LoopThread()
    h = Harness(lt, tmp_path / "vhost.sock")
    h.start()
    yield h
    h.stop()
    lt.close()


def handshake_until_mem_table(h):
    fe = VhostUserFrontend(h.path).connect()
    fe.handshake(stop_before=Request.SET_MEM_TABLE)
    return fe


def test_a_sparse_multi_terabyte_region_is_refused(harness):
    fe = handshake_until_mem_table(harness)
    fd = os.memfd_create("huge", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 << 40)
        regions = [protocol.MemoryRegion(0, 4 << 40, 0x7f0000000000 - (4 << 40), 0)]
        with pytest.raises((RequestFailed, BackendClosed)):
            fe.request(Request.SET_MEM_TABLE, protocol.pack_memory_table(regions), [fd])
        info = harness.info()
        assert info["memory_regions"] == 0 and info["memory_refused"] == 1
    finally:
        os.close(fd)
        fe.close()


def test_a_region_at_a_large_offset_maps_only_what_it_needs(harness):
    fe = handshake_until_mem_table(harness)
    fd = os.memfd_create("offset", os.MFD_CLOEXEC)
    offset, size = (1 << 40) + 0x3800, 8 << 20        # not even page-aligned
    try:
        os.ftruncate(fd, offset + size)
        regions = [protocol.MemoryRegion(0x100000, size, 0x100000, offset)]
        fe.request(Request.SET_MEM_TABLE, protocol.pack_memory_table(regions), [fd])
        lengths = harness.loop.call(lambda: [len(r.mapping) for r in harness.backend.device._regions])
        assert size < lengths[0] <= size + 0x1000
        host = harness.loop.call(lambda: int(ffi.cast("uintptr_t", harness.dev.mem.regions[0].host_addr)))
        with open("/proc/self/maps") as f:
            spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]
        [(start, end)] = [s for s in spans if s[0] <= host < s[1]]
        assert end - start <= size + 0x1000 and host == start + 0x800
    finally:
        os.close(fd)
        fe.close()


def test_max_memory_per_port_is_enforced(tmp_path):
    lt = LoopThread()
    h = Harness(lt, tmp_path / "vhost.sock")
    h.backend.device.max_memory = 4 << 20
    h.start()
    try:
        fe = VhostUserFrontend(h.path, mem_size=8 << 20).connect()
        with pytest.raises((RequestFailed, BackendClosed)):
            fe.handshake()
        assert h.info()["memory_refused"] == 1
        fe.close()
    finally:
        h.stop()
        lt.close()


def test_max_memory_config_key():
    base = {"name": "vm", "type": "vhost-user", "path": "/tmp/vm.sock"}
    assert "max_memory" not in parse({"ports": [base]}).ports[0]
    for given, want in [("64G", 64 << 30), ("1T", 1 << 40), ("512MiB", 512 << 20), (1 << 33, 1 << 33)]:
        assert parse({"ports": [{**base, "max_memory": given}]}).ports[0]["max_memory"] == want
    for bad in ["lots", "0", -1, "1P", True, "12Q"]:
        with pytest.raises(ConfigError, match="max_memory"):
            parse({"ports": [{**base, "max_memory": bad}]})


def test_add_port_accepts_max_memory(tmp_path):
    with Vswitchd(tmp_path, ports=[]) as d:
        out = d.ctl_raw("add-port", "vm", "--type", "vhost-user", "--path", str(tmp_path / "vm.sock"),
                        "--max-memory", "2G")
        assert out.returncode == 0, out.stderr
        assert d.port("vm")["max_memory"] == 2 << 30
        out = d.ctl_raw("add-port", "vm2", "--type", "vhost-user", "--path", str(tmp_path / "vm2.sock"),
                        "--max-memory", "huge")
        assert out.returncode != 0 and "max-memory" in out.stderr
