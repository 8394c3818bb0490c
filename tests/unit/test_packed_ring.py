"""Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1 section 2.8) in the C
ring engine, both directions, against the mock driver's packed mode
(tests/support/virtio_driver.py PackedQueue) and the PMD loop polled by hand.

The rig is test_ring_engine's: a Guest whose features include RING_PACKED
gets packed rings.  Hostile cases run in a forked child with a deadline, so
a missing bound fails fast instead of hanging.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

import pytest

from tests.support.child import in_child
from tests.support.frames import frame, mac
from tests.support.virtio_driver import (PAGE, PACKED_START_BASE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT,
                                         VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE,
                                         VIRTQ_EVENT_F_DESC, VIRTQ_EVENT_F_DISABLE, VIRTQ_EVENT_F_ENABLE)
from tests.unit.test_ring_engine import Guest, make_rig  # noqa: F401  (make_rig is a fixture)
from vswitch.native import ffi, lib

F_MRG = 1 << lib.VIRTIO_NET_F_MRG_RXBUF
F_INDIRECT = 1 << lib.VIRTIO_RING_F_INDIRECT_DESC
F_EVENT_IDX = 1 << lib.VIRTIO_RING_F_EVENT_IDX
F_V1 = 1 << lib.VIRTIO_F_VERSION_1
F_PACKED = 1 << lib.VIRTIO_F_RING_PACKED
F_IN_ORDER = 1 << lib.VIRTIO_F_IN_ORDER
PACKED = F_V1 | F_MRG | F_INDIRECT | F_EVENT_IDX | F_PACKED


def two_guests(make_rig, **kw):
    kw.setdefault("features", PACKED)
    a, b = Guest(0, **kw), Guest(1, **kw)
    return make_rig(a, b), a, b


def test_the_ring_starts_packed_and_tells_the_device_not_to_kick(make_rig):
    rig, a, b = two_guests(make_rig)
    assert a.vring(1).packed == 1 and b.vring(0).packed == 1
    assert a.tx[0].device_event[0] == VIRTQ_EVENT_F_DISABLE
    split = Guest(2, features=F_V1 | F_MRG)
    try:
        assert split.vring(1).packed == 0
    finally:
        split.close()


def test_frame_is_copied_once_into_the_other_guest(make_rig):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(8)
    f = frame(mac(2), mac(1), os.urandom(200))
    buf_id = a.tx[0].post_tx(f)
    assert rig.poll() == 1
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f and got.num_buffers == 1
    assert a.tx[0].get_used() == [(buf_id, 0)]
    tx_ring, rx_ring = a.vring(1), b.vring(0)
    assert (tx_ring.stats.packets, tx_ring.stats.bytes, tx_ring.stats.errors) == (1, len(f), 0)
    assert (rx_ring.stats.packets, rx_ring.stats.bytes, rx_ring.stats.dropped) == (1, len(f), 0)


@pytest.mark.parametrize("layout", [
    dict(segments=1), dict(segments=5), dict(header_separate=True), dict(header_separate=True, segments=3),
    dict(indirect=True), dict(indirect=True, segments=4, header_separate=True)])
def test_tx_chain_layouts(make_rig, layout):
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(4)
    f = frame(mac(2), mac(1), bytes(range(256)) * 4)
    buf_id = a.tx[0].post_tx(f, **layout)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f
    assert a.tx[0].get_used() == [(buf_id, 0)]


@pytest.mark.parametrize("layout", [dict(segments=3), dict(indirect=True), dict(indirect=True, segments=4)])
def test_rx_chain_layouts(make_rig, layout):
    rig, a, b = two_guests(make_rig, features=PACKED & ~F_MRG)
    b.rx[0].post_rx(2, size=1600, **layout)
    f = frame(mac(2), mac(1), os.urandom(1400))
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f and got.num_buffers == 1


def test_mergeable_rx_spreads_a_large_frame(make_rig):
    rig, a, b = two_guests(make_rig)
    ids = b.rx[0].post_rx(8, size=512)
    f = frame(mac(2), mac(1), os.urandom(1400))
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.num_buffers == 3 and got.data == f and got.heads == ids[:3]
    assert struct.unpack_from("<H", got.header, 10)[0] == 3


def test_without_mergeable_a_too_small_buffer_drops_only_that_frame(make_rig):
    rig, a, b = two_guests(make_rig, features=PACKED & ~F_MRG)
    b.rx[0].post_rx(1, size=256)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"y" * 1000))
    a.tx[0].post_tx(frame(mac(2), mac(1), b"z" * 100))
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data.endswith(b"z" * 100)
    assert b.vring(0).stats.dropped == 1 and b.vring(0).stats.packets == 1


def test_no_rx_buffers_drops_and_counts_then_recovers(make_rig):
    rig, a, b = two_guests(make_rig)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"lost"))
    rig.poll()
    assert b.vring(0).stats.dropped == 1
    b.rx[0].post_rx(1)
    f = frame(mac(2), mac(1), b"kept")
    a.tx[0].post_tx(f)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == [f]


@pytest.mark.parametrize("features", [PACKED, PACKED | F_IN_ORDER, PACKED & ~F_MRG, (PACKED & ~F_MRG) | F_IN_ORDER])
def test_wraps_around_the_ring_many_times(make_rig, features):
    """A ring of 8 slots, chains of 1 to 3 descriptors so that chains straddle
    the end of the ring: 10 laps each way, every frame in order."""
    rig, a, b = two_guests(make_rig, features=features, ring_size=8)
    sent, got = [], []
    for i in range(40):
        b.rx[0].post_rx(2, size=1024, segments=1 + i % 2)
        batch = []
        for k in range(2):
            f = frame(mac(2), mac(1), bytes([i, k]) * (30 + i))
            a.tx[0].post_tx(f, segments=1 + (i + k) % 3)
            batch.append(f)
        sent += batch
        rig.poll()
        assert len(a.tx[0].get_used()) == 2
        got += [x.data for x in b.rx[0].read_rx_frames()]
    assert got == sent
    assert a.vring(1).stats.packets == 80 and b.vring(0).stats.packets == 80
    # Both sides agree on where the ring stands, wrap counter included.
    for g, q, index in ((a, a.tx[0], 1), (b, b.rx[0], 0)):
        pk = g.vring(index).pk
        assert (pk.avail_idx, pk.avail_wrap) == (q.next_avail, q.avail_wrap)
        assert (pk.used_idx, pk.used_wrap) == (q.next_used, q.used_wrap)
        assert lib.vs_vring_base(ffi.addressof(g.dev.vrings, index)) == q.vring_base


def used_slots(q) -> list[int]:
    """Ring slots whose descriptor the device has marked used in this lap."""
    out = []
    for slot in range(q.size):
        flags = q.read_desc(slot)[3]
        if bool(flags & VIRTQ_DESC_F_AVAIL) == bool(flags & VIRTQ_DESC_F_USED) == bool(q.used_wrap):
            out.append(slot)
    return out


@pytest.mark.parametrize("in_order", [False, True])
def test_in_order_returns_a_tx_burst_as_one_used_entry(make_rig, in_order):
    rig, a, b = two_guests(make_rig, features=PACKED | (F_IN_ORDER if in_order else 0))
    b.rx[0].post_rx(8)
    ids = [a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60), segments=1 + i % 2) for i in range(4)]
    rig.poll()
    # Chains of 1, 2, 1, 2 slots: slots 0, 1, 3, 4 are the chains' first slots.
    assert used_slots(a.tx[0]) == ([0] if in_order else [0, 1, 3, 4])
    assert [i for i, _ in a.tx[0].get_used()] == ids
    # Received buffers keep one entry each, for their lengths.
    assert len(used_slots(b.rx[0])) == 4 and len(b.rx[0].read_rx_frames()) == 4


def test_a_burst_appears_to_the_driver_at_once(make_rig):
    """The first used entry's flags are written last: with it still unused,
    the driver sees none of the burst."""
    rig, a, b = two_guests(make_rig)
    b.rx[0].post_rx(4)
    for i in range(3):
        a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60))
    rig.poll()
    assert len(used_slots(b.rx[0])) == 3
    # The PMD's burst is published as one: three entries, notified once.
    assert b.vring(0).stats.bursts == 1


# --- The receive buffer's virtio-net header -----------------------------------------

def rx_buffer_across_a_page(g: Guest, header: bytes) -> tuple[int, int]:
    """Posts one receive buffer whose virtio-net header ends a page and whose
    frame starts the next; returns (the buffer's address, the header page's
    address)."""
    mem, hdr_len = g.mem, g.dev.hdr_len
    page = mem.alloc(3 * PAGE, PAGE)
    buf = page + PAGE - hdr_len
    mem.write(buf, header)
    real_alloc = mem.alloc
    mem.alloc = lambda length, align=16: buf  # post_rx's one piece
    try:
        g.rx[0].post_rx(1)
    finally:
        mem.alloc = real_alloc
    return buf, page


def expected_header(hdr_len: int) -> bytes:
    """No offload, one buffer: what the device writes in front of a frame."""
    return bytes(10) + (b"\x01\x00" if hdr_len == 12 else b"")


@pytest.mark.parametrize("features", [PACKED, PACKED & ~F_MRG, F_V1 | F_MRG, F_V1, F_MRG, 0],
                         ids=["packed", "packed-no-mrg", "split", "split-no-mrg", "legacy-mrg", "legacy"])
@in_child()
def test_a_header_that_already_holds_the_values_is_not_written(make_rig, features):
    """The driver reads the header's cache line back (num_buffers on receive,
    its own header fields when it sends the buffer on): writing the same
    values again would pull the line into our core on every frame and make
    the driver miss on it (README "Throughput per virtio path").  The header's
    page is read-only here, so a write would kill the child."""
    rig, a, b = two_guests(make_rig, features=features)
    hdr_len = b.dev.hdr_len
    buf, page = rx_buffer_across_a_page(b, expected_header(hdr_len))
    host = ctypes.addressof(ctypes.c_char.from_buffer(b.mem.mm)) + (page - b.mem.gpa_base)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(host), PAGE, mmap.PROT_READ) == 0, os.strerror(ctypes.get_errno())
    f = frame(mac(2), mac(1), bytes(range(100)))
    a.tx[0].post_tx(f)
    assert rig.poll() == 1
    assert b.mem.read(buf, hdr_len + len(f)) == expected_header(hdr_len) + f
    assert b.vring(0).stats.packets == 1


@pytest.mark.parametrize("features", [PACKED, PACKED & ~F_MRG, F_V1 | F_MRG, F_V1 & ~F_MRG],
                         ids=["packed", "packed-no-mrg", "split", "split-no-mrg"])
def test_a_header_with_other_values_is_rewritten(make_rig, features):
    rig, a, b = two_guests(make_rig, features=features)
    hdr_len = b.dev.hdr_len
    buf, _page = rx_buffer_across_a_page(b, bytes([0xa5]) * hdr_len)
    f = frame(mac(2), mac(1), bytes(range(100)))
    a.tx[0].post_tx(f)
    assert rig.poll() == 1
    assert b.mem.read(buf, hdr_len + len(f)) == expected_header(hdr_len) + f


# --- Event suppression -------------------------------------------------------------

def test_driver_event_enable_and_disable(make_rig):
    rig, a, b = two_guests(make_rig, features=PACKED & ~F_EVENT_IDX)
    b.add_callfd(0)
    b.rx[0].post_rx(16)
    for i in range(3):
        a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60))
    rig.poll()
    assert b.interrupts(0) == 1          # one per burst
    b.rx[0].set_driver_event(VIRTQ_EVENT_F_DISABLE)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"quiet" * 20))
    rig.poll()
    assert b.interrupts(0) == 0
    b.rx[0].set_driver_event(VIRTQ_EVENT_F_ENABLE)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"loud" * 20))
    rig.poll()
    assert b.interrupts(0) == 1


def test_driver_event_desc_without_event_idx_counts_as_enabled(make_rig):
    rig, a, b = two_guests(make_rig, features=PACKED & ~F_EVENT_IDX)
    b.add_callfd(0)
    b.rx[0].post_rx(4)
    b.rx[0].set_driver_event(VIRTQ_EVENT_F_DESC, 100, 1)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"x" * 60))
    rig.poll()
    assert b.interrupts(0) == 1


def test_driver_event_desc_notifies_only_past_the_offset(make_rig):
    """EVENT_IDX: the driver asks to be interrupted once the used entry at
    (offset, wrap) is written, here in the ring's second lap."""
    rig, a, b = two_guests(make_rig, ring_size=8)
    b.add_callfd(0)
    q = b.rx[0]

    def send(n):
        q.post_rx(n)
        for i in range(n):
            a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60))
        rig.poll()
        q.read_rx_frames()
        a.tx[0].get_used()
        return b.interrupts(0)

    assert send(3) == 1                  # the first publication always notifies
    q.set_driver_event(VIRTQ_EVENT_F_DESC, 2, 0)   # slot 2 of the second lap (wrap 0)
    assert send(3) == 0                  # used entries 3..5 of lap one
    assert send(3) == 0                  # 6, 7, then 0, 1 of lap two: not yet slot 2
    assert send(2) == 1                  # 1 .. 3 of lap two: slot 2 written
    assert send(2) == 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_device_event_asks_for_kicks_only_while_idle(make_rig, event_idx):
    rig, a, b = two_guests(make_rig, features=PACKED if event_idx else PACKED & ~F_EVENT_IDX, ring_size=8)
    b.rx[0].post_rx(8)
    for i in range(5):
        a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60))
    rig.poll()
    vr = ffi.addressof(a.dev.vrings, 1)
    assert a.tx[0].device_event[0] == VIRTQ_EVENT_F_DISABLE
    assert not lib.vs_vring_has_avail(vr)
    lib.vs_vring_enable_notify(a.dev, vr, 1)
    flags, off_wrap = a.tx[0].device_event
    if event_idx:
        assert (flags, off_wrap) == (VIRTQ_EVENT_F_DESC, 5 | 1 << 15)
    else:
        assert flags == VIRTQ_EVENT_F_ENABLE
    a.tx[0].post_tx(frame(mac(2), mac(1), b"wake" * 20))
    assert lib.vs_vring_has_avail(vr)
    lib.vs_vring_enable_notify(a.dev, vr, 0)
    assert a.tx[0].device_event[0] == VIRTQ_EVENT_F_DISABLE


