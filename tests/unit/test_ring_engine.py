"""The C ring engine and packet loop, driven directly against guest memory.

A mock guest driver (tests/support/virtio_driver.py) writes descriptors into
a memfd; the C side maps the same bytes through a memory table, exactly as it
does for a real guest.  `vs_pmd_poll_once` runs one pass of the PMD loop in
the test's own thread, so every step is deterministic.

Hostile cases run in a forked child with a deadline (tests/support/child.py):
should a bound in C go (the descriptor chain budget, say), they fail within
seconds instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.support.child import in_child
from tests.support.frames import BROADCAST, frame, mac
from tests.support.virtio_driver import (NET_HDR_LEN_LEGACY, VIRTQ_DESC_F_INDIRECT,
                                         VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_AVAIL_F_NO_INTERRUPT,
                                         GuestMemory, PackedQueue, SplitQueue, memtable_for)
from vswitch.fib import MacTable
from vswitch.native import ffi, lib

F_MRG = 1 << lib.VIRTIO_NET_F_MRG_RXBUF
F_INDIRECT = 1 << lib.VIRTIO_RING_F_INDIRECT_DESC
F_EVENT_IDX = 1 << lib.VIRTIO_RING_F_EVENT_IDX
F_V1 = 1 << lib.VIRTIO_F_VERSION_1
DEFAULT_FEATURES = F_V1 | F_MRG | F_INDIRECT | F_EVENT_IDX


class Guest:
    """One vhost-user port as the C side sees it, with a mock driver on top."""

    def __init__(self, port_no: int, features: int = DEFAULT_FEATURES, queues: int = 1,
                 ring_size: int = 256, mem_size: int = 8 << 20, regions: int = 1):
        self.keep: list = []
        self.mems = [GuestMemory(mem_size, gpa_base=0x100000 + i * mem_size, uva_offset=0x7f0000000000)
                     for i in range(regions)]
        self.mem = self.mems[0]
        self.dev = ffi.new("struct vs_vhost_dev *")
        lib.vs_vhost_dev_init(self.dev, queues)
        lib.vs_vhost_dev_set_features(self.dev, features)
        self.dev.mem = memtable_for(ffi, self.mems, self.keep)
        hdr_len = self.dev.hdr_len
        self.rx = []
        self.tx = []
        packed = features & (1 << lib.VIRTIO_F_RING_PACKED)
        in_order = bool(features & (1 << lib.VIRTIO_F_IN_ORDER))
        for q in range(queues):
            for parity, lst in ((0, self.rx), (1, self.tx)):
                if packed:
                    vq = PackedQueue(self.mem, ring_size, hdr_len=hdr_len, index=2 * q + parity,
                                     in_order=in_order)
                else:
                    vq = SplitQueue(self.mem, ring_size, hdr_len=hdr_len, index=2 * q + parity)
                self.start_ring(vq)
                lst.append(vq)
        self.port = ffi.new("struct vs_port *")
        self.port.port_no = port_no
        self.port.ops = lib.vs_vhost_port_ops()
        self.port.priv = self.dev
        self.port.link_up = 1
        self.callfds: dict[int, int] = {}

    def start_ring(self, vq: SplitQueue) -> None:
        rc = lib.vs_vring_setup(self.dev, vq.index, vq.size, vq.desc_uva, vq.avail_uva, vq.used_uva,
                                vq.start_base)
        assert rc == 0, ffi.string(lib.vs_vq_error_name(rc))
        lib.vs_vring_set_enabled(ffi.addressof(self.dev.vrings[vq.index]), 1)

    def vring(self, index: int):
        return self.dev.vrings[index]

    def add_callfd(self, index: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.callfds[index] = fd
        self.dev.vrings[index].callfd = fd
        return fd

    def interrupts(self, index: int) -> int:
        try:
            return os.eventfd_read(self.callfds[index])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in self.callfds.values():
            os.close(fd)
        for obj in self.keep:
            ffi.release(obj)
        for m in self.mems:
            m.close()


class Rig:
    """Several guests, one MAC table and one PMD, polled by hand."""

    def __init__(self, *guests: Guest, max_entries: int = 8192):
        self.guests = list(guests)
        self.fib = MacTable(max_entries=max_entries)
        self.pmd = ffi.new("struct vs_pmd *")
        assert lib.vs_pmd_init(self.pmd, self.fib.c) == 0
        self.table = ffi.new("struct vs_port_table *")
        for g in guests:
            self.table.ports[g.port.port_no] = g.port
            self.table.live[self.table.n_live] = g.port.port_no
            self.table.n_live += 1
            for q in range(g.dev.nr_queue_pairs):
                self.table.poll[self.table.n_poll].port = g.port
                self.table.poll[self.table.n_poll].queue = q
                self.table.n_poll += 1
        lib.vs_pmd_publish(self.pmd, self.table)

    def poll(self, passes: int = 1) -> int:
        return sum(lib.vs_pmd_poll_once(self.pmd) for _ in range(passes))

    def close(self):
        lib.vs_pmd_fini(self.pmd)
        self.fib.close()
        for g in self.guests:
            g.close()


@pytest.fixture
def make_rig(closing):
    """make_rig(*guests, **kw): a Rig, closed after the test."""
    def make(*guests, **kw):
        rig = Rig(*guests, **kw)
        closing(rig)
        return rig
    return make


def two_guests(make_rig, **kw):
    a, b = Guest(0, **kw), Guest(1, **kw)
    return make_rig(a, b), a, b


# --- Forwarding ---------------------------------------------------------------

def test_frame_is_copied_once_into_the_other_guest(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(8)
    f = frame(mac(2), mac(1), os.urandom(200))
    head = a.tx[0].post_tx(f)
    assert rig.poll() == 1
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f and got.num_buffers == 1
    assert a.tx[0].get_used() == [(head, 0)]
    tx_ring, rx_ring = a.vring(1), b.vring(0)
    assert (tx_ring.stats.packets, tx_ring.stats.bytes) == (1, len(f))
    assert (rx_ring.stats.packets, rx_ring.stats.bytes, rx_ring.stats.dropped) == (1, len(f), 0)


@pytest.mark.parametrize("layout", [
    dict(segments=1), dict(segments=5), dict(header_separate=True), dict(header_separate=True, segments=3),
    dict(indirect=True), dict(indirect=True, segments=4, header_separate=True)])
def test_tx_chain_layouts(make_rig, layout):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(4)
    f = frame(mac(2), mac(1), bytes(range(256)) * 4)
    a.tx[0].post_tx(f, **layout)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f


def test_mergeable_rx_spreads_a_large_frame(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(8, size=512)
    f = frame(mac(2), mac(1), os.urandom(1400))
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.num_buffers == 3 and got.data == f
    assert struct.unpack_from("<H", got.header, 10)[0] == 3


def test_without_mergeable_a_chain_of_buffers_holds_the_frame(make_rig):
    rig, a, b = two_guests(make_rig, features=F_V1 | F_INDIRECT)
    b.rx[0].post_rx(2, size=1600, segments=4)
    f = frame(mac(2), mac(1), os.urandom(1400))
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f and got.num_buffers == 1


def test_without_mergeable_a_too_small_buffer_drops_only_that_frame(make_rig):
    rig, a, b = two_guests(make_rig, features=F_V1)
    b.rx[0].post_rx(1, size=256)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"y" * 1000))
    a.tx[0].post_tx(frame(mac(2), mac(1), b"z" * 100))
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data.endswith(b"z" * 100)
    assert b.vring(0).stats.dropped == 1
    assert b.vring(0).stats.too_big == 1   # named for what it was: too big, not out of buffers


def test_with_mergeable_a_frame_needing_too_many_buffers_is_dropped_whole(make_rig):
    """A frame that would need more than the 64 buffers one frame may use is dropped and
    counted as too big, the buffers stay, and the next frame that fits takes them."""
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(100, size=128)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"y" * 9000))
    a.tx[0].post_tx(frame(mac(2), mac(1), b"z" * 1000))
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data.endswith(b"z" * 1000) and got.num_buffers > 1
    assert b.vring(0).stats.dropped == 1 and b.vring(0).stats.too_big == 1


def test_legacy_header_without_version_1(make_rig):
    rig, a, b = two_guests(make_rig, features=0)
    assert a.dev.hdr_len == NET_HDR_LEN_LEGACY
    b.rx[0].post_rx(2)
    f = frame(mac(2), mac(1))
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f and len(got.header) == NET_HDR_LEN_LEGACY


def test_indirect_rx_buffers(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(2, size=2048, segments=3, indirect=True)
    f = frame(mac(2), mac(1), os.urandom(1000))
    a.tx[0].post_tx(f)
    rig.poll()
    assert b.rx[0].read_rx_frames()[0].data == f


def test_no_rx_buffers_drops_and_counts_then_recovers(make_rig):
    rig, a, b = two_guests(make_rig)
    for _ in range(5):
        a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert b.vring(0).stats.dropped == 5
    assert b.vring(0).stats.too_big == 0   # no buffer at all is not a frame too big
    assert len(a.tx[0].get_used()) == 5  # the sender gets its buffers back regardless
    b.rx[0].post_rx(4)
    a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert len(b.rx[0].read_rx_frames()) == 1


def test_more_than_a_burst(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(100)
    for i in range(100):
        a.tx[0].post_tx(frame(mac(2), mac(1), struct.pack("<I", i) * 10))
    assert rig.poll() == 32
    rig.poll(4)
    got = b.rx[0].read_rx_frames()
    assert [struct.unpack_from("<I", g.data, 14)[0] for g in got] == list(range(100))


def test_buffers_crossing_two_regions_are_split(make_rig):
    # Two adjacent regions, like a virtio-user app with two memory segments.
    a = Guest(0, regions=2, mem_size=1 << 20)
    b = Guest(1)
    rig = make_rig(a, b)
    b.rx[0].post_rx(2)
    boundary = a.mems[1].gpa_base
    f = frame(mac(2), mac(1), os.urandom(300))
    data = a.tx[0].net_header() + f
    start = boundary - 100
    a.mems[0].write(start, data[:100])
    a.mems[1].write(boundary, data[100:])
    a.tx[0].write_desc(0, start, len(data))
    a.tx[0].publish_raw(0)
    rig.poll()
    assert b.rx[0].read_rx_frames()[0].data == f


# --- Notifications --------------------------------------------------------------

def test_one_interrupt_per_burst(make_rig):
    rig, a, b = two_guests(make_rig, features=F_V1 | F_MRG)
    b.add_callfd(0)
    a.add_callfd(1)
    b.rx[0].post_rx(40)
    for _ in range(20):
        a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert b.interrupts(0) == 1 and a.interrupts(1) == 1
    assert b.vring(0).stats.notifications == 1


def test_no_interrupt_flag_is_honoured(make_rig):
    rig, a, b = two_guests(make_rig, features=F_V1 | F_MRG)
    b.add_callfd(0)
    b.rx[0].set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    b.rx[0].post_rx(4)
    a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert len(b.rx[0].read_rx_frames()) == 1
    assert b.interrupts(0) == 0


def test_event_idx_suppresses_until_the_used_event(make_rig):
    rig, a, b = two_guests(make_rig)
    b.add_callfd(0)
    b.rx[0].post_rx(20)
    # The first publication always notifies (nothing signalled yet).
    a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert b.interrupts(0) == 1
    # The guest wants an interrupt only once used->idx passes 5.
    b.rx[0].set_used_event(5)
    for expected_irq in (0, 0, 0, 0, 1, 0):
        a.tx[0].post_tx(frame(mac(2), mac(1)))
        rig.poll()
        assert b.interrupts(0) == expected_irq
    assert len(b.rx[0].read_rx_frames()) == 7


# --- Learning and flooding --------------------------------------------------------

def test_broadcast_floods_every_other_port_and_unicast_goes_to_one(make_rig):
    guests = [Guest(n) for n in range(4)]
    rig = make_rig(*guests)
    for g in guests:
        g.rx[0].post_rx(8)
    guests[0].tx[0].post_tx(frame(BROADCAST, mac(10)))
    rig.poll()
    received = [len(g.rx[0].read_rx_frames()) for g in guests]
    assert received == [0, 1, 1, 1]  # never back out of the ingress port
    # guest 2 answers; now both MACs are known and unicast reaches one port.
    guests[2].tx[0].post_tx(frame(mac(10), mac(12)))
    rig.poll()
    assert [len(g.rx[0].read_rx_frames()) for g in guests] == [1, 0, 0, 0]
    guests[0].tx[0].post_tx(frame(mac(12), mac(10)))
    rig.poll()
    assert [len(g.rx[0].read_rx_frames()) for g in guests] == [0, 0, 1, 0]
    assert rig.fib.lookup("02:00:00:00:00:0a") == 0
    assert rig.fib.lookup("02:00:00:00:00:0c") == 2


def test_unknown_unicast_and_multicast_are_flooded(make_rig):
    guests = [Guest(n) for n in range(3)]
    rig = make_rig(*guests)
    for g in guests:
        g.rx[0].post_rx(8)
    guests[0].tx[0].post_tx(frame(mac(99), mac(10)))
    guests[0].tx[0].post_tx(frame(b"\x01\x00\x5e\x00\x00\x01", mac(10)))
    rig.poll()
    assert [len(g.rx[0].read_rx_frames()) for g in guests] == [0, 2, 2]
    assert rig.pmd.stats.flooded == 2


def test_frame_for_a_mac_behind_its_own_port_is_dropped(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(4)
    a.tx[0].post_tx(frame(BROADCAST, mac(1)))
    a.tx[0].post_tx(frame(mac(1), mac(3)))  # mac(1) was learned on a itself
    rig.poll()
    assert len(b.rx[0].read_rx_frames()) == 1
    assert rig.pmd.stats.dropped_same_port == 1


def test_station_moves_to_another_port(make_rig):
    guests = [Guest(n) for n in range(3)]
    rig = make_rig(*guests)
    for g in guests:
        g.rx[0].post_rx(8)
    guests[1].tx[0].post_tx(frame(BROADCAST, mac(7)))
    rig.poll()
    guests[2].tx[0].post_tx(frame(BROADCAST, mac(7)))
    rig.poll()
    assert rig.fib.lookup("02:00:00:00:00:07") == 2
    assert rig.fib.stats()["moved"] == 1


def test_link_down_port_gets_nothing(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(4)
    b.port.link_up = 0
    a.tx[0].post_tx(frame(BROADCAST, mac(1)))
    rig.poll()
    assert b.rx[0].read_rx_frames() == []


def test_multiqueue_rx_follows_the_ingress_queue(make_rig):
    a, b = Guest(0, queues=2), Guest(1, queues=2)
    rig = make_rig(a, b)
    for q in range(2):
        b.rx[q].post_rx(4)
    a.tx[1].post_tx(frame(BROADCAST, mac(1)))
    a.tx[0].post_tx(frame(BROADCAST, mac(1)))
    rig.poll()
    assert len(b.rx[0].read_rx_frames()) == 1 and len(b.rx[1].read_rx_frames()) == 1


def test_multiqueue_falls_back_to_an_enabled_queue(make_rig):
    a, b = Guest(0, queues=2), Guest(1, queues=2)
    rig = make_rig(a, b)
    lib.vs_vring_set_enabled(ffi.addressof(b.vring(2)), 0)  # the guest enabled only queue pair 0
    b.rx[0].post_rx(4)
    a.tx[1].post_tx(frame(BROADCAST, mac(1)))
    rig.poll()
    assert len(b.rx[0].read_rx_frames()) == 1


# --- Hostile guests -----------------------------------------------------------------

def errors(g: Guest, index: int, reason: int) -> int:
    return g.vring(index).error_count[reason]


def assert_still_forwards(rig, a, b):
    """After a bad chain, good frames from the same guest still go through."""
    b.rx[0].post_rx(2)
    f = frame(mac(2), mac(1), b"after")
    a.tx[0].post_tx(f)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == [f]


def post_raw_tx(g: Guest, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    for i, d in enumerate(descs):
        g.tx[0].write_desc(head + i, *d)
    g.tx[0].publish_raw(head)


@pytest.fixture
def hostile(make_rig):
    rig, a, b = two_guests(make_rig)
    # The driver's own descriptors start at 0; raw chains use the top of the table.
    return rig, a, b


RAW = 200  # descriptor index where raw chains are written


def good_buffer(g: Guest, payload: bytes = b"") -> tuple[int, int]:
    data = g.tx[0].net_header() + frame(mac(2), mac(1), payload or b"p" * 40)
    gpa = g.mem.alloc(len(data))
    g.mem.write(gpa, data)
    return gpa, len(data)


@pytest.mark.parametrize("case, reason", [
    ("outside", lib.VS_VQ_ERR_ADDR),
    ("past_region_end", lib.VS_VQ_ERR_ADDR),
    ("loop", lib.VS_VQ_ERR_LOOP),
    ("self_loop", lib.VS_VQ_ERR_LOOP),
    ("indirect_loop", lib.VS_VQ_ERR_LOOP),
    ("next_past_ring", lib.VS_VQ_ERR_NEXT),
    ("nested_indirect", lib.VS_VQ_ERR_NESTED_INDIRECT),
    ("indirect_len", lib.VS_VQ_ERR_INDIRECT_LEN),
    ("indirect_too_long", lib.VS_VQ_ERR_INDIRECT_LEN),
    ("indirect_outside", lib.VS_VQ_ERR_ADDR),
    ("writable_in_tx", lib.VS_VQ_ERR_WRITE_IN_TX),
    ("short_header", lib.VS_VQ_ERR_SHORT_HEADER),
    ("runt", lib.VS_VQ_ERR_NO_READABLE),
    ("too_long", lib.VS_VQ_ERR_TOO_LONG),
    ("too_many_segs", lib.VS_VQ_ERR_TOO_MANY_SEGS),
])
@in_child()
def test_bad_tx_chain_is_dropped_counted_and_returned(hostile, case, reason):
    rig, a, b = hostile
    gpa, length = good_buffer(a)
    mem_end = a.mem.gpa_base + a.mem.size
    q = a.tx[0]
    if case == "outside":
        post_raw_tx(a, [(0xdead0000000, 64, 0, 0)], RAW)
    elif case == "past_region_end":
        post_raw_tx(a, [(mem_end - 32, 64, 0, 0)], RAW)
    elif case == "loop":
        post_raw_tx(a, [(gpa, 0, VIRTQ_DESC_F_NEXT, RAW + 1), (gpa, 0, VIRTQ_DESC_F_NEXT, RAW)], RAW)
    elif case == "self_loop":
        post_raw_tx(a, [(gpa, 0, VIRTQ_DESC_F_NEXT, RAW)], RAW)
    elif case == "indirect_loop":
        table = q.write_indirect_table([(gpa, 0, VIRTQ_DESC_F_NEXT, 1), (gpa, 0, VIRTQ_DESC_F_NEXT, 0)])
        post_raw_tx(a, [(table, 32, VIRTQ_DESC_F_INDIRECT, 0)], RAW)
    elif case == "next_past_ring":
        post_raw_tx(a, [(gpa, length, VIRTQ_DESC_F_NEXT, 5000)], RAW)
    elif case == "nested_indirect":
        inner = q.write_indirect_table([(gpa, length, 0, 0)])
        outer = q.write_indirect_table([(inner, 16, VIRTQ_DESC_F_INDIRECT, 0)])
        post_raw_tx(a, [(outer, 16, VIRTQ_DESC_F_INDIRECT, 0)], RAW)
    elif case == "indirect_len":
        table = q.write_indirect_table([(gpa, length, 0, 0)])
        post_raw_tx(a, [(table, 17, VIRTQ_DESC_F_INDIRECT, 0)], RAW)
    elif case == "indirect_too_long":
        post_raw_tx(a, [(a.mem.gpa_base, 16 * 1024, VIRTQ_DESC_F_INDIRECT, 0)], RAW)
    elif case == "indirect_outside":
        post_raw_tx(a, [(mem_end - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)], RAW)
    elif case == "writable_in_tx":
        post_raw_tx(a, [(gpa, length, VIRTQ_DESC_F_WRITE, 0)], RAW)
    elif case == "short_header":
        post_raw_tx(a, [(gpa, 6, 0, 0)], RAW)
    elif case == "runt":
        post_raw_tx(a, [(gpa, 12 + 10, 0, 0)], RAW)
    elif case == "too_long":
        post_raw_tx(a, [(a.mem.gpa_base, 70000, 0, 0)], RAW)
    elif case == "too_many_segs":
        first = 100
        post_raw_tx(a, [(gpa + i, 1, VIRTQ_DESC_F_NEXT if i < 79 else 0, first + i + 1) for i in range(80)], first)
    rig.poll()
    assert errors(a, 1, reason) == 1, ffi.string(lib.vs_vq_error_name(a.vring(1).last_error))
    assert a.vring(1).stats.errors == 1 and a.vring(1).last_error == reason
    assert not a.vring(1).broken
    # The bad chain comes back with length 0, and nothing reached the other guest.
    used = q.get_used()
    assert len(used) == 1 and used[0][1] == 0
    assert b.vring(0).stats.packets == 0
    assert_still_forwards(rig, a, b)


@pytest.mark.parametrize("bad_at", [0, 1, 3])
def test_used_entries_keep_the_avail_order_around_a_bad_chain(hostile, bad_at):
    """VIRTIO_F_IN_ORDER: chains come back in the order they were made
    available, a malformed one included, wherever it sits in the burst."""
    rig, a, b = hostile
    b.rx[0].post_rx(8)
    q = a.tx[0]
    heads = []
    for i in range(4):
        if i == bad_at:
            gpa, length = good_buffer(a)
            q.write_desc(RAW, gpa, length, VIRTQ_DESC_F_WRITE, 0)  # writable: refused in TX
            q.publish_raw(RAW)
            heads.append(RAW)
        else:
            heads.append(q.post_tx(frame(mac(2), mac(1), bytes([i]) * 50)))
    rig.poll(2)
    used = q.get_used()
    assert [h for h, _ in used] == heads
    assert errors(a, 1, lib.VS_VQ_ERR_WRITE_IN_TX) == 1
    assert len(b.rx[0].read_rx_frames()) == 3


@in_child()
def test_looping_rx_chain_is_counted_and_skipped(make_rig):
    rig, a, b = two_guests(make_rig)
    q = b.rx[0]
    buf = q.mem.alloc(2048)
    q.write_desc(RAW, buf, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, RAW + 1)
    q.write_desc(RAW + 1, buf, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, RAW)
    q.publish_raw(RAW)
    q.post_rx(1)
    for _ in range(2):
        a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert errors(b, 0, lib.VS_VQ_ERR_LOOP) == 1
    # The looping chain comes back empty (its frame dropped); the good buffer holds the next one.
    assert [len(f.data) for f in q.read_rx_frames()] == [0, 64]
    assert b.vring(0).stats.dropped == 1


@in_child()
def test_avail_index_jump_stops_only_that_ring(make_rig):
    guests = [Guest(n) for n in range(3)]
    rig = make_rig(*guests)
    a, b, c = guests
    a.tx[0].set_avail_idx(a.tx[0].size + 5)
    rig.poll()
    assert a.vring(1).broken and errors(a, 1, lib.VS_VQ_ERR_AVAIL_JUMP) == 1
    # Other ports are untouched.
    b.rx[0].post_rx(2)
    f = frame(BROADCAST, mac(3))
    c.tx[0].post_tx(f)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == [f]
    # A broken ring stays stopped until the front-end restarts it.
    rig.poll(3)
    assert errors(a, 1, lib.VS_VQ_ERR_AVAIL_JUMP) == 1


@in_child()
def test_head_past_the_ring_stops_the_ring(make_rig):
    rig, a, b = two_guests(make_rig)
    a.tx[0].publish_raw(60000)
    rig.poll()
    assert a.vring(1).broken and errors(a, 1, lib.VS_VQ_ERR_HEAD) == 1


@in_child()
def test_bad_rx_chain_is_counted_and_skipped(make_rig):
    rig, a, b = two_guests(make_rig)
    q = b.rx[0]
    q.write_desc(RAW, 0xdead0000000, 2048, VIRTQ_DESC_F_WRITE, 0)
    q.publish_raw(RAW)
    q.write_desc(RAW + 1, q.mem.alloc(2048), 2048, 0, 0)  # read-only in an RX chain
    q.publish_raw(RAW + 1)
    q.post_rx(2)
    for _ in range(3):
        a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert errors(b, 0, lib.VS_VQ_ERR_ADDR) == 1
    assert errors(b, 0, lib.VS_VQ_ERR_NO_WRITABLE) == 1
    # The bad chains come back empty; the one good buffer holds the third frame.
    assert [len(f.data) for f in q.read_rx_frames()] == [0, 0, 64]
    assert b.vring(0).stats.packets == 1 and b.vring(0).stats.dropped == 2


@in_child()
def test_rx_avail_jump_stops_the_rx_ring(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].set_avail_idx(1000)
    a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert b.vring(0).broken
    assert a.tx[0].get_used() != []  # the sender is not stalled


def test_ring_outside_memory_is_refused():
    g = Guest(0)
    try:
        bad = 0x7f0000000000 + 0x100000 + g.mem.size - 8
        assert lib.vs_vring_setup(g.dev, 0, 256, bad, g.rx[0].avail_uva, g.rx[0].used_uva, 0) == \
            lib.VS_VQ_ERR_RING_ADDR
        assert lib.vs_vring_setup(g.dev, 0, 100, g.rx[0].desc_uva, g.rx[0].avail_uva, g.rx[0].used_uva, 0) == \
            lib.VS_VQ_ERR_RING_SIZE
        assert lib.vs_vring_setup(g.dev, 99, 256, 0, 0, 0, 0) == lib.VS_VQ_ERR_RING_ADDR
    finally:
        g.close()


@in_child(timeout=60)
@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_ring_straddling_the_end_of_a_region_is_refused(part):
    """Each ring part must lie wholly inside one region: starting inside is not enough."""
    g = Guest(0)
    try:
        vq = g.rx[0]
        end = g.mem.gpa_to_uva(g.mem.gpa_base + g.mem.size)
        addrs = {"desc": vq.desc_uva, "avail": vq.avail_uva, "used": vq.used_uva}
        # Aligned as each part must be, so only the length check can refuse it.
        addrs[part] = end - {"desc": 2048, "avail": 256, "used": 1024}[part]
        rc = lib.vs_vring_setup(g.dev, 0, vq.size, addrs["desc"], addrs["avail"], addrs["used"], 0)
        assert rc == lib.VS_VQ_ERR_RING_ADDR, ffi.string(lib.vs_vq_error_name(rc))
        # A part that ends exactly at the end of the region fits.
        if part == "desc":
            rc = lib.vs_vring_setup(g.dev, 0, vq.size, end - 16 * vq.size, vq.avail_uva, vq.used_uva, 0)
            assert rc == 0, ffi.string(lib.vs_vq_error_name(rc))
    finally:
        g.close()


# --- Restart ------------------------------------------------------------------------

def restart_ring(g: Guest, vq: SplitQueue, base: int) -> None:
    """What a new back-end does when a front-end (re)starts a ring with SET_VRING_BASE base."""
    vr = ffi.addressof(g.dev.vrings[vq.index])
    lib.vs_vring_set_enabled(vr, 0)
    rc = lib.vs_vring_setup(g.dev, vq.index, vq.size, vq.desc_uva, vq.avail_uva, vq.used_uva, base)
    assert rc == 0, ffi.string(lib.vs_vq_error_name(rc))
    lib.vs_vring_set_enabled(vr, 1)


def test_restarted_rings_resume_from_the_used_index(make_rig):
    """After a back-end crash virtio-user sends base 0 while its rings are far along: the ring
    engine resumes from the used index in guest memory, and frames waiting in the rings go on."""
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(8)
    for _ in range(5):
        a.tx[0].post_tx(frame(mac(2), mac(1)))
    rig.poll()
    assert len(b.rx[0].read_rx_frames()) == 5 and len(a.tx[0].get_used()) == 5
    assert a.vring(1).resumed_from_used == 0 and b.vring(0).resumed_from_used == 0
    # Frames the guest made available while the back-end was gone wait in its TX ring.
    waiting = [frame(mac(2), mac(1), bytes([i]) * 50) for i in range(3)]
    for f in waiting:
        a.tx[0].post_tx(f)
    restart_ring(a, a.tx[0], 0)
    restart_ring(b, b.rx[0], 0)
    assert (a.vring(1).last_avail_idx, a.vring(1).last_used_idx, a.vring(1).resumed_from_used) == (5, 5, 1)
    assert (b.vring(0).last_avail_idx, b.vring(0).last_used_idx, b.vring(0).resumed_from_used) == (5, 5, 1)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == waiting
    assert len(a.tx[0].get_used()) == 3
    assert not a.vring(1).broken and not b.vring(0).broken and a.vring(1).stats.errors == 0
    # A base that matches the used index is taken as it is.
    restart_ring(a, a.tx[0], 8)
    assert a.vring(1).resumed_from_used == 1


def test_resumed_ring_still_stops_on_an_avail_jump(make_rig):
    """Resuming from the used index trusts the guest no more than SET_VRING_BASE does: an avail
    index more than a ring ahead of it still stops the ring."""
    rig, a, b = two_guests(make_rig)
    q = a.tx[0]
    q.mem.write_u16(q.used_gpa + 2, 40000)  # the guest may write anything there
    restart_ring(a, q, 0)
    assert a.vring(1).last_avail_idx == 40000
    q.set_avail_idx(40000 + q.size + 1)
    rig.poll()
    assert a.vring(1).broken and errors(a, 1, lib.VS_VQ_ERR_AVAIL_JUMP) == 1


def test_random_descriptors_never_crash(make_rig):
    """Fuzz: random descriptor tables and indexes; every outcome is a count."""
    import random
    rnd = random.Random(1234)
    rig, a, b = two_guests(make_rig)
    base, size = a.mem.gpa_base, a.mem.size
    for round_ in range(300):
        b.rx[0].post_rx(1) if b.rx[0].free_count() else None
        q = a.tx[0] if round_ % 2 else b.rx[0]
        for i in range(rnd.randint(1, 6)):
            addr = rnd.choice([base + rnd.randrange(size), rnd.getrandbits(64), base + size - rnd.randrange(64)])
            q.write_desc(rnd.randrange(q.size), addr, rnd.choice([0, 1, 14, 64, 1500, rnd.getrandbits(32)]),
                         rnd.getrandbits(3), rnd.choice([rnd.randrange(q.size), rnd.getrandbits(16)]))
        q.publish_raw(rnd.choice([rnd.randrange(q.size), rnd.getrandbits(16)]))
        rig.poll()
        for g, idx in ((a, 1), (b, 0)):
            if g.vring(idx).broken:  # what a front-end restart would do
                lib.vs_vring_setup(g.dev, idx, 256, *(lambda v: (v.desc_uva, v.avail_uva, v.used_uva))(
                    g.tx[0] if idx == 1 else g.rx[0]), g.vring(idx).last_avail_idx)
                (g.tx[0] if idx == 1 else g.rx[0]).set_avail_idx(g.vring(idx).last_avail_idx)
    assert a.vring(1).stats.errors + b.vring(0).stats.errors > 0


@pytest.mark.parametrize("case", ["gso_not_negotiated", "udp_gso", "gso_without_partial_csum", "ecn_not_negotiated"])
def test_tx_header_asking_for_an_offload_not_negotiated_is_refused(make_rig, case):
    """A guest that negotiated CSUM and HOST_TSO4 only: a header asking for more is
    dropped and counted on its TX ring, not passed on with the request cleared."""
    offloads = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 11)   # CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4
    rig, a, b = two_guests(make_rig, features=F_V1 | offloads)
    b.rx[0].post_rx(4, size=4096)
    tcp = bytes(Ether(dst=mac(2), src=mac(1)) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP() / (b"t" * 200))
    csum = lib.VS_NET_HDR_F_NEEDS_CSUM
    flags, gso = {
        "gso_not_negotiated": (csum, lib.VS_NET_HDR_GSO_TCPV6),
        "udp_gso": (csum, lib.VS_NET_HDR_GSO_UDP),
        "gso_without_partial_csum": (0, lib.VS_NET_HDR_GSO_TCPV4),
        "ecn_not_negotiated": (csum, lib.VS_NET_HDR_GSO_TCPV4 | lib.VS_NET_HDR_GSO_ECN),
    }[case]
    q = a.tx[0]
    for header_flags, header_gso in ((flags, gso), (csum, lib.VS_NET_HDR_GSO_TCPV4)):
        header = struct.pack("<BBHHHH", header_flags, header_gso, 54, 100, 34, 16)
        q.post_tx(tcp, header=header + bytes(q.hdr_len - len(header)))
    rig.poll()
    assert errors(a, 1, lib.VS_VQ_ERR_NET_HDR) == 1
    assert not a.vring(1).broken
    # Both chains come back; only the frame with the allowed header reached the other guest.
    assert len(q.get_used()) == 2
    [got] = b.rx[0].read_rx_frames()
    assert got.data == tcp and got.header[1] == lib.VS_NET_HDR_GSO_TCPV4


# --- Double fetches ---------------------------------------------------------------------

@contextlib.contextmanager
def flipping(mem: GuestMemory, gpa: int, values: tuple[int, int]):
    """A second CPU rewriting one byte of guest memory as fast as it can, as a hostile guest would."""
    offset = gpa - mem.gpa_base
    pid = os.fork()
    if pid == 0:
        try:
            byte = ctypes.c_uint8.from_buffer(mem.mm, offset)
            first, second = values
            while True:
                byte.value = first
                byte.value = second
        finally:
            os._exit(0)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def hammer(rig: Rig, q: SplitQueue, gpa: int, length: int, seconds: float) -> None:
    """Makes the same TX buffer available over and over, 32 at a time, and polls."""
    for i in range(32):
        q.write_desc(i, gpa, length)
    for slot in range(q.size):
        q.write_avail_entry(slot, slot % 32)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(100):
            # 32 chains outstanding: a refused chain ends its burst early (in-order), so
            # only what came back is made available again, never more than the ring.
            q.set_avail_idx((q.used_idx + 32) & 0xFFFF)
            rig.poll()


@in_child(timeout=60)
def test_a_source_mac_rewritten_while_read_is_never_learned_as_multicast(make_rig):
    """The multicast check and the learning must see the same source MAC: a guest flipping its
    multicast bit at the right moment must not get a multicast address into the MAC table."""
    rig, a, b = two_guests(make_rig)
    q = a.tx[0]
    data = q.net_header() + frame(BROADCAST, mac(1))
    gpa = a.mem.alloc(len(data))
    a.mem.write(gpa, data)
    with flipping(a.mem, gpa + len(q.net_header()) + 6, (0x03, 0x02)):
        hammer(rig, q, gpa, len(data), seconds=3.0)
    assert a.vring(1).stats.packets > 100000
    learned = [e.mac for e in rig.fib.entries()]
    assert all(not int(m.split(":")[0], 16) & 1 for m in learned), f"multicast MAC learned: {learned}"


@in_child(timeout=60)
def test_a_gso_type_rewritten_while_read_is_never_taken_unchecked(make_rig):
    """The sender negotiated TSO4 only: a guest flipping its header's gso_type between TCPV4 and
    UDP must get either TCPV4 through or the frame refused at the source, never the UDP type it
    was not allowed (which the receiving port would have to drop, counted as tx_dropped_offload)."""
    offloads = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 11)   # CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4
    rig, a, b = two_guests(make_rig, features=F_V1 | offloads)
    q = a.tx[0]
    # A header the receiving port can trust as it is (vs_offload_hdr_valid): TCP over IPv4,
    # checksum at the TCP checksum field, 54 bytes of headers, 100-byte segments.
    tcp = bytes(Ether(dst=mac(2), src=mac(1)) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP() / (b"t" * 200))
    header = struct.pack("<BBHHHH", lib.VS_NET_HDR_F_NEEDS_CSUM, lib.VS_NET_HDR_GSO_TCPV4, 54, 100, 34, 16)
    header += bytes(q.hdr_len - len(header))
    data = header + tcp
    gpa = a.mem.alloc(len(data))
    a.mem.write(gpa, data)
    with flipping(a.mem, gpa + 1, (lib.VS_NET_HDR_GSO_UDP, lib.VS_NET_HDR_GSO_TCPV4)):
        hammer(rig, q, gpa, len(data), seconds=3.0)
    # Frames read while the byte said UDP are refused at the source (VS_VQ_ERR_NET_HDR).
    assert a.vring(1).stats.packets + a.vring(1).stats.errors > 100000
    assert b.port.stats.tx_dropped_offload == 0
