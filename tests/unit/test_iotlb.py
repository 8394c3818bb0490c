"""The IOTLB (vswitch/vhost/iotlb.[ch]) and the ring engines behind it.

The table is driven through its C functions; the ring engines through the
mock guests of test_ring_engine.py (split and packed rings, one PMD pass at
a time), with an IOTLB attached to a guest's device.  The mock driver writes
guest-physical addresses into its descriptors, so an identity mapping
(IOVA = guest-physical) lets it run unchanged; tests that need IOVAs to land
elsewhere map pages by hand.
"""

from __future__ import annotations

import os

import pytest

from tests.support.frames import frame, mac
from tests.unit.test_ring_engine import DEFAULT_FEATURES, Guest, make_rig  # noqa: F401 (fixture)
from tests.support.virtio_driver import GuestMemory, memtable_for
from vswitch.native import ffi, lib

RO, WO, RW = lib.VS_IOTLB_ACCESS_RO, lib.VS_IOTLB_ACCESS_WO, lib.VS_IOTLB_ACCESS_RW
F_PACKED = (1 << lib.VIRTIO_F_RING_PACKED) | (1 << lib.VIRTIO_F_IN_ORDER)
PAGE = 4096


def new_iotlb():
    tlb = ffi.new("struct vs_iotlb *")
    lib.vs_iotlb_init(tlb)
    return tlb


def attach(g: Guest):
    tlb = new_iotlb()
    g.keep.append(tlb)
    g.dev.iotlb = tlb
    return tlb


def update(tlb, mem, iova, size, uva, perm=RW):
    return lib.vs_iotlb_update(tlb, mem, iova, size, uva, perm)


def map_identity(g: Guest, tlb, perm=RW):
    assert update(tlb, g.dev.mem, g.mem.gpa_base, g.mem.size, g.mem.uva_base, perm) == lib.VS_IOTLB_OK


def take_miss(tlb):
    iova, perm = ffi.new("uint64_t *"), ffi.new("uint32_t *")
    return (int(iova[0]), int(perm[0])) if lib.vs_iotlb_take_miss(tlb, iova, perm) else None


def translate(tlb, iova, length, perm):
    missing, missing_perm = ffi.new("uint64_t *"), ffi.new("uint32_t *")
    uva = lib.vs_iotlb_translate_uva(tlb, iova, length, perm, missing, missing_perm)
    return int(uva), int(missing[0]), int(missing_perm[0])


@pytest.fixture
def guest():
    g = Guest(0)
    yield g
    g.close()


# --- the table ----------------------------------------------------------------

@pytest.mark.parametrize("case, err", [
    ("size zero", lib.VS_IOTLB_ERR_SIZE),
    ("iova wraps", lib.VS_IOTLB_ERR_WRAP),
    ("uaddr wraps", lib.VS_IOTLB_ERR_WRAP),
    ("perm none", lib.VS_IOTLB_ERR_PERM),
    ("perm unknown", lib.VS_IOTLB_ERR_PERM),
    ("outside guest memory", lib.VS_IOTLB_ERR_OUTSIDE),
    ("partly outside guest memory", lib.VS_IOTLB_ERR_OUTSIDE),
    ("overlaps", lib.VS_IOTLB_ERR_OVERLAP),
    ("same iova, other uaddr", lib.VS_IOTLB_ERR_OVERLAP),
])
def test_hostile_updates_are_refused_counted_and_change_nothing(guest, case, err):
    tlb = new_iotlb()
    mem, uva = guest.dev.mem, guest.mem.uva_base
    assert update(tlb, mem, 0x10000, 2 * PAGE, uva) == lib.VS_IOTLB_OK
    iova, size, uaddr, perm = {
        "size zero": (0x40000, 0, uva, RW),
        "iova wraps": (2**64 - PAGE, 2 * PAGE, uva, RW),
        "uaddr wraps": (0x40000, 2 * PAGE, 2**64 - PAGE, RW),
        "perm none": (0x40000, PAGE, uva, 0),
        "perm unknown": (0x40000, PAGE, uva, 4),
        "outside guest memory": (0x40000, PAGE, uva + guest.mem.size, RW),
        "partly outside guest memory": (0x40000, 2 * PAGE, uva + guest.mem.size - PAGE, RW),
        "overlaps": (0x10000 + PAGE, 2 * PAGE, uva, RW),
        "same iova, other uaddr": (0x10000, 2 * PAGE, uva + PAGE, RW),
    }[case]
    assert update(tlb, mem, iova, size, uaddr, perm) == err
    assert tlb.refused[err] == 1
    assert tlb.nentries == 1 and tlb.updates == 1
    assert translate(tlb, 0x10000, 2 * PAGE, RW)[0] == uva


