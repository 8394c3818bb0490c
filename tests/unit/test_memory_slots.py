"""Memory hotplug: PROTOCOL_F_CONFIGURE_MEM_SLOTS, GET_MAX_MEM_SLOTS,
ADD_MEM_REG and REM_MEM_REG, driven by hand.

* More than the 8 regions SET_MEM_TABLE can carry.
* Regions come and go while rings forward: traffic never stops, nothing
  faults, and a removed region stays mapped until the PMDs have moved on.
* The guest's network buffers may live in memory added later.
* Every hostile request is refused with one log line and a counter.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for
from tests.support.frontend import DRIVER_PROTOCOL_FEATURES, BackendClosed, RequestFailed, VhostUserFrontend
from tests.support.virtio_driver import GuestMemory
from tests.unit.test_guest_memory import Traffic, stuck_switch  # noqa: F401 (a fixture)
from tests.unit.test_vhost_protocol import Harness, LoopThread
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.device import MESSAGES
from vswitch.vhost.protocol import MemoryRegion, ProtocolError, ProtocolFeature, Request

EXTRA_GPA = 0x40000000          # hot-added regions go here, far above the base region
EXTRA_SIZE = 1 << 20


class SlotsFrontend(VhostUserFrontend):
    """A front-end that negotiates CONFIGURE_MEM_SLOTS and, as QEMU then does,
    asks GET_MAX_MEM_SLOTS and sends its memory as ADD_MEM_REG instead of SET_MEM_TABLE."""

    def __init__(self, path, **kw):
        kw.setdefault("protocol_features", DRIVER_PROTOCOL_FEATURES | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS))
        super().__init__(path, **kw)
        self.max_mem_slots: int | None = None

    def _set_protocol_features(self) -> None:
        super()._set_protocol_features()
        if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self.get_u64(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(self) -> None:
        for region in self.memory_regions():
            self.add_region(region, self.mem.fd)

    def add_region(self, region: MemoryRegion, fd: int) -> None:
        self.request(Request.ADD_MEM_REG, protocol.pack_memory_region(region), [fd])

    def remove_region(self, region: MemoryRegion, fds=()) -> None:
        self.request(Request.REM_MEM_REG, protocol.pack_memory_region(region), fds)


def unmap_ours(mem: GuestMemory) -> None:
    """Drops the test's own mapping of a region, so that /proc/self/maps shows only the switch's."""
    mem.mm.close()
    mem.mm = None


def describe(mem: GuestMemory) -> MemoryRegion:
    return MemoryRegion(mem.gpa_base, mem.size, mem.uva_base, 0)


def extra_memories(n: int, tag: str, first: int = 0) -> list[GuestMemory]:
    """n regions of hot-added memory, each its own memfd named so /proc/PID/maps shows it."""
    return [GuestMemory(EXTRA_SIZE, gpa_base=EXTRA_GPA + (first + i) * 2 * EXTRA_SIZE,
                        name=f"vswitch-hotplug-{tag}-{first + i}") for i in range(n)]


def memfd_mappings(pid: int | str = "self") -> list[str]:
    """The names of the memfds a process maps, one per mapping."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.split("/memfd:", 1)[1].split(" ")[0] for line in f if "/memfd:" in line]


def mapped_names(pid: int | str = "self") -> set[str]:
    return set(memfd_mappings(pid))


class SplitMemory:
    """Guest memory as the driver sees it once memory was added: rings stay in
    `base`, new buffers (and indirect tables) come from `pool`."""

    def __init__(self, base: GuestMemory, pool: GuestMemory):
        self.base, self.pool = base, pool
        self.handed_out: list[int] = []

    def _mem(self, gpa: int) -> GuestMemory:
        return self.pool if self.pool.contains(gpa) else self.base

    def alloc(self, length: int, align: int = 16) -> int:
        gpa = self.pool.alloc(length, align)
        self.handed_out.append(gpa)
        return gpa

    def free(self, gpa: int) -> None:
        self._mem(gpa).free(gpa)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self._mem(gpa).contains(gpa, length)

    def gpa_to_uva(self, gpa: int) -> int:
        return self._mem(gpa).gpa_to_uva(gpa)

    def read(self, gpa, length):
        return self._mem(gpa).read(gpa, length)

    def write(self, gpa, data):
        self._mem(gpa).write(gpa, data)

    def read_u16(self, gpa):
        return self._mem(gpa).read_u16(gpa)

    def write_u16(self, gpa, value):
        self._mem(gpa).write_u16(gpa, value)