# --- Vring base ---------------------------------------------------------------------

def test_vring_base_carries_the_wrap_counter_and_a_restart_resumes(make_rig):
    rig, a, b = two_guests(make_rig, ring_size=8)
    for i in range(11):
        b.rx[0].post_rx(1)
        a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60))
        rig.poll()
        a.tx[0].get_used()
        b.rx[0].read_rx_frames()
    tx = ffi.addressof(a.dev.vrings, 1)
    base = lib.vs_vring_base(tx)
    assert base == 3 | 3 << 16           # slot 3, second lap: wrap counter 0, the used side the same
    # A halt and a restart from that base (what GET_VRING_BASE, then SET_VRING_BASE do).
    lib.vs_vring_set_enabled(tx, 0)
    q = a.tx[0]
    assert lib.vs_vring_setup(a.dev, 1, 8, q.desc_uva, q.avail_uva, q.used_uva, base) == 0
    lib.vs_vring_set_enabled(tx, 1)
    b.rx[0].post_rx(1)
    f = frame(mac(2), mac(1), b"resumed" * 10)
    a.tx[0].post_tx(f)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == [f]
    assert lib.vs_vring_base(tx) == 4 | 4 << 16 and a.vring(1).resumed_from_used == 0


@pytest.mark.parametrize("low_half_only", [False, True])
def test_a_base_with_the_used_side_behind_resumes_from_it(make_rig, low_half_only):
    """A back-end that died with two frames taken and not returned: QEMU
    sends its used position in the high half, and the ring resumes there
    (the frames are sent again), as split rings resume from the used index.
    Without a high half (DPDK's form) the used side is taken to be where
    the avail side is."""
    rig, a, b = two_guests(make_rig, ring_size=8)
    q = a.tx[0]
    sent = [frame(mac(2), mac(1), bytes([i]) * 60) for i in range(3)]
    for f in sent:
        q.post_tx(f)
    # As if a previous back-end had taken the first two: avail at slot 2, used still at 0.
    base = (2 | 1 << 15) | (0 | 1 << 15) << 16
    if low_half_only:
        base = 0 | 1 << 15             # virtio-user: the start (it resets its rings)
    tx = ffi.addressof(a.dev.vrings, 1)
    lib.vs_vring_set_enabled(tx, 0)
    assert lib.vs_vring_setup(a.dev, 1, 8, q.desc_uva, q.avail_uva, q.used_uva, base) == 0
    lib.vs_vring_set_enabled(tx, 1)
    b.rx[0].post_rx(4)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == sent
    assert a.vring(1).resumed_from_used == (0 if low_half_only else 1)