def test_a_repeated_update_is_a_harmless_duplicate(guest):
    tlb = new_iotlb()
    uva = guest.mem.uva_base
    assert update(tlb, guest.dev.mem, 0x10000, PAGE, uva) == lib.VS_IOTLB_OK
    assert update(tlb, guest.dev.mem, 0x10000, PAGE, uva) == lib.VS_IOTLB_DUPLICATE
    assert tlb.nentries == 1 and tlb.refused[lib.VS_IOTLB_DUPLICATE] == 1


def test_invalidate_removes_every_entry_it_touches_and_size_zero_means_all(guest):
    tlb = new_iotlb()
    uva = guest.mem.uva_base
    for i in range(4):
        assert update(tlb, guest.dev.mem, 0x10000 + 2 * i * PAGE, PAGE, uva + i * PAGE) == lib.VS_IOTLB_OK
    # Touches the second entry's last byte only: it goes whole.
    assert lib.vs_iotlb_invalidate(tlb, 0x12000 + PAGE - 1, 1) == 1
    assert translate(tlb, 0x12000, 1, RO)[:2] == (0, 0x12000)
    assert translate(tlb, 0x14000, 1, RO)[0] == uva + 2 * PAGE
    assert lib.vs_iotlb_invalidate(tlb, 0x13000, 2**64 - 1) == 2   # wraps: to the end of the IOVA space
    assert tlb.nentries == 1
    assert lib.vs_iotlb_invalidate(tlb, 0, 0) == 1                 # QEMU's "everything"
    assert tlb.nentries == 0


def test_translate_needs_every_byte_mapped_contiguously_with_the_access(guest):
    tlb = new_iotlb()
    uva = guest.mem.uva_base
    mem = guest.dev.mem
    assert update(tlb, mem, 0x10000, PAGE, uva, RO) == 0
    assert update(tlb, mem, 0x11000, PAGE, uva + PAGE, RO) == 0      # contiguous in UVA too
    assert update(tlb, mem, 0x12000, PAGE, uva + 8 * PAGE, RO) == 0  # not contiguous
    assert translate(tlb, 0x10800, PAGE, RO)[0] == uva + 0x800
    assert translate(tlb, 0x10800, PAGE, WO) == (0, 0x10800, 0)      # mapped, but not writable
    assert translate(tlb, 0x11800, PAGE, RO) == (0, 0x12000, 0)      # not contiguous: no miss to send
    assert translate(tlb, 0x12800, PAGE, RO) == (0, 0x13000, RO)     # runs into a gap: a miss


def test_a_full_table_forgets_an_entry_instead_of_refusing(guest):
    tlb = new_iotlb()
    uva = guest.mem.uva_base
    for i in range(lib.VS_IOTLB_MAX_ENTRIES + 1):
        assert update(tlb, guest.dev.mem, i * PAGE, PAGE, uva + (i % 64) * PAGE, RO) == lib.VS_IOTLB_OK
    assert tlb.nentries == lib.VS_IOTLB_MAX_ENTRIES and tlb.evictions == 1
    assert translate(tlb, lib.VS_IOTLB_MAX_ENTRIES * PAGE, 1, RO)[0] != 0


# --- the ring engines ---------------------------------------------------------

