"""A mock virtio-net guest driver for split and packed virtqueues, in Python.

It plays the guest's part of virtio 1.x section 2.7: guest memory is a memfd
mapped into this process, and the driver lays out descriptor tables, avail
and used rings and packet buffers in it exactly as a guest kernel or DPDK
virtio-user would.  The back-end under test (the C ring engine, directly or
through the vhost-user protocol) maps the same memfd, so both sides share
the bytes.

Address spaces, as in vhost-user:

* guest-physical addresses (GPA) are what descriptors carry;
* user addresses (UVA) are what SET_VRING_ADDR carries: the front-end's
  virtual addresses.  Here UVA = GPA + `uva_offset`; virtio-user uses the
  same value for both (offset 0), and tests can pick an offset to check
  that a back-end does not mix the two up.

Two levels of API:

* well-behaved helpers: `SplitQueue.post_tx`, `post_rx`, `get_used`,
  `read_rx_frames`, event-index accessors;
* raw primitives for hostile tests: `write_desc`, `write_avail_entry`,
  `set_avail_idx`, `write_indirect_table`, `GuestMemory.write` at any
  address.  They do no checking at all, on purpose.

Memory ordering: the driver writes with plain stores through the mmap, in
program order, and x86 keeps stores ordered, so a ring entry written before
the index that publishes it is visible first to the back-end's threads.

Nothing here depends on vswitch; `memtable_for` needs only an `ffi` with
`struct vs_memtable` declared.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC = struct.Struct("<QIHH")            # addr, len, flags, next
USED_ELEM = struct.Struct("<II")         # id, len
U16 = struct.Struct("<H")
NET_HDR = struct.Struct("<BBHHHH")       # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NET_HDR_LEN_LEGACY = 10                  # without num_buffers
NET_HDR_LEN_MRG = 12                     # with num_buffers (VERSION_1 or MRG_RXBUF)

PAGE = 4096


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class GuestMemory:
    """One region of guest RAM: `size` bytes of a memfd, at guest-physical
    address `gpa_base`, seen by the front-end at user address gpa + `uva_offset`.

    It also hands out pieces of itself (`alloc` / `free`), first fit, so rings
    and buffers of several queues can share one region."""

    def __init__(self, size: int = 4 << 20, *, gpa_base: int = 0x100000, uva_offset: int = 0,
                 name: str = "vswitch-guest"):
        self.size = align_up(size, PAGE)
        self.gpa_base = gpa_base
        self.uva_offset = uva_offset
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._free: list[tuple[int, int]] = [(0, self.size)]     # (offset, length), sorted
        self._allocated: dict[int, int] = {}                     # offset -> length

    # -- addresses
    @property
    def uva_base(self) -> int:
        return self.gpa_base + self.uva_offset

    def gpa_to_uva(self, gpa: int) -> int:
        return gpa + self.uva_offset

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa_base <= gpa and gpa + length <= self.gpa_base + self.size

    def _offset(self, gpa: int, length: int) -> int:
        if not self.contains(gpa, length):
            raise ValueError(f"guest address {gpa:#x}+{length} is outside guest memory")
        return gpa - self.gpa_base

    # -- bytes
    def read(self, gpa: int, length: int) -> bytes:
        offset = self._offset(gpa, length)
        return self.mm[offset:offset + length]

    def write(self, gpa: int, data: bytes) -> None:
        offset = self._offset(gpa, len(data))
        self.mm[offset:offset + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        return U16.unpack_from(self.mm, self._offset(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        """One 16-bit store, as a guest does: the device may read it at any moment.

        struct.pack_into would not do: it zero-fills the field first and then
        writes it byte by byte, so the device could see a made-up index.
        """
        ctypes.c_uint16.from_buffer(self.mm, self._offset(gpa, 2)).value = value & 0xFFFF

    # -- allocation
    def alloc(self, length: int, align: int = 16) -> int:
        """Returns the guest-physical address of `length` fresh zeroed bytes."""
        length = max(length, 1)
        for i, (offset, free_len) in enumerate(self._free):
            start = align_up(offset, align)
            end = start + length
            if end <= offset + free_len:
                pieces = []
                if start > offset:
                    pieces.append((offset, start - offset))
                if end < offset + free_len:
                    pieces.append((end, offset + free_len - end))
                self._free[i:i + 1] = pieces
                self._allocated[start] = length
                self.mm[start:end] = bytes(length)
                return self.gpa_base + start
        raise MemoryError(f"guest memory of {self.size} bytes is full (wanted {length})")

    def free(self, gpa: int) -> None:
        offset = gpa - self.gpa_base
        length = self._allocated.pop(offset)
        self._free.append((offset, length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, ln in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + ln)
            else:
                merged.append((off, ln))
        self._free = merged

    def region(self) -> dict:
        """The region as SET_MEM_TABLE describes it (the fd is still ours)."""
        return {"guest_phys_addr": self.gpa_base, "size": self.size, "user_addr": self.uva_base,
                "mmap_offset": 0, "fd": self.fd}

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def memtable_for(ffi, memories: list[GuestMemory], keepalive: list):
    """Builds a `struct vs_memtable` whose host addresses are this process's
    own mappings of `memories`: enough for ring-engine tests that call the C
    code directly, without the vhost-user protocol.  Objects the C side points
    into are appended to `keepalive`; keep it alive as long as the table."""
    table = ffi.new("struct vs_memtable *")
    table.nregions = len(memories)
    for i, mem in enumerate(memories):
        buf = ffi.from_buffer(mem.mm)
        keepalive.append(buf)
        region = table.regions[i]
        region.guest_phys_addr = mem.gpa_base
        region.user_addr = mem.uva_base
        region.size = mem.size
        region.host_addr = ffi.cast("uint8_t *", buf)
    keepalive.append(table)
    return table


@dataclass
class Chain:
    """A descriptor chain the driver has made available and not yet got back."""
    head: int
    descs: list[int]                    # descriptor indexes in the ring's table
    buffers: list[int]                  # guest allocations to free when used
    kind: str                           # "tx", "rx" or "raw"
    lengths: list[int] = field(default_factory=list)     # buffer sizes (rx)
    addrs: list[int] = field(default_factory=list)       # buffer addresses (rx)


@dataclass
class RxFrame:
    header: bytes                       # the virtio-net header, hdr_len bytes
    data: bytes                         # the frame after the header
    num_buffers: int                    # buffers the frame used (1 without mergeable)
    heads: list[int]                    # descriptor heads it came in


class DriverQueue:
    """What a well-behaved driver does the same on split and packed rings:
    build headers, post TX frames and RX buffers (through the layout's own
    `_post`), and read used entries back (through its `_pop_used`, which
    yields (id, len, data) with the received bytes of RX chains)."""

    hdr_len: int
    mem: "GuestMemory"

    def net_header(self, *, num_buffers: int = 0, flags: int = 0, gso_type: int = 0) -> bytes:
        hdr = NET_HDR.pack(flags, gso_type, 0, 0, 0, 0)
        if self.hdr_len == NET_HDR_LEN_MRG:
            hdr += U16.pack(num_buffers)
        return hdr

    def post_tx(self, frame: bytes, *, segments: int = 1, header_separate: bool = False,
                indirect: bool = False, header: bytes | None = None, publish: bool = True) -> int:
        """Makes one frame available for the device to read (a TX chain).

        segments: how many descriptors the header+frame bytes are split into
        (nearly equal pieces); header_separate: the virtio-net header gets its
        own descriptor, before those; indirect: the chain lives in an
        indirect table that a single ring descriptor points to; publish
        False (split rings only): the chain is written but not made
        available, for publish_raw(head) later (a timed send).
        Returns the head descriptor index (split) or buffer id (packed)."""
        hdr = self.net_header() if header is None else header
        pieces_data: list[bytes] = []
        if header_separate:
            pieces_data.append(hdr)
            body = frame
        else:
            body = hdr + frame
        segments = max(1, min(segments, max(len(body), 1)))
        step = -(-len(body) // segments) if body else 0
        for s in range(segments):
            pieces_data.append(body[s * step:(s + 1) * step])
        buffers, pieces = [], []
        for data in pieces_data:
            gpa = self.mem.alloc(max(len(data), 1), 8)
            self.mem.write(gpa, data)
            buffers.append(gpa)
            pieces.append((gpa, len(data), 0))
        return self._post(pieces, buffers, "tx", indirect, publish)

    def post_rx(self, count: int = 1, size: int = 2048, *, segments: int = 1,
                indirect: bool = False) -> list[int]:
        """Makes `count` receive buffers of `size` bytes available, each one a
        chain of `segments` writable descriptors.  Returns their heads
        (split) or buffer ids (packed)."""
        heads = []
        for _ in range(count):
            piece = -(-size // segments)
            buffers, pieces = [], []
            for _s in range(segments):
                gpa = self.mem.alloc(piece, 8)
                buffers.append(gpa)
                pieces.append((gpa, piece, VIRTQ_DESC_F_WRITE))
            heads.append(self._post(pieces, buffers, "rx", indirect))
        return heads

    def get_used(self) -> list[tuple[int, int]]:
        """New used entries (id, len) since the last call; their descriptors
        and buffers are reclaimed.  Entries naming an unknown head are
        returned too (a buggy device), but reclaim nothing."""
        out = []
        for id_, length, _chain in self._pop_used():
            out.append((id_, length))
        return out

    def _read_rx_chain(self, chain: "Chain | PackedChain", length: int) -> bytes:
        out = bytearray()
        for addr, size in zip(chain.addrs, chain.lengths):
            take = min(size, length - len(out))
            if take <= 0:
                break
            out += self.mem.read(addr, take)
        return bytes(out)

    def read_rx_frames(self) -> list[RxFrame]:
        """Reads received frames from the used ring, joining mergeable buffers
        (num_buffers in the header of a frame's first buffer).  Only whole
        frames are returned; a frame whose later buffers are not used yet
        stays pending for the next call."""
        frames = []
        pending = getattr(self, "_rx_pending", [])
        pending.extend(self._pop_used())
        while pending:
            id_, _length, data = pending[0]
            data = data or b""
            num_buffers = 1
            if self.hdr_len == NET_HDR_LEN_MRG and len(data) >= self.hdr_len:
                num_buffers = max(1, U16.unpack_from(data, 10)[0])
            if len(pending) < num_buffers:
                break
            parts = pending[:num_buffers]
            del pending[:num_buffers]
            joined = b"".join((p[2] or b"") for p in parts)
            frames.append(RxFrame(joined[:self.hdr_len], joined[self.hdr_len:], num_buffers,
                                  [p[0] for p in parts]))
        self._rx_pending = pending
        return frames


class SplitQueue(DriverQueue):
    """One split virtqueue: its rings live in `mem`, laid out with the
    alignment virtio 1.x requires (desc 16, avail 2, used 4).

    `hdr_len` is 12 with VERSION_1 or MRG_RXBUF negotiated, else 10."""

    start_base = 0                    # SET_VRING_BASE of a fresh ring

    def __init__(self, mem: GuestMemory, size: int = 256, *, hdr_len: int = NET_HDR_LEN_MRG,
                 index: int = 0):
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"ring size {size} is not a power of two up to 32768")
        self.mem = mem
        self.size = size
        self.index = index
        self.hdr_len = hdr_len
        self.desc_gpa = mem.alloc(16 * size, 16)
        self.avail_gpa = mem.alloc(4 + 2 * size + 2, 2)
        self.used_gpa = mem.alloc(4 + 8 * size + 2, 4)
        self.avail_idx = 0            # our shadow of avail->idx
        self.last_used_idx = 0        # next used entry to read
        self._free_descs = list(range(size))
        self._chains: dict[int, Chain] = {}
        self._indirect_tables: dict[int, int] = {}   # head -> table gpa, freed with the chain

    # -- addresses the front-end tells the back-end (SET_VRING_ADDR carries UVAs)
    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.mem.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.mem.gpa_to_uva(self.used_gpa)

    def free_count(self) -> int:
        return len(self._free_descs)

    @property
    def vring_base(self) -> int:
        """What SET_VRING_BASE carries to resume this ring: the avail index."""
        return self.avail_idx

    def in_flight(self) -> int:
        return len(self._chains)

    # -- raw primitives: no checks, for hostile tests
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        """Writes descriptor `i` of the table (i may be anything below size)."""
        self.mem.write(self.desc_gpa + 16 * i, DESC.pack(addr, length, flags, next_))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.mem.read(self.desc_gpa + 16 * i, 16))

    def write_avail_entry(self, slot: int, head: int) -> None:
        """Writes avail->ring[slot % size] = head."""
        self.mem.write_u16(self.avail_gpa + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, value: int) -> None:
        """Sets avail->idx to anything, without touching the ring entries."""
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)

    def publish_raw(self, head: int) -> None:
        """Puts `head` in the next avail slot and bumps avail->idx, whatever head is."""
        self.write_avail_entry(self.avail_idx, head)
        self.set_avail_idx(self.avail_idx + 1)

    def write_indirect_table(self, descs: list[tuple[int, int, int, int]]) -> int:
        """Writes an indirect table of (addr, len, flags, next) anywhere in guest
        memory and returns its guest address (for a descriptor with F_INDIRECT)."""
        gpa = self.mem.alloc(16 * max(len(descs), 1), 16)
        self.mem.write(gpa, b"".join(DESC.pack(*d) for d in descs))
        return gpa

    # -- flags and event index
    @property
    def avail_flags(self) -> int:
        return self.mem.read_u16(self.avail_gpa)

    def set_avail_flags(self, flags: int) -> None:
        """VIRTQ_AVAIL_F_NO_INTERRUPT asks the device not to interrupt (without event idx)."""
        self.mem.write_u16(self.avail_gpa, flags)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_gpa)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_gpa + 2)

    @property
    def used_event(self) -> int:
        """avail->used_event: the used index after which the driver wants an interrupt."""
        return self.mem.read_u16(self.avail_gpa + 4 + 2 * self.size)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_gpa + 4 + 2 * self.size, value)

    @property
    def avail_event(self) -> int:
        """used->avail_event: the avail index after which the device wants a kick."""
        return self.mem.read_u16(self.used_gpa + 4 + 8 * self.size)

    def set_avail_event(self, value: int) -> None:
        self.mem.write_u16(self.used_gpa + 4 + 8 * self.size, value)

    # -- well-behaved driver
    def _take_descs(self, n: int) -> list[int]:
        if n > len(self._free_descs):
            raise RuntimeError(f"queue {self.index}: {n} descriptors wanted, {len(self._free_descs)} free")
        taken, self._free_descs = self._free_descs[:n], self._free_descs[n:]
        return taken

    def _write_chain(self, descs: list[int], pieces: list[tuple[int, int, int]]) -> None:
        """pieces: (addr, len, flags) per descriptor; NEXT links are added."""
        for pos, (i, (addr, length, flags)) in enumerate(zip(descs, pieces)):
            last = pos == len(descs) - 1
            self.write_desc(i, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                            0 if last else descs[pos + 1])

    def _make_available(self, chain: Chain, publish: bool = True) -> int:
        self._chains[chain.head] = chain
        if publish:
            self.publish_raw(chain.head)
        return chain.head

    def _post(self, pieces: list[tuple[int, int, int]], buffers: list[int], kind: str, indirect: bool,
              publish: bool = True) -> int:
        if indirect:
            table = [(addr, length, flags | (VIRTQ_DESC_F_NEXT if n < len(pieces) - 1 else 0),
                      n + 1 if n < len(pieces) - 1 else 0)
                     for n, (addr, length, flags) in enumerate(pieces)]
            table_gpa = self.write_indirect_table(table)
            (head,) = self._take_descs(1)
            self.write_desc(head, table_gpa, 16 * len(table), VIRTQ_DESC_F_INDIRECT, 0)
            chain = Chain(head, [head], buffers + [table_gpa], kind)
        else:
            descs = self._take_descs(len(pieces))
            self._write_chain(descs, pieces)
            chain = Chain(descs[0], descs, buffers, kind)
        chain.lengths = [p[1] for p in pieces]
        chain.addrs = [p[0] for p in pieces]
        return self._make_available(chain, publish)

    def _pop_used(self):
        used_idx = self.used_idx
        entries = []
        while self.last_used_idx != used_idx:
            slot = self.last_used_idx % self.size
            id_, length = USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * slot, 8))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            chain = self._chains.pop(id_, None)
            data = None
            if chain is not None and chain.kind == "rx":
                data = self._read_rx_chain(chain, length)
            if chain is not None:
                self._reclaim(chain)
            entries.append((id_, length, data))
        return entries

    def _reclaim(self, chain: Chain) -> None:
        for gpa in chain.buffers:
            self.mem.free(gpa)
        self._free_descs.extend(chain.descs)


# --- Packed virtqueues (virtio 1.1, section 2.8) ------------------------------

VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
VIRTQ_EVENT_F_ENABLE = 0
VIRTQ_EVENT_F_DISABLE = 1
VIRTQ_EVENT_F_DESC = 2
PACKED_DESC = struct.Struct("<QIHH")     # addr, len, id, flags
PACKED_START_BASE = 1 << 15              # SET_VRING_BASE of a fresh ring: index 0, wrap counter 1


@dataclass
class PackedChain:
    """A buffer the driver has made available and not yet got back."""
    id: int
    count: int                          # ring descriptors it took
    buffers: list[int]
    kind: str
    lengths: list[int] = field(default_factory=list)
    addrs: list[int] = field(default_factory=list)


class PackedQueue(DriverQueue):
    """One packed virtqueue: a descriptor ring and the driver and device event
    suppression structures, in `mem`.  The same well-behaved API as
    SplitQueue (post_tx, post_rx, get_used, read_rx_frames), plus raw
    primitives that write any descriptor with any flags.

    `desc_uva`, `avail_uva` and `used_uva` are what SET_VRING_ADDR carries
    for a packed ring: the descriptor ring, the driver event area and the
    device event area.  A fresh ring starts with base PACKED_START_BASE.

    With `in_order` the driver accepts a used entry for a batch (2.8.9): an
    entry naming buffer X returns every buffer made available before X too."""

    start_base = PACKED_START_BASE

    def __init__(self, mem: GuestMemory, size: int = 256, *, hdr_len: int = NET_HDR_LEN_MRG,
                 index: int = 0, in_order: bool = False):
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"ring size {size} is not a power of two up to 32768")
        self.mem = mem
        self.size = size
        self.index = index
        self.hdr_len = hdr_len
        self.in_order = in_order
        self.desc_gpa = mem.alloc(16 * size, 16)
        self.driver_event_gpa = mem.alloc(4, 4)
        self.device_event_gpa = mem.alloc(4, 4)
        self.next_avail = 0           # next slot to fill
        self.avail_wrap = 1
        self.next_used = 0            # next slot to read a used entry from
        self.used_wrap = 1
        self.free_slots = size
        self._free_ids = list(range(size))
        self._chains: dict[int, PackedChain] = {}
        self._order: list[int] = []   # ids in the order they were made available

    # -- addresses the front-end tells the back-end
    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.mem.gpa_to_uva(self.driver_event_gpa)

    @property
    def used_uva(self) -> int:
        return self.mem.gpa_to_uva(self.device_event_gpa)

    def in_flight(self) -> int:
        return len(self._chains)

    @property
    def vring_base(self) -> int:
        """What SET_VRING_BASE carries, as QEMU sends it: the next slot to make
        available with the wrap counter in bit 15, and the next used slot the
        same way in the high half (DPDK virtio-user sends only the low half)."""
        return self.next_avail | self.avail_wrap << 15 | (self.next_used | self.used_wrap << 15) << 16

    # -- raw primitives: no checks
    def avail_flags(self, wrap: int | None = None) -> int:
        """The AVAIL/USED bits that make a descriptor available in lap `wrap`."""
        wrap = self.avail_wrap if wrap is None else wrap
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    def write_desc(self, slot: int, addr: int, length: int, id_: int, flags: int) -> None:
        """Writes descriptor `slot`: addr, len and id first, then flags in one store."""
        gpa = self.desc_gpa + 16 * slot
        self.mem.write(gpa, PACKED_DESC.pack(addr, length, id_, 0)[:14])
        self.mem.write_u16(gpa + 14, flags)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return PACKED_DESC.unpack(self.mem.read(self.desc_gpa + 16 * slot, 16))

    def publish_raw(self, descs: list[tuple[int, int, int, int]], *, wrap: int | None = None,
                    chain: PackedChain | None = None) -> None:
        """Writes (addr, len, id, flags) descriptors into the next slots; the
        AVAIL/USED bits of the current lap (or of `wrap`) are added, and the
        first descriptor's flags are written last, as a driver must."""
        slots = []
        for k, (addr, length, id_, flags) in enumerate(descs):
            lap_wrap = self.avail_wrap if wrap is None else wrap
            slots.append((self.next_avail, addr, length, id_, flags | self.avail_flags(lap_wrap)))
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self.free_slots -= len(descs)
        for slot, addr, length, id_, flags in slots[1:]:
            self.write_desc(slot, addr, length, id_, flags)
        slot, addr, length, id_, flags = slots[0]
        if chain is not None:
            self._chains[chain.id] = chain
            self._order.append(chain.id)
        self.write_desc(slot, addr, length, id_, flags)

    def write_indirect_table(self, descs: list[tuple[int, int, int, int]]) -> int:
        """An indirect table of (addr, len, id, flags) entries; returns its address."""
        gpa = self.mem.alloc(16 * max(len(descs), 1), 16)
        self.mem.write(gpa, b"".join(PACKED_DESC.pack(*d) for d in descs))
        return gpa

    # -- event suppression
    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        """The driver's wishes: VIRTQ_EVENT_F_ENABLE, _DISABLE, or _DESC at (off, wrap)."""
        self.mem.write_u16(self.driver_event_gpa, off | (wrap << 15))
        self.mem.write_u16(self.driver_event_gpa + 2, flags)

    @property
    def device_event(self) -> tuple[int, int]:
        """(flags, off_wrap) of the device's event structure."""
        return self.mem.read_u16(self.device_event_gpa + 2), self.mem.read_u16(self.device_event_gpa)

    # -- well-behaved driver
    def _take_id(self) -> int:
        if not self._free_ids:
            raise RuntimeError(f"queue {self.index}: no free buffer id")
        return self._free_ids.pop(0)

    def _post(self, pieces: list[tuple[int, int, int]], buffers: list[int], kind: str, indirect: bool,
              publish: bool = True) -> int:
        if not publish:
            raise NotImplementedError("a packed ring's chain is available as soon as it is written")
        id_ = self._take_id()
        if indirect:
            table_gpa = self.write_indirect_table([(a, n, 0, f) for a, n, f in pieces])
            descs = [(table_gpa, 16 * len(pieces), id_, VIRTQ_DESC_F_INDIRECT)]
            buffers = buffers + [table_gpa]
        else:
            if len(pieces) > self.free_slots:
                raise RuntimeError(f"queue {self.index}: {len(pieces)} slots wanted, {self.free_slots} free")
            descs = [(a, n, id_, f | (VIRTQ_DESC_F_NEXT if k < len(pieces) - 1 else 0))
                     for k, (a, n, f) in enumerate(pieces)]
        chain = PackedChain(id_, len(descs), buffers, kind, [p[1] for p in pieces], [p[0] for p in pieces])
        self.publish_raw(descs, chain=chain)
        return id_

    def _used_entry(self):
        addr, length, id_, flags = self.read_desc(self.next_used)
        avail = bool(flags & VIRTQ_DESC_F_AVAIL)
        used = bool(flags & VIRTQ_DESC_F_USED)
        if avail != used or used != bool(self.used_wrap):
            return None
        return id_, length

    def _pop_used(self):
        entries = []
        while True:
            entry = self._used_entry()
            if entry is None:
                return entries
            id_, length = entry
            if id_ not in self._chains:
                # A buggy device: report it, and step one slot so as not to spin.
                entries.append((id_, length, None))
                self._skip(1)
                continue
            # In order, an entry for X returns everything made available before X.
            upto = self._order.index(id_) if self.in_order else None
            batch = self._order[:upto + 1] if upto is not None else [id_]
            for k, bid in enumerate(batch):
                chain = self._chains.pop(bid)
                self._order.remove(bid)
                blen = length if bid == id_ else 0
                data = self._read_rx_chain(chain, blen) if chain.kind == "rx" else None
                self._skip(chain.count)
                self.free_slots += chain.count
                for gpa in chain.buffers:
                    self.mem.free(gpa)
                self._free_ids.append(bid)
                entries.append((bid, blen, data))

    def _skip(self, n: int) -> None:
        self.next_used += n
        while self.next_used >= self.size:
            self.next_used -= self.size
            self.used_wrap ^= 1