def test_vring_base_past_the_ring_is_refused(make_rig):
    rig, a, b = two_guests(make_rig, ring_size=8)
    q = a.tx[0]
    for base in (PACKED_START_BASE | 8, PACKED_START_BASE | (PACKED_START_BASE | 9) << 16):
        rc = lib.vs_vring_setup(a.dev, 1, 8, q.desc_uva, q.avail_uva, q.used_uva, base)
        assert rc == lib.VS_VQ_ERR_BASE


# --- Hostile guests -----------------------------------------------------------------

def errors(g, index, reason):
    return g.vring(index).error_count[reason]


def assert_still_forwards(rig, a, b):
    b.rx[0].post_rx(2)
    f = frame(mac(2), mac(1), b"after")
    a.tx[0].post_tx(f)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == [f]


def good_buffer(g, payload: bytes = b"") -> tuple[int, int]:
    data = g.tx[0].net_header() + frame(mac(2), mac(1), payload or b"p" * 40)
    gpa = g.mem.alloc(len(data))
    g.mem.write(gpa, data)
    return gpa, len(data)


BAD_ID = 7  # a buffer id the driver's own allocator does not use in these tests


@pytest.mark.parametrize("case, reason", [
    ("outside", lib.VS_VQ_ERR_ADDR),
    ("past_region_end", lib.VS_VQ_ERR_ADDR),
    ("bad_id", lib.VS_VQ_ERR_BAD_ID),
    ("zero_length", lib.VS_VQ_ERR_SHORT_HEADER),
    ("runt", lib.VS_VQ_ERR_NO_READABLE),
    ("too_long", lib.VS_VQ_ERR_TOO_LONG),
    ("too_many_segs", lib.VS_VQ_ERR_TOO_MANY_SEGS),
    ("writable_in_tx", lib.VS_VQ_ERR_WRITE_IN_TX),
    ("nested_indirect", lib.VS_VQ_ERR_NESTED_INDIRECT),
    ("indirect_len", lib.VS_VQ_ERR_INDIRECT_LEN),
    ("indirect_empty", lib.VS_VQ_ERR_INDIRECT_LEN),
    ("indirect_too_long", lib.VS_VQ_ERR_INDIRECT_LEN),
    ("indirect_outside", lib.VS_VQ_ERR_ADDR),
    ("indirect_with_next", lib.VS_VQ_ERR_INDIRECT_CHAINED),
    ("indirect_after_buffer", lib.VS_VQ_ERR_INDIRECT_CHAINED),
    ("wrong_wrap_mid_chain", lib.VS_VQ_ERR_WRAP),
])
@in_child()
def test_bad_tx_chain_is_dropped_counted_and_returned(make_rig, case, reason):
    rig, a, b = two_guests(make_rig, ring_size=128)
    gpa, length = good_buffer(a)
    mem_end = a.mem.gpa_base + a.mem.size
    q = a.tx[0]
    ident = 100 if case != "bad_id" else 128 + BAD_ID
    chain = {
        "outside": [(0xdead0000000, 64, ident, 0)],
        "past_region_end": [(mem_end - 32, 64, ident, 0)],
        "bad_id": [(gpa, length, ident, 0)],
        "zero_length": [(gpa, 0, ident, 0)],
        "runt": [(gpa, 12 + 10, ident, 0)],
        "too_long": [(a.mem.gpa_base, 70000, ident, 0)],
        "too_many_segs": [(gpa + i, 1, ident, VIRTQ_DESC_F_NEXT if i < 79 else 0) for i in range(80)],
        "writable_in_tx": [(gpa, length, ident, VIRTQ_DESC_F_WRITE)],
        "nested_indirect": [(q.write_indirect_table([(q.write_indirect_table([(gpa, length, 0, 0)]), 16, 0,
                                                      VIRTQ_DESC_F_INDIRECT)]), 16, ident, VIRTQ_DESC_F_INDIRECT)],
        "indirect_len": [(q.write_indirect_table([(gpa, length, 0, 0)]), 17, ident, VIRTQ_DESC_F_INDIRECT)],
        "indirect_empty": [(q.write_indirect_table([]), 0, ident, VIRTQ_DESC_F_INDIRECT)],
        "indirect_too_long": [(a.mem.gpa_base, 16 * 1024, ident, VIRTQ_DESC_F_INDIRECT)],
        "indirect_outside": [(mem_end - 16, 32, ident, VIRTQ_DESC_F_INDIRECT)],
        "indirect_with_next": [(q.write_indirect_table([(gpa, length, 0, 0)]), 16, ident,
                                VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT), (gpa, length, ident, 0)],
        "indirect_after_buffer": [(gpa, 12, ident, VIRTQ_DESC_F_NEXT),
                                  (q.write_indirect_table([(gpa + 12, length - 12, 0, 0)]), 16, ident,
                                   VIRTQ_DESC_F_INDIRECT)],
    }.get(case)
    if case == "wrong_wrap_mid_chain":
        # The chain's second descriptor carries last lap's flags: the device
        # stops there, returns the first, and the second is not consumed.
        q.publish_raw([(gpa, 12, ident, VIRTQ_DESC_F_NEXT)])
        q.write_desc(q.next_avail, gpa + 12, length - 12, ident, q.avail_flags(q.avail_wrap ^ 1))
        rig.poll()
        assert errors(a, 1, reason) == 1
        assert a.vring(1).pk.avail_idx == 1 and a.vring(1).pk.used_idx == 1
        assert q._used_entry() == (ident, 0)
        q.next_used = 1
        assert_still_forwards(rig, a, b)   # the driver's next chain takes slot 1 properly
        return
    q.publish_raw(chain)
    rig.poll()
    assert errors(a, 1, reason) == 1, ffi.string(lib.vs_vq_error_name(a.vring(1).last_error))
    assert a.vring(1).stats.errors == 1 and a.vring(1).last_error == reason
    assert not a.vring(1).broken
    # The bad chain comes back with length 0 and its own id, past all its descriptors.
    assert q._used_entry() == (ident, 0)
    assert a.vring(1).pk.used_idx == len(chain)
    q.next_used = len(chain)
    assert b.vring(0).stats.packets == 0
    assert_still_forwards(rig, a, b)