def pair(make_rig, features=DEFAULT_FEATURES):
    a, b = Guest(0, features=features), Guest(1, features=features)
    return make_rig(a, b), a, b


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, DEFAULT_FEATURES | F_PACKED], ids=["split", "packed"])
def test_tx_on_a_miss_waits_then_forwards_once_mapped(make_rig, features):
    rig, a, b = pair(make_rig, features)
    tlb = attach(a)
    b.rx[0].post_rx(4)
    f = frame(mac(2), mac(1), os.urandom(300))
    a.tx[0].post_tx(f)
    assert rig.poll(3) == 0
    miss = take_miss(tlb)
    assert miss is not None and a.mem.contains(miss[0]) and miss[1] == RO
    assert take_miss(tlb) is None                     # the same miss is recorded once
    assert a.tx[0].get_used() == [] and a.vring(1).stats.errors == 0   # nothing taken, nothing refused
    map_identity(a, tlb)
    assert rig.poll() == 1
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f
    assert len(a.tx[0].get_used()) == 1


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, DEFAULT_FEATURES | F_PACKED], ids=["split", "packed"])
def test_rx_on_a_miss_keeps_the_buffers_and_asks_for_write_access(make_rig, features):
    rig, a, b = pair(make_rig, features)
    tlb = attach(b)
    b.rx[0].post_rx(4)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"x" * 100))
    rig.poll()
    miss = take_miss(tlb)
    assert miss is not None and miss[1] == WO
    assert b.rx[0].read_rx_frames() == [] and b.vring(0).stats.errors == 0
    map_identity(b, tlb)
    f = frame(mac(2), mac(1), b"y" * 100)
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, DEFAULT_FEATURES | F_PACKED], ids=["split", "packed"])
def test_rx_buffers_mapped_read_only_are_refused(make_rig, features):
    rig, a, b = pair(make_rig, features)
    tlb = attach(b)
    map_identity(b, tlb, RO)
    b.rx[0].post_rx(4)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"x" * 100))
    rig.poll()
    assert b.vring(0).error_count[lib.VS_VQ_ERR_IOTLB_PERM] == 1
    assert tlb.perm_denied >= 1 and b.vring(0).stats.dropped == 1


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, DEFAULT_FEATURES | F_PACKED], ids=["split", "packed"])
def test_an_invalidation_is_honoured_by_the_next_burst(make_rig, features):
    rig, a, b = pair(make_rig, features)
    tlb = attach(a)
    map_identity(a, tlb)
    b.rx[0].post_rx(8)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"1" * 100))
    assert rig.poll() == 1                            # the translation is cached now
    lib.vs_iotlb_invalidate(tlb, a.mem.gpa_base, a.mem.size)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"2" * 100))
    assert rig.poll() == 0
    assert take_miss(tlb) is not None


def test_a_buffer_across_two_entries_is_split_and_each_part_translated(make_rig):
    """IOVA pages P and P+1 map to guest pages far apart: the frame is read from both."""
    rig, a, b = pair(make_rig)
    tlb = attach(a)
    mem = a.mem
    first = mem.alloc(2 * PAGE, PAGE)                 # page P: the buffer's start
    elsewhere = mem.alloc(PAGE, PAGE)                 # where IOVA page P+1 really lives
    assert update(tlb, a.dev.mem, first, PAGE, mem.gpa_to_uva(first), RO) == 0
    assert update(tlb, a.dev.mem, first + PAGE, PAGE, mem.gpa_to_uva(elsewhere), RO) == 0
    f = frame(mac(2), mac(1), os.urandom(400))
    data = bytes(12) + f
    start = first + PAGE - 200                        # 200 bytes in page P, the rest in P+1
    mem.write(start, data[:200])
    mem.write(elsewhere, data[200:])
    mem.write(first + PAGE, b"\xee" * len(data))      # what an untranslated read would see
    b.rx[0].post_rx(4)
    a.tx[0].publish_raw(0)
    a.tx[0].write_desc(0, start, len(data))
    assert rig.poll() == 1
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f


def test_a_buffer_running_past_its_last_entry_is_never_read_past_it(make_rig):
    rig, a, b = pair(make_rig)
    tlb = attach(a)
    buf = a.mem.alloc(2 * PAGE, PAGE)
    assert update(tlb, a.dev.mem, buf, PAGE, a.mem.gpa_to_uva(buf), RO) == 0
    a.tx[0].publish_raw(0)
    a.tx[0].write_desc(0, buf + PAGE - 100, 300)
    assert rig.poll() == 0
    assert take_miss(tlb) == (buf + PAGE, RO)