@pytest.fixture
def harness(tmp_path):
    lt = LoopThread()
    h = Harness(lt, tmp_path / "vhost.sock")
    h.start()
    yield h
    h.stop()
    lt.close()


# --------------------------------------------------------------------------- the messages

def test_configure_mem_slots_is_offered_and_the_slot_limit_answered(harness):
    fe = SlotsFrontend(harness.path).connect()
    try:
        fe.handshake()
        assert fe.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert fe.max_mem_slots == protocol.MAX_MEM_SLOTS == lib.VS_MAX_MEM_SLOTS >= 32
        info = harness.info()
        assert info["memory_regions"] == 1 and info["mem_regs_added"] == 1 and info["link_up"]
        assert info["max_mem_slots"] == protocol.MAX_MEM_SLOTS
    finally:
        fe.close()


def test_more_than_eight_regions(harness):
    fe = SlotsFrontend(harness.path).connect()
    extras = extra_memories(20, "many")
    try:
        fe.handshake()
        for mem in extras:
            fe.add_region(describe(mem), mem.fd)
        assert harness.info()["memory_regions"] == 21
        assert harness.loop.call(lambda: harness.dev.mem.nregions) == 21
        # Each region maps its own file: what the guest writes, the switch reads at that user address.
        for i, mem in enumerate(extras):
            text = b"region %02d" % i
            mem.write(mem.gpa_base + 100, text)
            host = harness.loop.call(lambda: lib.vs_mem_translate_uva(harness.dev.mem, mem.uva_base + 100, 9))
            assert host != ffi.NULL and ffi.buffer(host, len(text))[:] == text
            unmap_ours(mem)
        assert {f"vswitch-hotplug-many-{i}" for i in range(20)} <= mapped_names()
        for mem in extras[::2]:
            fe.remove_region(describe(mem))
        info = harness.info()
        assert info["memory_regions"] == 11 and info["mem_regs_removed"] == 10
        names = mapped_names()
        assert not any(f"vswitch-hotplug-many-{i}" in names for i in range(0, 20, 2))
        assert all(f"vswitch-hotplug-many-{i}" in names for i in range(1, 20, 2))
        host = harness.loop.call(lambda: lib.vs_mem_translate_uva(harness.dev.mem, extras[0].uva_base, 1))
        assert host == ffi.NULL
        assert info["link_up"]
    finally:
        fe.close()
        for mem in extras:
            mem.close()


def test_adding_a_region_twice_keeps_one_mapping_and_a_stray_fd_on_remove_is_closed(harness):
    fe = SlotsFrontend(harness.path).connect()
    [mem] = extra_memories(1, "twice")
    try:
        fe.handshake()
        fe.add_region(describe(mem), mem.fd)
        fe.add_region(describe(mem), mem.fd)
        assert harness.info()["memory_regions"] == 2
        # vhost-user.rst: a back-end may accept one fd with REM_MEM_REG, and must close it unused.
        before = len(os.listdir("/proc/self/fd"))
        fe.remove_region(describe(mem), [mem.fd])
        assert harness.info()["memory_regions"] == 1
        assert len(os.listdir("/proc/self/fd")) <= before
        assert harness.info()["mem_reg_refused"] == 0 and harness.protocol_errors == 0
    finally:
        fe.close()
        mem.close()