@in_child()
def test_a_chain_that_never_ends_takes_the_ring_once_and_the_ring_goes_on(make_rig):
    rig, a, b = two_guests(make_rig, ring_size=16)
    gpa, length = good_buffer(a)
    q = a.tx[0]
    q.publish_raw([(gpa, 1, 100, VIRTQ_DESC_F_NEXT)] * 16)   # every slot, all F_NEXT
    rig.poll()
    assert errors(a, 1, lib.VS_VQ_ERR_LOOP) == 1
    pk = a.vring(1).pk
    assert (pk.avail_idx, pk.avail_wrap, pk.used_idx, pk.used_wrap) == (0, 0, 0, 0)
    assert q._used_entry() == (100, 0)
    q.next_used, q.used_wrap, q.free_slots = 0, 0, 16
    assert_still_forwards(rig, a, b)


@in_child()
def test_descriptors_with_the_wrong_wrap_counter_are_not_taken(make_rig):
    """A head marked available for the other lap (or with AVAIL == USED) is
    not available: nothing is consumed until the driver marks it right."""
    rig, a, b = two_guests(make_rig, ring_size=8)
    b.rx[0].post_rx(4)
    q = a.tx[0]
    gpa, length = good_buffer(a, b"late" * 10)
    for flags in (q.avail_flags(0), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, 0):
        q.write_desc(0, gpa, length, 3, flags)
        rig.poll()
        assert a.vring(1).pk.avail_idx == 0 and a.vring(1).stats.packets == 0
    q.write_desc(0, gpa, length, 3, q.avail_flags(1))
    rig.poll()
    assert a.vring(1).stats.packets == 1 and a.vring(1).stats.errors == 0
    assert len(b.rx[0].read_rx_frames()) == 1
    pk = a.vring(1).pk
    assert (pk.avail_idx, pk.avail_wrap) == (1, 1)