def test_a_mapping_that_leads_outside_guest_memory_is_refused(make_rig):
    """The memory table shrank under an entry: the buffer is refused, never touched."""
    rig, a, b = pair(make_rig)
    tlb = attach(a)
    map_identity(a, tlb)
    b.rx[0].post_rx(4)
    head = a.tx[0].post_tx(frame(mac(2), mac(1), b"z" * 100))
    desc_addr = a.tx[0].read_desc(head)[0]
    smaller = memtable_for(ffi, [a.mem], a.keep)
    smaller.regions[0].size = desc_addr - a.mem.gpa_base   # the buffer is past the end now
    a.dev.mem = smaller
    lib.vs_iotlb_flush_caches(tlb)
    rig.poll()
    assert a.vring(1).error_count[lib.VS_VQ_ERR_ADDR] == 1 and tlb.outside >= 1
    assert b.rx[0].read_rx_frames() == []


def test_indirect_table_through_the_iotlb(make_rig):
    rig, a, b = pair(make_rig)
    tlb = attach(a)
    map_identity(a, tlb)
    b.rx[0].post_rx(4)
    f = frame(mac(2), mac(1), os.urandom(700))
    a.tx[0].post_tx(f, indirect=True, segments=3)
    assert rig.poll() == 1
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, DEFAULT_FEATURES | F_PACKED], ids=["split", "packed"])
def test_receive_buffers_are_asked_for_before_a_frame_needs_them(make_rig, features):
    """A PMD pass over the guest's port looks up its next receive buffers: their misses go out
    together, before any frame arrives, and nothing is taken from the ring."""
    rig, a, b = pair(make_rig, features)
    tlb = attach(b)
    b.rx[0].post_rx(4)
    rig.poll()
    misses = []
    while (miss := take_miss(tlb)) is not None:
        misses.append(miss)
    # Four 2 KiB buffers on two pages: one miss per page, all asked at once.
    assert len(misses) == 2 and {perm for _, perm in misses} == {WO}
    assert len({iova & ~0xFFF for iova, _ in misses}) == 2
    assert b.rx[0].read_rx_frames() == [] and b.vring(0).stats.errors == 0
    rig.poll()
    assert take_miss(tlb) is None                    # asked once per table generation
    map_identity(b, tlb)
    f = frame(mac(2), mac(1), b"p" * 64)
    a.tx[0].post_tx(f)
    rig.poll()
    [got] = b.rx[0].read_rx_frames()
    assert got.data == f


def test_cached_translations_follow_a_new_memory_table(make_rig):
    """A thread's cached host address belongs to the memory table it came from: after the
    table is replaced (same guest addresses, other memory), a buffer is read from the new one."""
    rig, a, b = pair(make_rig)
    tlb = attach(a)
    map_identity(a, tlb)
    b.rx[0].post_rx(8)
    first = a.tx[0].post_tx(frame(mac(2), mac(1), b"1" * 60))
    assert rig.poll() == 1                           # caches the buffer's page
    f = frame(mac(2), mac(1), b"2" * 60)
    head = a.tx[0].post_tx(f)
    addr, length = a.tx[0].read_desc(head)[:2]
    assert addr >> 12 == a.tx[0].read_desc(first)[0] >> 12
    moved = GuestMemory(a.mem.size, gpa_base=a.mem.gpa_base, uva_offset=a.mem.uva_offset)
    a.mems.append(moved)
    moved.write(a.mem.gpa_base, a.mem.read(a.mem.gpa_base, a.mem.size))
    changed = frame(mac(2), mac(1), b"3" * 60)
    moved.write(addr + a.dev.hdr_len, changed)
    a.dev.mem = memtable_for(ffi, [moved], a.keep)   # the rings stay where they were set up
    assert rig.poll() == 1
    got = [r.data for r in b.rx[0].read_rx_frames()]
    assert got[-1] == changed