def test_hostile_mem_reg_requests_are_refused_with_a_counter(harness, caplog):
    fe = SlotsFrontend(harness.path).connect()
    page = 0x1000
    slots = protocol.MAX_MEM_SLOTS
    pages = GuestMemory(slots * page, gpa_base=EXTRA_GPA, name="vswitch-hotplug-pages")
    try:
        fe.handshake()                                   # region 0: the base memory

        def page_region(i: int) -> MemoryRegion:
            return MemoryRegion(EXTRA_GPA + i * page, page, EXTRA_GPA + i * page, i * page)

        for i in range(slots - 1):
            fe.add_region(page_region(i), pages.fd)
        assert harness.info()["memory_regions"] == slots
        with pytest.raises(RequestFailed):               # beyond the slot limit
            fe.add_region(page_region(slots - 1), pages.fd)
        assert harness.info()["mem_reg_refused"] == 1
        assert f"all {slots} memory slots are in use" in caplog.text
        fe.remove_region(page_region(slots - 2))
        with pytest.raises(RequestFailed):               # overlapping guest addresses
            fe.add_region(MemoryRegion(EXTRA_GPA + page // 2, page, 0x7000_0000_0000, 0), pages.fd)
        with pytest.raises(RequestFailed):               # overlapping user addresses
            fe.add_region(MemoryRegion(0x7000_0000_0000, page, EXTRA_GPA, 0), pages.fd)
        with pytest.raises(RequestFailed):               # REM of a region never added
            fe.remove_region(MemoryRegion(0x7000_0000_0000, page, 0x7000_0000_0000, 0))
        with pytest.raises(RequestFailed):               # REM matching on guest address only
            fe.remove_region(MemoryRegion(EXTRA_GPA, page, EXTRA_GPA + 1, 0))
        info = harness.info()
        assert info["mem_reg_refused"] == 5 and info["memory_regions"] == slots - 1 and info["link_up"]
        fe.sync()                                        # the connection stayed up
    finally:
        fe.close()

    def fresh():
        harness.wait_connected(False)
        f = SlotsFrontend(harness.path).connect()
        f.handshake()
        return f

    errors = harness.protocol_errors
    cases = [
        # (what, payload region, fds, counted by mem_reg_refused)
        ("zero size", MemoryRegion(EXTRA_GPA, 0, EXTRA_GPA, 0), [pages.fd], False),
        ("guest range wraps", MemoryRegion(2**64 - page, 2 * page, EXTRA_GPA, 0), [pages.fd], False),
        ("user range wraps", MemoryRegion(EXTRA_GPA, 2 * page, 2**64 - page, 0), [pages.fd], False),
        ("offset beyond the file", MemoryRegion(EXTRA_GPA, page, EXTRA_GPA, slots * page), [pages.fd], True),
        ("no fd", MemoryRegion(EXTRA_GPA, page, EXTRA_GPA, 0), [], False),
    ]
    refused = harness.info()["mem_reg_refused"]
    for what, region, fds, counted in cases:
        f = fresh()
        try:
            with pytest.raises((RequestFailed, BackendClosed)):
                f.add_region(region, fds[0]) if fds else f.request(
                    Request.ADD_MEM_REG, protocol.pack_memory_region(region))
            assert f.wait_closed(timeout=5), what
            errors += 1
            refused += counted
            harness.wait(lambda: harness.backend.protocol_errors == errors, what)
            assert harness.info()["mem_reg_refused"] == refused, what
        finally:
            f.close()
    # One line each (the connection's log rate-limits a burst of them).
    assert "closing the connection: ADD_MEM_REG: the region has size 0" in caplog.text
    pages.close()


def test_single_region_payloads_are_checked():
    add, rem = MESSAGES[Request.ADD_MEM_REG], MESSAGES[Request.REM_MEM_REG]
    region = MemoryRegion(0x1000, 0x2000, 0x7000, 0x3000)
    payload = protocol.pack_memory_region(region)
    assert len(payload) == 40                    # u64 padding, then the region
    assert protocol.parse_payload(add, payload, 1) == region
    assert protocol.parse_payload(rem, payload, 0) == protocol.parse_payload(rem, payload, 1) == region
    for bad, match in ((MemoryRegion(0x1000, 0, 0x7000, 0), "ADD_MEM_REG: the region has size 0"),
                       (MemoryRegion(2**64 - 0x1000, 0x2000, 0, 0), "guest address .* overflows"),
                       (MemoryRegion(0, 0x2000, 2**64 - 0x1000, 0), "user address .* overflows"),
                       (MemoryRegion(0, 0x2000, 0, 2**64 - 0x1000), "mmap offset .* overflows")):
        with pytest.raises(ProtocolError, match=match):
            protocol.parse_payload(add, protocol.pack_memory_region(bad), 1)
    with pytest.raises(ProtocolError, match="0 file descriptors attached, expected 1"):
        protocol.parse_payload(add, payload, 0)
    with pytest.raises(ProtocolError, match="2 file descriptors attached"):
        protocol.parse_payload(rem, payload, 2)
    with pytest.raises(ProtocolError, match="expected 40"):
        protocol.parse_payload(add, payload[:32], 1)


def test_max_memory_covers_added_regions(tmp_path):
    lt = LoopThread()
    h = Harness(lt, tmp_path / "vhost.sock")
    h.backend.device.max_memory = 8 << 20
    h.start()
    fe = SlotsFrontend(h.path, mem_size=7 << 20).connect()
    extras = extra_memories(2, "max")
    try:
        fe.handshake()
        fe.add_region(describe(extras[0]), extras[0].fd)        # 7 + 1 MiB: at the limit
        with pytest.raises(RequestFailed):
            fe.add_region(describe(extras[1]), extras[1].fd)
        info = h.info()
        assert info["memory_regions"] == 2 and info["memory_refused"] == 1 and info["mem_reg_refused"] == 1
        assert info["memory_mapped"] == 8 << 20
    finally:
        fe.close()
        for mem in extras:
            mem.close()
        h.stop()
        lt.close()


def test_mem_slot_messages_need_the_protocol_feature(harness):
    fe = VhostUserFrontend(harness.path).connect()
    [mem] = extra_memories(1, "nofeature")
    try:
        fe.handshake()
        for request, payload, fds in ((Request.GET_MAX_MEM_SLOTS, b"", []),
                                      (Request.ADD_MEM_REG, protocol.pack_memory_region(describe(mem)), [mem.fd]),
                                      (Request.REM_MEM_REG, protocol.pack_memory_region(describe(mem)), [])):
            with pytest.raises(RequestFailed):
                fe.request(request, payload, fds, need_reply=True)
        assert harness.info()["memory_regions"] == 1
    finally:
        fe.close()
        mem.close()


# --------------------------------------------------------------------------- reclaim after the PMDs

def test_a_removed_region_stays_mapped_until_the_pmds_move_on(stuck_switch, tmp_path):  # noqa: F811
    lt, switch, pmd = stuck_switch
    path = str(tmp_path / "vm.sock")
    lt.run(switch.add_port({"name": "vm", "type": "vhost-user", "path": path}))
    fe = SlotsFrontend(path).connect()
    [mem] = extra_memories(1, "stuck")
    unmap_ours(mem)
    try:
        fe.handshake()
        t0 = time.monotonic()
        fe.add_region(describe(mem), mem.fd)
        assert time.monotonic() - t0 < 1.0              # adding memory never waits for the PMDs
        assert "vswitch-hotplug-stuck-0" in mapped_names()
        t0 = time.monotonic()
        fe.remove_region(describe(mem))
        assert time.monotonic() - t0 < 1.0              # nor does removing it
        time.sleep(0.2)
        # The PMD may still read the region through the old table: it stays mapped.
        assert "vswitch-hotplug-stuck-0" in mapped_names()
        assert lt.call(lambda: switch.ports["vm"].backend.info()["memory_regions"]) == 1
        pmd.c.epoch += 1                                 # the PMD passes a quiescent point
        wait_for(lambda: "vswitch-hotplug-stuck-0" not in mapped_names(), timeout=3, what="the region unmapped")
    finally:
        fe.close()
        mem.close()


# --------------------------------------------------------------------------- with traffic

def connect_slots_guests(d: Vswitchd, names: list[str]) -> list[SlotsFrontend]:
    paths = {p["name"]: p["path"] for p in d.config["ports"]}
    guests = []
    for name in names:
        fe = SlotsFrontend(paths[name]).connect()
        fe.handshake()
        fe.post_rx(0, 32)
        guests.append(fe)
    wait_for(lambda: all(d.port(n)["link"] == "up" for n in names), timeout=10, what="links up")
    return guests


def vhost_ports(tmp_path, n):
    return [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(n)]


def test_regions_come_and_go_while_rings_forward(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2)) as d:
        g0, g1 = connect_slots_guests(d, ["vm0", "vm1"])
        pid = d.proc.pid
        memories = []
        try:
            g1.send_frame(0, frame(BROADCAST, mac(2)))      # learned: g0 -> g1 is unicast
            assert len(g0.receive(0, 1)) == 1
            traffic = Traffic(g0, g1, 150, mac(2), mac(1))
            traffic.start()
            wait_for(lambda: traffic.done_bursts >= 5, timeout=30, what="traffic flowing")
            for rnd in range(3):
                batch = {fe: extra_memories(6, f"r{rnd}g{i}", first=0) for i, fe in enumerate((g0, g1))}
                memories += [m for ms in batch.values() for m in ms]
                for fe, ms in batch.items():
                    for mem in ms:
                        fe.add_region(describe(mem), mem.fd)
                names = {f"vswitch-hotplug-r{rnd}g{i}-{j}" for i in range(2) for j in range(6)}
                assert names <= mapped_names(pid)
                before = traffic.done_bursts
                for fe, ms in batch.items():
                    for mem in ms:
                        fe.remove_region(describe(mem))
                wait_for(lambda: not names & mapped_names(pid), timeout=5, what="removed regions unmapped")
                assert traffic.is_alive() or traffic.done_bursts == 150
                wait_for(lambda: traffic.done_bursts > before or not traffic.is_alive(), timeout=10,
                         what="traffic still flowing")
            traffic.join(timeout=120)
            assert traffic.error is None and traffic.received == 150 * 32, (traffic.error, traffic.received)
            for name in ("vm0", "vm1"):
                p = d.port(name)
                assert p["vhost"]["mem_faults"] == 0 and p["vhost"]["connected"] and p["link"] == "up"
                assert p["vhost"]["mem_regs_added"] == 1 + 18 and p["vhost"]["mem_regs_removed"] == 18
                assert p["stats"]["rx_errors"] == 0
            assert d.proc.poll() is None
            shown = d.ctl_raw("show", "vm0").stdout
            assert "memory: 1 regions" in shown and "  negotiated: " in shown
            assert "mem_regs_added 19 mem_regs_removed 18 mem_reg_refused 0" in shown
        finally:
            for fe in (g0, g1):
                fe.close()
            for mem in memories:
                mem.close()
        assert d.stop() == 0


def test_network_buffers_in_added_memory(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2)) as d:
        g0, g1 = connect_slots_guests(d, ["vm0", "vm1"])
        [rx_mem] = extra_memories(1, "rxbufs")
        [tx_mem] = extra_memories(1, "txbufs", first=1)
        try:
            g1.send_frame(0, frame(BROADCAST, mac(2)))
            assert len(g0.receive(0, 1)) == 1
            g1.add_region(describe(rx_mem), rx_mem.fd)
            g0.add_region(describe(tx_mem), tx_mem.fd)
            # g1 uses up its old buffers, then posts buffers that lie in the added memory only;
            # g0 sends from buffers in its added memory.
            rx, tx = g1.rx_ring(0), g0.tx_ring(0)
            for i in range(32):
                g0.send_frame(0, frame(mac(2), mac(1), b"old %02d" % i + b"." * 50))
            assert len(g1.receive(0, 32)) == 32
            g0.wait_tx_done(0)
            rx.mem, tx.mem = SplitMemory(g1.mem, rx_mem), SplitMemory(g0.mem, tx_mem)
            heads = g1.post_rx(0, 32)
            addrs = [rx.read_desc(h)[0] for h in heads]
            assert all(rx_mem.contains(a) for a in addrs)
            payloads = [b"new %02d" % i + b"!" * 60 for i in range(32)]
            for p in payloads:
                g0.send_frame(0, frame(mac(2), mac(1), p))
            assert len(tx.mem.handed_out) == 32          # each frame sent from the added memory
            got = g1.receive(0, 32)
            assert [f.data[14:] for f in got] == payloads
            g0.wait_tx_done(0)
            # The switch wrote them into the added memory itself (as seen through the guest's own mapping).
            landed = {rx_mem.read(a + g1.hdr_len + 14, 6) for a in addrs}
            assert landed == {p[:6] for p in payloads}
            # Back to the base memory; then the added regions go, and traffic goes on.
            rx.mem, tx.mem = g1.mem, g0.mem
            g1.post_rx(0, 8)
            g1.remove_region(describe(rx_mem))
            g0.remove_region(describe(tx_mem))
            for i in range(8):
                g0.send_frame(0, frame(mac(2), mac(1), b"after %d" % i))
            assert len(g1.receive(0, 8)) == 8
            for name in ("vm0", "vm1"):
                p = d.port(name)
                assert p["vhost"]["mem_faults"] == 0 and p["stats"]["rx_errors"] == 0
        finally:
            g0.close()
            g1.close()
            rx_mem.close()
            tx_mem.close()
        assert d.stop() == 0