@in_child()
def test_stale_descriptors_after_a_wrap_are_not_taken_again(make_rig):
    rig, a, b = two_guests(make_rig, ring_size=4)
    for i in range(4):
        b.rx[0].post_rx(1)
        a.tx[0].post_tx(frame(mac(2), mac(1), bytes([i]) * 60))
        rig.poll()
        a.tx[0].get_used()
        b.rx[0].read_rx_frames()
    # The ring has wrapped; its slots still hold lap one's descriptors.
    rig.poll(3)
    assert a.vring(1).stats.packets == 4 and b.vring(0).stats.packets == 4


@pytest.mark.parametrize("case, reason", [
    ("read_only", lib.VS_VQ_ERR_NO_WRITABLE),
    ("outside", lib.VS_VQ_ERR_ADDR),
    ("bad_id", lib.VS_VQ_ERR_BAD_ID),
    ("nested_indirect", lib.VS_VQ_ERR_NESTED_INDIRECT),
])
@in_child()
def test_bad_rx_chain_is_counted_and_skipped(make_rig, case, reason):
    rig, a, b = two_guests(make_rig, ring_size=64)
    q = b.rx[0]
    buf = b.mem.alloc(2048)
    desc = {
        "read_only": (buf, 2048, 9, 0),
        "outside": (0xdead0000000, 2048, 9, VIRTQ_DESC_F_WRITE),
        "bad_id": (buf, 2048, 64 + 9, VIRTQ_DESC_F_WRITE),
        "nested_indirect": (q.write_indirect_table([(buf, 2048, 0, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)]),
                            16, 9, VIRTQ_DESC_F_INDIRECT),
    }[case]
    q.publish_raw([desc])
    q.post_rx(2)
    lost, f = frame(mac(2), mac(1), b"lost" * 20), frame(mac(2), mac(1), b"next" * 20)
    a.tx[0].post_tx(lost)
    a.tx[0].post_tx(f)
    rig.poll()
    assert errors(b, 0, reason) == 1
    # The bad chain comes back empty with its own id; the frame it was meant for is dropped.
    assert q._used_entry() == (desc[2], 0)
    q.next_used = 1
    assert [x.data for x in q.read_rx_frames()] == [f]
    assert b.vring(0).stats.dropped == 1 and b.vring(0).stats.packets == 1


@pytest.mark.parametrize("seed", range(4))
@in_child()
def test_random_descriptors_never_crash(make_rig, seed):
    """Random descriptors with random flags, ids and lengths in both rings:
    the engine refuses what it must and keeps its indexes inside the ring."""
    import random
    rnd = random.Random(seed)
    rig, a, b = two_guests(make_rig, ring_size=16)
    base = a.mem.gpa_base
    for _round in range(200):
        for g, q in ((a, a.tx[0]), (b, b.rx[0])):
            slot = rnd.randrange(16)
            flags = rnd.choice([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT]) | \
                rnd.choice([VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED])
            addr = rnd.choice([base + rnd.randrange(a.mem.size), rnd.getrandbits(64), base])
            q.write_desc(slot, addr, rnd.choice([0, 16, 60, 1500, 70000, rnd.getrandbits(32)]),
                         rnd.getrandbits(16), flags)
        rig.poll()
    for g, index in ((a, 1), (b, 0)):
        pk = g.vring(index).pk
        assert pk.avail_idx < 16 and pk.used_idx < 16 and not g.vring(index).broken


# --- Four descriptors at a time ------------------------------------------------------
#
# Both directions take a line of four one-descriptor chains at once.  Whatever
# a line holds, the outcome must be the one-by-one path's: the frames in ring
# order, each refused chain counted and returned in its place.

def line_frames(n: int) -> list[bytes]:
    return [frame(mac(2), mac(1), bytes([i]) * (46 + i)) for i in range(n)]


@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("ring_size", [4, 8, 256])
def test_lines_of_four_go_through_in_order_and_wrap(make_rig, ring_size, in_order):
    """Full lines both ways, many laps of small rings: the ring of 4 is one line."""
    rig, a, b = two_guests(make_rig, ring_size=ring_size, features=PACKED | (F_IN_ORDER if in_order else 0))
    sent, got = [], []
    for lap in range(12):
        b.rx[0].post_rx(4)
        frames = [frame(mac(2), mac(1), bytes([lap, k]) * (30 + lap)) for k in range(4)]
        ids = [a.tx[0].post_tx(f) for f in frames]
        sent += frames
        assert rig.poll() == 4
        assert [i for i, _ in a.tx[0].get_used()] == ids
        rx = b.rx[0].read_rx_frames()
        assert [x.num_buffers for x in rx] == [1] * 4
        got += [x.data for x in rx]
    assert got == sent
    for g, q, index in ((a, a.tx[0], 1), (b, b.rx[0], 0)):
        pk = g.vring(index).pk
        assert (pk.avail_idx, pk.avail_wrap) == (q.next_avail, q.avail_wrap)
        assert (pk.used_idx, pk.used_wrap) == (q.next_used, q.used_wrap)


def test_a_line_of_receive_buffers_gets_each_its_own_used_entry_and_length(make_rig):
    rig, a, b = two_guests(make_rig)
    ids = b.rx[0].post_rx(4)
    frames = line_frames(4)
    for f in frames:
        a.tx[0].post_tx(f)
    rig.poll()
    assert used_slots(b.rx[0]) == [0, 1, 2, 3]
    entries = [b.rx[0].read_desc(slot)[1:3] for slot in range(4)]
    assert entries == [(12 + len(f), i) for f, i in zip(frames, ids)]
    assert [x.data for x in b.rx[0].read_rx_frames()] == frames
    assert b.vring(0).stats.bursts == 1 and b.vring(0).stats.bytes == sum(map(len, frames))


TX_LINE_CASES = {
    # case: the reason counted, or None for a good chain the batch leaves to the one-by-one path
    "bad_id": lib.VS_VQ_ERR_BAD_ID,
    "runt": lib.VS_VQ_ERR_NO_READABLE,
    "too_long": lib.VS_VQ_ERR_TOO_LONG,
    "outside": lib.VS_VQ_ERR_ADDR,
    "writable": lib.VS_VQ_ERR_WRITE_IN_TX,
    "chained": None,
    "indirect": None,
}


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("case", sorted(TX_LINE_CASES))
@in_child()
def test_an_odd_tx_chain_inside_a_line_is_handled_as_alone(make_rig, case, position):
    rig, a, b = two_guests(make_rig, ring_size=128)
    b.rx[0].post_rx(8)
    q = a.tx[0]
    frames = line_frames(8)
    expected_used, delivered = [], []
    for k, f in enumerate(frames):
        if k != position:
            expected_used.append((q.post_tx(f), 0))
            delivered.append(f)
            continue
        if case == "chained":
            expected_used.append((q.post_tx(f, segments=2), 0))
            delivered.append(f)
            continue
        if case == "indirect":
            expected_used.append((q.post_tx(f, indirect=True), 0))
            delivered.append(f)
            continue
        gpa, length = good_buffer(a)
        ident = 128 + BAD_ID if case == "bad_id" else 100
        q.publish_raw([{
            "bad_id": (gpa, length, ident, 0),
            "runt": (gpa, 12 + 10, ident, 0),
            "too_long": (a.mem.gpa_base, 70000, ident, 0),
            "outside": (0xdead0000000, 64, ident, 0),
            "writable": (gpa, length, ident, VIRTQ_DESC_F_WRITE),
        }[case]])
        expected_used.append((ident, 0))
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == delivered
    assert q.get_used() == expected_used
    reason = TX_LINE_CASES[case]
    assert a.vring(1).stats.errors == (reason is not None)
    if reason is not None:
        assert errors(a, 1, reason) == 1
    assert a.vring(1).stats.packets == len(delivered)
    assert a.vring(1).pk.used_idx == 8 + (case == "chained")