def test_removing_the_memory_under_running_rings_stops_them_cleanly(tmp_path):
    """A hostile front-end removes the region its rings lie in while another guest floods it:
    its rings stop before the memory goes; nothing faults; the other port is unaffected."""
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3)) as d:
        g0, g1, bad = connect_slots_guests(d, ["vm0", "vm1", "vm2"])
        try:
            g1.send_frame(0, frame(BROADCAST, mac(2)))
            assert len(g0.receive(0, 1)) == 1 and len(bad.receive(0, 1)) == 1
            bad.post_rx(0, 64)
            traffic = Traffic(g0, g1, 60, mac(2), mac(1))   # every fourth burst floods to bad too
            traffic.start()
            wait_for(lambda: traffic.done_bursts >= 5, timeout=30, what="traffic flowing")
            [base] = bad.memory_regions()
            guest_mappings = memfd_mappings(d.proc.pid).count("vswitch-guest")
            bad.remove_region(base)
            p = d.port("vm2")
            assert p["vhost"]["rings_lost_memory"] == 2 and p["vhost"]["memory_regions"] == 0
            assert p["link"] == "down" and p["vhost"]["connected"]
            wait_for(lambda: memfd_mappings(d.proc.pid).count("vswitch-guest") == guest_mappings - 1,
                     what="the removed region unmapped")
            traffic.join(timeout=60)
            assert traffic.error is None and traffic.received == 60 * 32
            assert d.port("vm2")["vhost"]["mem_faults"] == 0 and d.proc.poll() is None
            assert "holds vring 0, 1: stopped" in d.log()
            # The ring restarts once given memory and addresses again.
            bad.add_region(base, bad.mem.fd)
            for ring in bad.rings:
                bad.request(Request.SET_VRING_ADDR,
                            protocol.pack_vring_addr(ring.index, ring.desc_uva, ring.used_uva, ring.avail_uva))
            wait_for(lambda: d.port("vm2")["link"] == "up", what="vm2 up again")
        finally:
            for fe in (g0, g1, bad):
                fe.close()
        assert d.stop() == 0