@pytest.mark.parametrize("position", range(4))
@in_child()
def test_an_odd_tx_chain_inside_a_line_in_order_goes_back_in_the_batch(make_rig, position):
    """With IN_ORDER the refused chain is returned inside the burst's one used
    entry, which names the burst's last buffer."""
    rig, a, b = two_guests(make_rig, ring_size=128, features=PACKED | F_IN_ORDER)
    b.rx[0].post_rx(8)
    q = a.tx[0]
    delivered, last = [], None
    for k, f in enumerate(line_frames(8)):
        if k == position:
            gpa, length = good_buffer(a)
            q.publish_raw([(gpa, length, 128 + BAD_ID, 0)])
            continue
        last = q.post_tx(f)
        delivered.append(f)
    rig.poll()
    assert [x.data for x in b.rx[0].read_rx_frames()] == delivered
    assert errors(a, 1, lib.VS_VQ_ERR_BAD_ID) == 1
    assert used_slots(q) == [0] and q._used_entry() == (last, 0)
    assert a.vring(1).pk.used_idx == 8


@pytest.mark.parametrize("position", range(4))
@in_child()
def test_a_line_not_all_available_is_taken_up_to_the_gap(make_rig, position):
    """One slot of the line still carries last lap's flags: the device takes
    the chains before it, and the rest once the driver makes it available."""
    rig, a, b = two_guests(make_rig, ring_size=128)
    b.rx[0].post_rx(8)
    q = a.tx[0]
    frames = line_frames(8)
    gpa, length = good_buffer(a, b"late" * 12)
    for k, f in enumerate(frames):
        if k == position:
            q.publish_raw([(gpa, length, 100, 0)], wrap=q.avail_wrap ^ 1)
        else:
            q.post_tx(f)
    rig.poll()
    assert a.vring(1).pk.avail_idx == position
    assert [x.data for x in b.rx[0].read_rx_frames()] == frames[:position]
    q.write_desc(position, gpa, length, 100, q.avail_flags())
    rig.poll()
    late = frame(mac(2), mac(1), b"late" * 12)
    assert [x.data for x in b.rx[0].read_rx_frames()] == [late] + frames[position + 1:]
    assert a.vring(1).stats.errors == 0 and a.vring(1).pk.avail_idx == 8


RX_LINE_CASES = {
    "read_only": lib.VS_VQ_ERR_NO_WRITABLE,
    "outside": lib.VS_VQ_ERR_ADDR,
    "bad_id": lib.VS_VQ_ERR_BAD_ID,
    "small": None,      # with mergeable buffers the frame takes this one and the next
    "chained": None,
}


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("case", sorted(RX_LINE_CASES))
@in_child()
def test_an_odd_rx_buffer_inside_a_line_is_handled_as_alone(make_rig, case, position):
    rig, a, b = two_guests(make_rig, ring_size=64)
    q = b.rx[0]
    for k in range(9):
        if k != position:
            q.post_rx(1)
        elif case == "small":
            q.post_rx(1, size=32)
        elif case == "chained":
            q.post_rx(1, segments=2)
        else:
            buf = b.mem.alloc(2048)
            q.publish_raw([{
                "read_only": (buf, 2048, 9, 0),
                "outside": (0xdead0000000, 2048, 9, VIRTQ_DESC_F_WRITE),
                "bad_id": (buf, 2048, 64 + 9, VIRTQ_DESC_F_WRITE),
            }[case]])
    frames = line_frames(8)
    for f in frames:
        a.tx[0].post_tx(f)
    rig.poll()
    got = q.read_rx_frames()
    reason = RX_LINE_CASES[case]
    if reason is None:
        assert [x.data for x in got] == frames
        assert [x.num_buffers for x in got] == [2 if (k == position and case == "small") else 1 for k in range(8)]
        assert b.vring(0).stats.errors == 0
        return
    # The bad buffer comes back empty in its place; the frame it was meant for is dropped.
    assert [x.data for x in got if x.data] == frames[:position] + frames[position + 1:]
    assert [x.heads for x in got if not x.data] == [[9 if case != "bad_id" else 64 + 9]]
    assert errors(b, 0, reason) == 1
    assert b.vring(0).stats.dropped == 1 and b.vring(0).stats.packets == 7


# --- Over vhost-user ------------------------------------------------------------------

from tests.support.frames import BROADCAST, wait_for  # noqa: E402
from tests.support.frontend import BackendClosed, DRIVER_FEATURES, RequestFailed, VhostUserFrontend  # noqa: E402
from tests.unit.test_vhost_protocol import frontends, loop_thread, make_harness, server  # noqa: E402,F401
from vswitch.vhost import protocol  # noqa: E402
from vswitch.vhost.protocol import Request  # noqa: E402


def test_packed_is_offered():
    assert protocol.OFFERED_FEATURES & F_PACKED


def test_get_and_set_vring_base_carry_the_wrap_counter(server, frontends):
    fe = frontends(server.path, features=DRIVER_FEATURES | F_PACKED, ring_size=8).connect()
    fe.handshake()
    fe.sync()
    vr = server.dev.vrings + 1
    assert vr.packed == 1 and server.dev.vrings[0].packed == 1
    assert lib.vs_vring_base(vr) == PACKED_START_BASE | PACKED_START_BASE << 16
    tx = fe.tx_ring(0)
    pkts = ffi.new("struct vs_pkt[32]")
    for n in range(11):                  # a lap and three slots: wrap counter 0
        tx.post_tx(bytes([n]) * 60)
        got = lib.vs_packed_dequeue_burst(server.dev, vr, pkts, 32)
        lib.vs_packed_dequeue_done(server.dev, vr, pkts, got)
        assert got == 1 and len(tx.get_used()) == 1
    assert fe.get_vring_base(1) == 3 | 3 << 16
    assert fe.get_vring_base(0) == PACKED_START_BASE | PACKED_START_BASE << 16
    assert not lib.vs_vring_is_enabled(vr)
    # The front-end restarts the ring from there; the engine takes the next frame.
    fe.request(Request.SET_VRING_BASE, protocol.pack_vring_state(1, tx.vring_base))
    fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(1, tx.desc_uva, tx.used_uva, tx.avail_uva))
    fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(1), [fe.kickfds[1]])
    fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(1, nofd=True))
    fe.set_vring_enable(1, True)
    assert lib.vs_vring_is_enabled(vr) and lib.vs_vring_base(vr) == 3 | 3 << 16
    assert vr.resumed_from_used == 0
    tx.post_tx(b"z" * 60)
    assert lib.vs_packed_dequeue_burst(server.dev, vr, pkts, 32) == 1
    assert server.info()["rings"][1]["layout"] == "packed"


def test_a_base_past_the_ring_is_refused(server, frontends):
    fe = frontends(server.path, features=DRIVER_FEATURES | F_PACKED, ring_size=8).connect()
    fe.handshake(stop_before=Request.SET_VRING_ENABLE)
    fe.request(Request.SET_VRING_BASE, protocol.pack_vring_state(1, PACKED_START_BASE | 9))
    with pytest.raises((RequestFailed, BackendClosed)):
        fe.set_vring_enable(1, True)
        fe.sync()
    assert server.protocol_errors == 1
    assert not lib.vs_vring_is_enabled(server.dev.vrings + 1)


@pytest.mark.parametrize("layouts", [("packed", "packed"), ("packed", "split"), ("split", "packed"),
                                     ("packed+in_order", "packed+in_order")])
def test_guests_switch_through_vswitchd(tmp_path, layouts):
    """Broadcast and unicast both ways between front-ends of either layout,
    mergeable buffers, chains and indirect tables included."""
    from tests.support.daemon import Vswitchd
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports) as d:
        guests = []
        for i, layout in enumerate(layouts):
            features = DRIVER_FEATURES | (F_PACKED if "packed" in layout else 0) | \
                (F_IN_ORDER if "in_order" in layout else 0)
            fe = VhostUserFrontend(tmp_path / f"vm{i}.sock", features=features, ring_size=256).connect()
            fe.handshake()
            assert bool(fe.features & F_PACKED) == ("packed" in layout)
            fe.post_rx(0, 200, size=1024)
            guests.append(fe)
        wait_for(lambda: all(d.port(f"vm{i}")["link"] == "up" for i in range(2)), what="links up")
        for src, dst in ((0, 1), (1, 0)):
            big = frame(BROADCAST, mac(src + 1), os.urandom(1400))   # two 1 KiB buffers with MRG_RXBUF
            sent = [big] + [frame(BROADCAST if k % 2 else mac(dst + 1), mac(src + 1), bytes([k]) * 50)
                            for k in range(150)]
            guests[src].send_frame(0, big, indirect=True, segments=3)
            for k, f in enumerate(sent[1:]):
                guests[src].send_frame(0, f, segments=1 + k % 3)
                if k % 20 == 19:
                    guests[src].wait_tx_done(0)
            guests[src].wait_tx_done(0)
            got = guests[dst].receive(0, len(sent), timeout=5)
            assert [g.data for g in got] == sent
        stats = {f"vm{i}": d.port(f"vm{i}")["stats"] for i in range(2)}
        for name, counters in stats.items():
            assert (counters["rx_packets"], counters["tx_packets"]) == (151, 151), (name, counters)
            assert counters["rx_errors"] == counters["tx_dropped"] == 0, (name, counters)
        for fe in guests:
            fe.close()


def test_reset_owner_forgets_the_layout_on_the_c_side_too(server, frontends):
    """Found by the vhost-user fuzzer: after RESET_OWNER the device's features
    are forgotten in Python but were kept in C, so rings of a new session
    that never sent SET_FEATURES started packed."""
    fe = frontends(server.path, features=DRIVER_FEATURES | F_PACKED).connect()
    fe.handshake()
    fe.sync()
    assert server.dev.features & F_PACKED
    fe.request(Request.RESET_OWNER)
    fe.sync()
    assert server.dev.features == 0 and server.dev.hdr_len == 10
