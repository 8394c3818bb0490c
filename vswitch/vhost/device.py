"""The device side of a vhost-user port: what the front-end configured, and
the message handlers that configure it.

The state: negotiated features, the memory table (guest memory mapped only
after its file is seen to be large enough, only the pages a region covers,
at most `max_memory` bytes per port, each mapping registered with guestmem
for faults), and the rings with their life cycle.  The handlers run only
after vswitch/vhost/connection.py has checked the message's header, payload
size, fds and syntax against its row in MESSAGES (the one message table, at
the end of this file); what they check is whether the request makes sense
for this device: vring indexes against the port's queue count, features
against those offered, values against the limits.  The C side is given new
memory tables and ring addresses only while the rings are disabled; memory
and ring fds the PMD threads may still use are freed through `reclaim`,
once they have passed a quiescent point.

Memory hotplug.  With PROTOCOL_F_CONFIGURE_MEM_SLOTS the front-end sends
regions one at a time (ADD_MEM_REG, REM_MEM_REG, up to GET_MAX_MEM_SLOTS of
them) while the rings run.  Each change builds a new memory table, publishes
it with one pointer store (vs_vhost_dev_set_mem) and hands the old table, and
the mapping of a removed region, to `reclaim`: nothing is unmapped until the
PMDs have passed a quiescent point, and traffic never stops for it.  A ring
that lies in a removed region (the spec forbids it; a hostile front-end may
try) is halted before the region goes and forgets its addresses.

Faults.  The front-end may still cut its memory short later (truncate the
file): guestmem's SIGBUS handler replaces the mapping with zeros and flags
the device (vs_vhost_dev.fault).  describe_fault() counts the fault bits
and names them; the back-end (backend.py) then disconnects the front-end.

Ring life cycle.  A ring *starts* (vs_vring_setup, then enabled) once it has
a size, addresses, a kick fd (or NOFD), a call fd (or NOFD), the memory
table is installed, and it is enabled: by SET_VRING_ENABLE 1 when
VHOST_USER_F_PROTOCOL_FEATURES was negotiated, by SET_VRING_KICK otherwise.
Like DPDK, the call fd is waited for too, since QEMU sends it right after
the kick.  A ring is *halted* (disabled, PMDs quiesced, last_avail_idx read
back) by SET_VRING_ENABLE 0 and while its configuration changes; it keeps
its fds and restarts where it stopped.  It is *stopped* (halted, fds closed,
addresses forgotten) by GET_VRING_BASE, RESET_OWNER, disconnect and stop().
Only the handlers of rows marked `quiesce` may wait for the PMDs.

Live migration (vhost-user.rst, "Migration").  SET_LOG_BASE maps the
front-end's dirty bitmap (LOG_SHMFD: a shared memory fd, a size and an
offset) and answers with an empty reply, as QEMU waits for one; while
VHOST_F_LOG_ALL is negotiated too, vs_vhost_dev.log points at it and the
ring engines mark every page they write (dirty_log.h).  QEMU turns LOG_ALL
on and off with SET_FEATURES while the rings run, and resends each ring's
address with VHOST_VRING_F_LOG and the used ring's guest-physical address.
A log that is empty, does not cover the guest's memory, is larger than the
memory the port may map, or lies past the end of its fd is refused and
counted (log_refused).  GET_VRING_BASE halts the ring and waits for the
PMDs, so the last page they log is in the bitmap before the reply.  The log
pointer changes with one store and a replaced log is unmapped through
`reclaim`, so neither SET_LOG_BASE nor SET_FEATURES waits for the PMDs.

Postcopy (vhost-user.rst, "Migration"; only with `postcopy: true`, which
offers PROTOCOL_F_PAGEFAULT).  POSTCOPY_ADVISE opens a userfaultfd and
hands the front-end a copy.  POSTCOPY_LISTEN comes before any memory table
(QEMU sends the table when the destination's device starts, after LISTEN;
a table mapped earlier is refused, as DPDK does); while listening the
dirty log is not used.  SET_MEM_TABLE then maps the regions without
touching them and replies with the switch's address of each region; the
front-end acknowledges with a SET_MEM_TABLE carrying a u64 0, and only then
are the mappings registered with the userfaultfd and the table installed.
Nothing but that acknowledgement is accepted in between (rule_for).  From
then on a PMD that touches a page not yet migrated sleeps in the kernel
until QEMU has placed the page and woken it: every port of that PMD stalls
meanwhile (README, Live migration).  POSTCOPY_END, a disconnect and a
reset unregister the mappings, which also wakes a PMD still asleep on one,
and close the fd.  With PAGEFAULT the port does not offer
CONFIGURE_MEM_SLOTS: QEMU's postcopy variant of ADD_MEM_REG ends with an
acknowledgement whose request code is whatever it sent last.

Threading: everything here runs on the daemon's asyncio loop.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Callable, NoReturn

from vswitch.config import DEFAULT_MAX_MEMORY
from vswitch.native import ffi, lib
from vswitch.vhost import guestmem, protocol, userfault
from vswitch.vhost.iotlb import DeviceIotlb
from vswitch.vhost.connection import Message, close_fds
from vswitch.vhost.protocol import (
    Fds, IotlbMsg, MemoryTable, MessageRule, Payload, ProtocolError, ProtocolFeature, Reply, Request, RequestRefused,
    VringAddr, VringFd, VringState,
)

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict], None]
Reclaim = Callable[[str, Callable[[], None]], None]

# Why the C side flagged a device (vs_vhost_dev.fault): the counter of each bit.
FAULT_BITS = {
    lib.VS_DEV_FAULT_MEMORY: "mem_faults",
    lib.VS_DEV_FAULT_CALL_BLOCKED: "call_blocked_faults",
}
KNOWN_FAULT_BITS = lib.VS_DEV_FAULT_MEMORY | lib.VS_DEV_FAULT_CALL_BLOCKED


def _release_now(what: str, release: Callable[[], None]) -> None:
    release()


def _take_eventfd(msg: Message, request: Request, index: int) -> int:
    """Takes the message's fd, which must be an eventfd, and makes it non-blocking.

    The PMD writes call fds and reads kick fds: a pipe or a socket could fill
    up and block it.  The front-end shares the file description, so it can
    still clear O_NONBLOCK; the PMD copes with that too (pmd.c, virtqueue.c).
    """
    fd = msg.fds[0]
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        kind = f"unknown: {exc.strerror}"
    if kind != "anon_inode:[eventfd]":
        raise RequestRefused(f"{request.name}: vring {index}: the fd is not an eventfd ({kind})")
    os.set_blocking(fd, False)
    return msg.take_fd()


@dataclass
class _MemRegion:
    """One mapped region: the mmap, the cffi buffer over it (keeps the pointer
    valid), and the region as the front-end described it.  The mapping starts
    at the page-aligned file offset at or below desc.mmap_offset, `skip`
    bytes before the region itself."""
    mapping: mmap.mmap
    buffer: object
    desc: protocol.MemoryRegion
    file_id: tuple[int, int]          # (st_dev, st_ino) of the file it maps
    skip: int = 0
    slot: int = -1                    # in the guest memory fault registry (guestmem.c)
    dev: object = None                # the device a fault flags: kept alive as long as the mapping
    uffd_length: int = 0              # postcopy: bytes from `address` registered with the userfaultfd

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.buffer))

    @property
    def region_address(self) -> int:
        """Where the region itself starts in the switch (what a postcopy SET_MEM_TABLE reply gives)."""
        return self.address + self.skip

    def unmap(self) -> None:
        if self.slot >= 0:
            guestmem.unregister(self.slot)
            self.slot = -1
        ffi.release(self.buffer)
        self.mapping.close()


@dataclass
class _DirtyLog:
    """The front-end's dirty bitmap, mapped, and the C struct pointing into it."""
    mapping: mmap.mmap
    buffer: object
    c: object                          # struct vs_dirty_log *
    slot: int = -1                     # in the guest memory fault registry: the front-end may truncate it
    dev: object = None                 # the device a fault flags: kept alive as long as the mapping

    def unmap(self) -> None:
        if self.slot >= 0:
            guestmem.unregister(self.slot)
            self.slot = -1
        ffi.release(self.buffer)
        self.mapping.close()


# QEMU maps a log up to this much larger than its guest memory needs, so
# that hotplugged memory is covered before the memory table grows.
LOG_SLACK = 4096


def _unmap_all(regions: list[_MemRegion], keep_alive=None) -> Callable[[], None]:
    """A release function for regions (and the memory table pointing into them)."""
    refs = [keep_alive]

    def release() -> None:
        for region in regions:
            region.unmap()
        refs.clear()
    return release


def _build_memtable(regions: list[_MemRegion]):
    """A new `struct vs_memtable` over mapped regions (never changed once published)."""
    memtable = ffi.new("struct vs_memtable *")
    memtable.nregions = len(regions)
    for i, mapped in enumerate(regions):
        c_region = memtable.regions[i]
        c_region.guest_phys_addr = mapped.desc.guest_phys_addr
        c_region.user_addr = mapped.desc.user_addr
        c_region.size = mapped.desc.size
        c_region.host_addr = ffi.cast("uint8_t *", mapped.buffer) + mapped.skip
    return memtable


def _describe_region(region: protocol.MemoryRegion) -> str:
    return (f"region gpa {region.guest_phys_addr:#x} size {region.size:#x} uva {region.user_addr:#x} "
            f"offset {region.mmap_offset:#x}")


def _file_id(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ring_lies_in(addr: VringAddr, region: protocol.MemoryRegion) -> bool:
    """True if any of a ring's three parts starts inside the region (user addresses)."""
    return any(region.user_addr <= uva < region.user_addr + region.size for uva in (addr.desc, addr.avail, addr.used))


class _Ring:
    """What the front-end told us about one vring, and whether it runs."""

    def __init__(self, index: int):
        self.index = index
        self.size: int | None = None
        self.addr: VringAddr | None = None
        self.base = 0                 # where to start: SET_VRING_BASE, or last_avail_idx after a halt
        self.kick_set = False         # SET_VRING_KICK seen (fd or NOFD)
        self.kickfd = -1
        self.call_set = False
        self.callfd = -1
        self.errfd = -1
        self.enabled = False          # the front-end's wish (SET_VRING_ENABLE or the kick)
        self.started = False          # running in C

    def forget_fds(self) -> list[int]:
        fds = [self.kickfd, self.callfd, self.errfd]
        self.kickfd = self.callfd = self.errfd = -1
        self.kick_set = self.call_set = False
        return fds


class VhostUserDevice:
    """The device state of one vhost-user port and its message handlers.

    name:    the port name, used in log lines.
    queues:  queue pairs offered (GET_QUEUE_NUM); vrings 0 .. 2*queues-1.
    dev:     the port's `struct vs_vhost_dev *`, already vs_vhost_dev_init'ed.
    quiesce: waits (briefly) until the PMD threads no longer use anything
             they read before the call.
    emit(kind, fields): "link" {"up": bool}, "queue" {"queue": vring,
             "enabled": bool}, "rarp" {"mac": "aa:bb:cc:dd:ee:ff"}, "mtu"
             {"mtu": the front-end's NET_SET_MTU, None once it is gone}; must not raise.
    on_rarp(mac_bytes): optional, called on SEND_RARP as well.
    reclaim(what, release): calls release() once no PMD thread can still
             use what it frees (guest memory, ring fds); by default at once.
    max_memory: the most bytes of guest memory the port maps.
    disabled_features: feature bits the port's config turned off: never
             offered, refused like any bit not offered.
    iommu:   offer VIRTIO_F_ACCESS_PLATFORM (the port's `iommu: true`): a guest
             behind a vIOMMU then gives IOVAs, translated through an IOTLB (iotlb.py).
    postcopy: offer PROTOCOL_F_PAGEFAULT (the port's `postcopy: true`): the
             guest may arrive by postcopy live migration (userfault.py).
    """

    messages: dict[Request, MessageRule]      # MESSAGES, set below the class

    def __init__(self, name: str, queues: int, dev, quiesce: Callable[[], None], emit: EventSink,
                 on_rarp: Callable[[bytes], None] | None = None, reclaim: Reclaim | None = None,
                 max_memory: int = DEFAULT_MAX_MEMORY, disabled_features: int = 0, iommu: bool = False,
                 postcopy: bool = False):
        if not 1 <= queues <= lib.VS_MAX_QUEUE_PAIRS:
            raise ValueError(f"vhost-user port '{name}': queues must be 1 to {lib.VS_MAX_QUEUE_PAIRS}, not {queues}")
        self.name = name
        self.queues = queues
        self.dev = dev
        self._quiesce = quiesce
        self._emit = emit
        self._on_rarp = on_rarp
        self._reclaim = reclaim or _release_now
        self.max_memory = max_memory
        self.offered_features = protocol.OFFERED_FEATURES & ~disabled_features
        if iommu:
            self.offered_features |= 1 << protocol.VIRTIO_F_ACCESS_PLATFORM
        self.postcopy = postcopy
        self.offered_protocol_features = protocol.OFFERED_PROTOCOL_FEATURES
        if postcopy:
            self.offered_protocol_features |= 1 << ProtocolFeature.PAGEFAULT
            self.offered_protocol_features &= ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        self.postcopy_refused = 0     # POSTCOPY_* refused (not offered, out of order, no userfaultfd)
        self.postcopy_listens = 0     # LISTENs and ENDs done, for `vswitchctl show`
        self.postcopy_ends = 0
        self.memory_refused = 0       # SET_MEM_TABLE or ADD_MEM_REG over max_memory
        self.mem_reg_refused = 0      # ADD_MEM_REG / REM_MEM_REG refused (slots, overlap, unknown region, file)
        self.mem_regs_added = 0       # ADD_MEM_REG and REM_MEM_REG done, for `vswitchctl show`
        self.mem_regs_removed = 0
        self.rings_lost_memory = 0    # rings halted because REM_MEM_REG took the memory they lie in
        self.mtu_refused = 0          # NET_SET_MTU outside 68..65535
        self.log_refused = 0          # SET_LOG_BASE with a bad size, offset or fd
        self.fault_counts = {name: 0 for name in FAULT_BITS.values()}
        self._handling: MessageRule | None = None
        self._reset_session()

    def _reset_session(self) -> None:
        """Forgets everything a front-end negotiated (the C side is handled by teardown)."""
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.status = 0
        self.mtu: int | None = None
        self.rarp_mac: bytes | None = None
        self.backend_req_fd = -1
        self.log_fd = -1              # SET_LOG_FD: kept, never written (QEMU reads the bitmap itself)
        self._log: _DirtyLog | None = None
        self._iotlb: DeviceIotlb | None = None   # with ACCESS_PLATFORM negotiated
        self._uffd = -1                           # postcopy: from ADVISE until END
        self._postcopy_listening = False
        # A postcopy SET_MEM_TABLE answered, waiting for the front-end's acknowledgement.
        self._postcopy_pending: list[_MemRegion] | None = None
        self._regions: list[_MemRegion] = []
        self._memtable = None
        self._rings = [_Ring(i) for i in range(2 * self.queues)]
        self._link_up = False

    def info(self) -> dict:
        """Device state for `vswitchctl show`."""
        rings = []
        for ring in self._rings:
            vr = self._vring(ring.index)
            rings.append({
                "index": ring.index,
                "size": ring.size or 0,
                "enabled": ring.started,
                "layout": "packed" if ring.started and vr.packed else "split",
                "last_avail_idx": int(lib.vs_vring_base(vr)) if ring.started else ring.base,
                "kick": "fd" if ring.kickfd >= 0 else ("polled" if ring.kick_set else "none"),
                "call": "fd" if ring.callfd >= 0 else ("none" if not ring.call_set else "polled"),
                "resumed_from_used": int(vr.resumed_from_used),
            })
        return {
            "features": f"{self.features:#x}",
            "offered_features": f"{self.offered_features:#x}",
            "negotiated_feature_names": protocol.feature_names(self.features),
            "offered_feature_names": protocol.feature_names(self.offered_features),
            "protocol_features": f"{self.protocol_features:#x}",
            "mtu": self.mtu,
            "mtu_refused": self.mtu_refused,
            "status": f"{self.status:#x}",
            "link_up": self._link_up,
            "memory_regions": len(self._regions),
            "memory_mapped": sum(len(r.mapping) for r in self._regions),
            "max_memory": self.max_memory,
            "memory_refused": self.memory_refused,
            "max_mem_slots": protocol.MAX_MEM_SLOTS,
            "mem_regs_added": self.mem_regs_added,
            "mem_regs_removed": self.mem_regs_removed,
            "mem_reg_refused": self.mem_reg_refused,
            "rings_lost_memory": self.rings_lost_memory,
            "dirty_log": self._log_info(),
            "log_refused": self.log_refused,
            "postcopy": self._postcopy_info(),
            **self.fault_counts,
            **({"iotlb": self._iotlb.info()} if self._iotlb is not None else {}),
            "rings": rings,
        }

    def _postcopy_info(self) -> dict:
        registered = [r for r in self._regions if r.uffd_length]
        return {"enabled": self.postcopy, "advised": self._uffd >= 0, "listening": self._postcopy_listening,
                "awaiting_ack": self._postcopy_pending is not None, "registered_regions": len(registered),
                "registered_bytes": sum(r.uffd_length for r in registered), "listens": self.postcopy_listens,
                "ends": self.postcopy_ends, "refused": self.postcopy_refused}

    def _log_info(self) -> dict:
        log_ = self._log
        if log_ is None:
            return {"mapped": False, "logging": False}
        # pending: bits set now, not yet taken by the front-end (it clears what it has synced).
        pending = int.from_bytes(ffi.buffer(log_.c.bitmap, int(log_.c.size)), "little").bit_count()
        return {"mapped": True, "logging": self.dev.log != ffi.NULL, "size": int(log_.c.size),
                "bits_set": int(log_.c.bits_set), "pending": pending, "outside": int(log_.c.outside)}

    def _vring(self, index: int):
        """A `struct vs_vring *` (the C functions take pointers, not struct values)."""
        return self.dev.vrings + index

    def _has_protocol_feature(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << bit))

    @property
    def _protocol_features_negotiated(self) -> bool:
        return bool(self.features & (1 << protocol.VHOST_USER_F_PROTOCOL_FEATURES))

    # ------------------------------------------------------------- messages

    def rule_for(self, request: Request) -> MessageRule | None:
        """The row a request is handled by: its row in MESSAGES, except right
        after a postcopy SET_MEM_TABLE reply, when only the front-end's
        acknowledgement (a SET_MEM_TABLE with a u64) may come."""
        if self._postcopy_pending is not None:
            if request is Request.SET_MEM_TABLE:
                return POSTCOPY_MEM_TABLE_ACK
            raise ProtocolError(f"{request.name}: the front-end must first acknowledge the postcopy memory "
                                "table (a SET_MEM_TABLE with a u64 0)")
        return self.messages.get(request)

    def reply_fds(self, rule: MessageRule, value) -> list[int]:
        """The fds a reply carries: the userfaultfd for POSTCOPY_ADVISE (the device keeps its own)."""
        return [value] if rule.reply is Reply.FD else []

    def handle(self, rule: MessageRule, msg: Message, body):
        """Runs a validated request's handler; returns its reply value (see MessageRule)."""
        self._handling = rule
        try:
            return rule.handler(self, msg, body)
        finally:
            self._handling = None

    def request_done(self) -> None:
        """After each request, before its reply: readiness, so that a
        request's effects are visible once its reply arrives."""
        self._update_link()

    def _wait_for_pmds(self) -> None:
        if self._handling is not None and not self._handling.quiesce:
            raise AssertionError(f"{self._handling.request.name}: the handler waits for the PMDs, "
                                 "but its row in MESSAGES says it does not")
        self._quiesce()

    def disconnected(self) -> None:
        """The front-end is gone: stop everything; a fault it caused is answered."""
        self.teardown()
        lib.vs_vhost_dev_take_fault(self.dev)

    def teardown(self) -> None:
        """Stops every ring, unmaps guest memory and forgets the session."""
        # First: a PMD asleep on a page the front-end will now never send is woken.
        self._postcopy_close()
        if self._postcopy_pending is not None:
            for region in self._postcopy_pending:   # mapped, never published: no PMD saw them
                region.unmap()
        self._stop_rings([r for r in self._rings], close=True)
        self._update_link()
        self.dev.log = ffi.NULL
        if self._log is not None:
            self._reclaim(f"port '{self.name}': dirty log", self._log.unmap)
        close_fds([self.log_fd])
        if self._memtable is not None:
            # The rings are disabled: no new pass reads dev.mem, and the memory
            # goes once the passes that may have read it are over.
            self.dev.mem = ffi.NULL
            self._reclaim(f"port '{self.name}': guest memory",
                          _unmap_all(self._regions, keep_alive=self._memtable))
        if self._iotlb is not None:
            self._iotlb.detach()      # no ring runs: no PMD reads it any more
            self._reclaim(f"port '{self.name}': IOTLB", lambda iotlb=self._iotlb: iotlb.c)
        close_fds([self.backend_req_fd])
        had_mtu = self.mtu is not None
        self._reset_session()
        # The C side forgets them too: a new session's rings start with what it negotiates
        # (the ring layout, packed or split, comes from these bits).
        lib.vs_vhost_dev_set_features(self.dev, 0)
        if had_mtu:
            self._emit("mtu", {"mtu": None})   # the front-end's MTU goes with its session

    def describe_fault(self) -> str | None:
        """Counts the fault bits set on the device and says what they mean; None if none."""
        bits = int(self.dev.fault)
        if not bits:
            return None
        reasons = []
        for bit, counter in FAULT_BITS.items():
            if bits & bit:
                self.fault_counts[counter] += 1
                reasons.append(self._fault_reason(bit))
        if bits & ~KNOWN_FAULT_BITS:
            reasons.append(f"unknown fault bits {bits & ~KNOWN_FAULT_BITS:#x}")
        return "; ".join(reasons)

    def _fault_reason(self, bit: int) -> str:
        if bit == lib.VS_DEV_FAULT_MEMORY:
            for i, region in enumerate(self._regions):
                addr = guestmem.fault_addr(region.slot) if region.slot >= 0 else 0
                if addr:
                    gpa = region.desc.guest_phys_addr + addr - region.address - region.skip
                    return (f"guest memory fault at {addr:#x} in region {i} (guest-physical {gpa:#x}; "
                            "memory truncated or unmapped by the front-end)")
            return "guest memory fault (memory truncated or unmapped by the front-end)"
        if bit == lib.VS_DEV_FAULT_CALL_BLOCKED:
            return "a call fd write would block (the front-end does not read its notifications)"
        return f"fault bit {bit:#x}"

    # --------------------------------------------------------------- handlers
    # Each takes (msg, body) and returns its reply's value or None (see MessageRule).

    def _ring(self, request: Request, index: int) -> _Ring:
        if index >= len(self._rings):
            raise ProtocolError(f"{request.name}: vring index {index} out of range "
                                f"(the port has {len(self._rings)} vrings)")
        return self._rings[index]

    def _get_features(self, msg, body):
        return self.offered_features

    def _set_features(self, msg, features: int):
        unknown = features & ~self.offered_features
        if unknown:
            raise RequestRefused(f"SET_FEATURES: features {unknown:#x} were not offered")
        log_all = 1 << protocol.VHOST_F_LOG_ALL
        if (features ^ self.features) & ~log_all and any(r.started for r in self._rings):
            # The header length the PMD uses may not change under it.
            raise RequestRefused(f"SET_FEATURES: cannot change features {self.features:#x} -> {features:#x} "
                                 "while rings are running")
        # QEMU turns logging on and off while the rings run; the header length cannot change with it.
        self.features = features
        self.features_set = True
        lib.vs_vhost_dev_set_features(self.dev, features)
        self._update_log()
        self._set_iotlb(bool(features & (1 << protocol.VIRTIO_F_ACCESS_PLATFORM)))

    def _set_iotlb(self, wanted: bool) -> None:
        """With ACCESS_PLATFORM, ring and buffer addresses are IOVAs: the rings
        translate them through an IOTLB (no ring runs while features change)."""
        if wanted and self._iotlb is None:
            self._iotlb = DeviceIotlb(self.name, self.dev, lambda: self.backend_req_fd)
            self._iotlb.attach()
        elif not wanted and self._iotlb is not None:
            self._iotlb.detach()
            self._iotlb = None

    def _get_protocol_features(self, msg, body):
        return self.offered_protocol_features

    def _set_protocol_features(self, msg, features: int):
        unknown = features & ~self.offered_protocol_features
        if unknown:
            raise RequestRefused(f"SET_PROTOCOL_FEATURES: protocol features {unknown:#x} were not offered")
        self.protocol_features = features

    def _set_owner(self, msg, body):
        return None

    def _reset_owner(self, msg, body):
        # Deprecated; DPDK resets the device, and so do we, keeping the connection.
        log.info("vhost-user port '%s': RESET_OWNER: resetting the device", self.name)
        self.teardown()

    def _get_queue_num(self, msg, body):
        return self.queues

    def _set_mem_table(self, msg, table: MemoryTable):
        if self._postcopy_listening:
            return self._postcopy_mem_table(msg, table)
        if self._same_memory(table, msg.fds):
            # QEMU resends an unchanged table (e.g. after a device restart); keep the mappings.
            log.debug("vhost-user port '%s': SET_MEM_TABLE unchanged", self.name)
            return None
        self._install_table(self._map_table(table, msg.fds), table)

    def _map_table(self, table: MemoryTable, fds: list[int]) -> list[_MemRegion]:
        """Maps a table's regions (nothing published yet)."""
        plans = [self._plan_region(i, region, fd) for i, (region, fd) in enumerate(zip(table.regions, fds))]
        total = sum(length for _, length in plans)
        if total > self.max_memory:
            self.memory_refused += 1
            raise RequestRefused(f"SET_MEM_TABLE: {total:#x} bytes of guest memory in {len(plans)} regions "
                                 f"exceed the port's max_memory ({self.max_memory:#x} bytes); refused")
        new_regions = []
        try:
            for i, ((start, length), region, fd) in enumerate(zip(plans, table.regions, fds)):
                new_regions.append(self._map_region(i, region, fd, start, length))
        except ProtocolError:
            for mapped in new_regions:
                mapped.unmap()
            raise
        return new_regions

    def _install_table(self, new_regions: list[_MemRegion], table: MemoryTable) -> None:
        """Publishes mapped regions as the memory table; running rings move onto it."""
        memtable = _build_memtable(new_regions)
        running = [r for r in self._rings if r.started]
        self._halt_rings(running, emit=False)
        lib.vs_vhost_dev_set_mem(self.dev, memtable)
        old_regions, old_memtable = self._regions, self._memtable
        self._memtable, self._regions = memtable, new_regions
        if old_regions:
            self._reclaim(f"port '{self.name}': replaced guest memory",
                          _unmap_all(old_regions, keep_alive=old_memtable))
        log.info("vhost-user port '%s': memory table: %s", self.name,
                 ", ".join(f"gpa {r.guest_phys_addr:#x} size {r.size:#x} uva {r.user_addr:#x}" for r in table.regions))
        for ring in running:
            self._start_ring(ring, Request.SET_MEM_TABLE, emit=False)
        for ring in self._rings:
            self._try_start(ring, Request.SET_MEM_TABLE)

    # Postcopy (PROTOCOL_F_PAGEFAULT).

    def _refuse_postcopy(self, request: Request, why: str) -> NoReturn:
        self.postcopy_refused += 1
        raise RequestRefused(f"{request.name}: {why}; refused")

    def _require_pagefault(self, request: Request) -> None:
        if not self.postcopy:
            self._refuse_postcopy(request, "the port does not have `postcopy: true`")
        if not self._has_protocol_feature(ProtocolFeature.PAGEFAULT):
            self._refuse_postcopy(request, "PAGEFAULT was not negotiated")

    def _postcopy_advise(self, msg, body):
        request = Request.POSTCOPY_ADVISE
        self._require_pagefault(request)
        if self._uffd >= 0:
            self._refuse_postcopy(request, "a postcopy migration was already advised")
        try:
            self._uffd = userfault.open_userfaultfd()
        except OSError as exc:
            self._refuse_postcopy(request, f"cannot open a userfaultfd: {exc.strerror or exc}")
        log.info("vhost-user port '%s': POSTCOPY_ADVISE: userfaultfd opened for the front-end", self.name)
        return self._uffd

    def _postcopy_listen(self, msg, body):
        request = Request.POSTCOPY_LISTEN
        self._require_pagefault(request)
        if self._uffd < 0:
            self._refuse_postcopy(request, "no POSTCOPY_ADVISE before it")
        if self._postcopy_listening:
            self._refuse_postcopy(request, "already listening")
        if self._regions:
            # Pages of a table mapped before could be touched by then; QEMU sends its table after LISTEN.
            self._refuse_postcopy(request, "guest memory is already mapped (the memory table must come after it)")
        self._postcopy_listening = True
        self.postcopy_listens += 1
        self._update_log()
        log.info("vhost-user port '%s': POSTCOPY_LISTEN: guest memory will be registered with the userfaultfd",
                 self.name)

    def _postcopy_mem_table(self, msg, table: MemoryTable) -> MemoryTable:
        """Maps the regions, touching nothing, and answers where each one is in the switch."""
        regions = self._map_table(table, msg.fds)
        self._postcopy_pending = regions
        log.info("vhost-user port '%s': postcopy memory table mapped, waiting for the front-end's "
                 "acknowledgement: %s", self.name,
                 ", ".join(f"gpa {r.desc.guest_phys_addr:#x} at {r.region_address:#x}" for r in regions))
        return MemoryTable(tuple(dataclasses.replace(r.desc, user_addr=r.region_address) for r in regions))

    def _postcopy_mem_table_ack(self, msg, value: int):
        regions, self._postcopy_pending = self._postcopy_pending, None
        try:
            if value != 0:
                raise ProtocolError(f"SET_MEM_TABLE: the front-end acknowledged the postcopy memory table "
                                    f"with {value}, not 0")
            for region in regions:
                length = -(-len(region.mapping) // mmap.PAGESIZE) * mmap.PAGESIZE
                try:
                    userfault.register(self._uffd, region.address, length)
                except OSError as exc:
                    raise ProtocolError(f"SET_MEM_TABLE: cannot register {length:#x} bytes at "
                                        f"{region.address:#x} with the userfaultfd: {exc.strerror}") from None
                region.uffd_length = length
        except ProtocolError:
            for region in regions:           # unmapping ends a registration too
                region.unmap()
            raise
        self._install_table(regions, MemoryTable(tuple(r.desc for r in regions)))
        log.info("vhost-user port '%s': postcopy memory table acknowledged; %d regions registered with the "
                 "userfaultfd", self.name, len(regions))

    def _postcopy_end(self, msg, body):
        request = Request.POSTCOPY_END
        self._require_pagefault(request)
        if not self._postcopy_listening:
            self._refuse_postcopy(request, "no POSTCOPY_LISTEN before it")
        self._postcopy_close()
        self.postcopy_ends += 1
        log.info("vhost-user port '%s': POSTCOPY_END: guest memory unregistered, userfaultfd closed", self.name)
        return 0

    def _postcopy_close(self) -> None:
        """Unregisters guest memory from the userfaultfd (waking a PMD asleep on a
        missing page) and closes it; the dirty log may be used again."""
        for region in self._regions:
            if region.uffd_length:
                try:
                    userfault.unregister(self._uffd, region.address, region.uffd_length)
                except OSError as exc:
                    log.warning("vhost-user port '%s': cannot unregister guest memory at %#x from the "
                                "userfaultfd: %s", self.name, region.address, exc.strerror)
                region.uffd_length = 0
        close_fds([self._uffd])
        self._uffd = -1
        was_listening, self._postcopy_listening = self._postcopy_listening, False
        if was_listening:
            self._update_log()

    def _same_memory(self, table: MemoryTable, fds: list[int]) -> bool:
        """True if the table describes the regions already mapped, backed by the same files."""
        if len(table.regions) != len(self._regions):
            return False
        for region, fd, mapped in zip(table.regions, fds, self._regions):
            try:
                st = os.fstat(fd)
            except OSError:
                return False
            if region != mapped.desc or (st.st_dev, st.st_ino) != mapped.file_id:
                return False
        return True

    def _plan_region(self, i: int, region: protocol.MemoryRegion, fd: int,
                     request: Request = Request.SET_MEM_TABLE) -> tuple[int, int]:
        """The file offset and length to map for a region: only the pages it
        covers, from its offset rounded down to the file's page size
        (hugetlbfs wants whole huge pages)."""
        need = region.mmap_offset + region.size
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ProtocolError(f"{request.name}: region {i}: fstat failed: {exc.strerror}") from None
        page = st.st_blksize
        if page < mmap.PAGESIZE or page & (page - 1):
            page = mmap.PAGESIZE
        start = region.mmap_offset - region.mmap_offset % page
        end = (need + page - 1) // page * page
        if stat.S_ISREG(st.st_mode):
            # The file must hold the region; a file cut short later is a fault (guestmem.c).
            if st.st_size < need:
                raise ProtocolError(f"{request.name}: region {i}: offset {region.mmap_offset:#x} + size "
                                    f"{region.size:#x} is past the end of its file ({st.st_size:#x} bytes)")
            end = min(end, st.st_size)
        return start, end - start

    def _map_region(self, i: int, region: protocol.MemoryRegion, fd: int, start: int,
                    length: int, request: Request = Request.SET_MEM_TABLE) -> _MemRegion:
        try:
            st = os.fstat(fd)
            mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"{request.name}: region {i}: mmap of {length:#x} bytes at offset {start:#x} "
                                f"failed: {exc}") from None
        mapped = _MemRegion(mapping, ffi.from_buffer(mapping), region, (st.st_dev, st.st_ino),
                            skip=region.mmap_offset - start, dev=self.dev)
        try:
            mapped.slot = guestmem.register(mapped.buffer, length, self.dev, i)
        except OSError as exc:
            mapped.unmap()
            raise ProtocolError(f"{request.name}: region {i}: cannot watch the mapping for faults: "
                                f"{exc.strerror}") from None
        return mapped

    # Memory hotplug (CONFIGURE_MEM_SLOTS).

    def _require_mem_slots(self, request: Request) -> None:
        if not self._has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise RequestRefused(f"{request.name}: CONFIGURE_MEM_SLOTS was not negotiated")

    def _refused_region(self, error: type[ProtocolError], text: str) -> ProtocolError:
        """Counts a refused ADD_MEM_REG or REM_MEM_REG; returns the error to raise."""
        self.mem_reg_refused += 1
        return error(text)

    def _get_max_mem_slots(self, msg, body):
        self._require_mem_slots(Request.GET_MAX_MEM_SLOTS)
        return protocol.MAX_MEM_SLOTS

    def _add_mem_reg(self, msg, region: protocol.MemoryRegion):
        request = Request.ADD_MEM_REG
        self._require_mem_slots(request)
        fd = msg.fds[0]
        described = _describe_region(region)
        for mapped in self._regions:
            if mapped.desc == region and _file_id(fd) == mapped.file_id:
                # The same region again (a front-end replaying its table): keep the mapping.
                log.debug("vhost-user port '%s': ADD_MEM_REG of a region already mapped: %s", self.name, described)
                return None
        if len(self._regions) >= protocol.MAX_MEM_SLOTS:
            raise self._refused_region(RequestRefused, f"{request.name}: all {protocol.MAX_MEM_SLOTS} memory "
                                                       f"slots are in use; refused {described}")
        for i, mapped in enumerate(self._regions):
            other = mapped.desc
            for what, a, b in (("guest", region.guest_phys_addr, other.guest_phys_addr),
                               ("user", region.user_addr, other.user_addr)):
                if a < b + other.size and b < a + region.size:
                    raise self._refused_region(RequestRefused, f"{request.name}: {described} overlaps region "
                                                               f"{i} ({_describe_region(other)}) in {what} addresses")
        slot = len(self._regions)
        try:
            start, length = self._plan_region(slot, region, fd, request)
        except ProtocolError as exc:
            raise self._refused_region(ProtocolError, str(exc)) from None
        total = sum(len(r.mapping) for r in self._regions) + length
        if total > self.max_memory:
            self.memory_refused += 1
            raise self._refused_region(RequestRefused, f"{request.name}: {described} would bring guest memory "
                                                       f"to {total:#x} bytes, over the port's max_memory "
                                                       f"({self.max_memory:#x} bytes); refused")
        try:
            mapped = self._map_region(slot, region, fd, start, length, request)
        except ProtocolError as exc:
            raise self._refused_region(ProtocolError, str(exc)) from None
        old_memtable = self._install_regions(self._regions + [mapped])
        if old_memtable is not None:
            self._reclaim(f"port '{self.name}': the memory table before ADD_MEM_REG",
                          _unmap_all([], keep_alive=old_memtable))
        self.mem_regs_added += 1
        log.info("vhost-user port '%s': ADD_MEM_REG: %s (%d regions)", self.name, described, len(self._regions))
        # Rings that waited for their memory start once all of it is there.
        for ring in self._rings:
            if self._ready(ring) and self._ring_in_memory(ring):
                self._start_ring(ring, request)

    def _rem_mem_reg(self, msg, region: protocol.MemoryRegion):
        request = Request.REM_MEM_REG
        self._require_mem_slots(request)
        described = _describe_region(region)
        # vhost-user.rst: identified by guest address, user address and size; the offset is ignored.
        matches = [m for m in self._regions
                   if (m.desc.guest_phys_addr, m.desc.user_addr, m.desc.size)
                   == (region.guest_phys_addr, region.user_addr, region.size)]
        if not matches:
            raise self._refused_region(RequestRefused, f"{request.name}: no such region: {described}")
        [removed] = matches
        lost = [r for r in self._rings if r.addr is not None and _ring_lies_in(r.addr, removed.desc)]
        if lost:
            # The front-end must not remove memory that holds rings; if it does, those rings
            # stop before the memory goes, and stay stopped until given new addresses.
            self._halt_rings(lost)
            for ring in lost:
                ring.addr = None
            self.rings_lost_memory += len(lost)
            log.warning("vhost-user port '%s': REM_MEM_REG: %s holds vring %s: stopped", self.name, described,
                        ", ".join(str(r.index) for r in lost))
        old_memtable = self._install_regions([m for m in self._regions if m is not removed])
        # The PMDs may still be reading the region through the old table: both go once they moved on.
        self._reclaim(f"port '{self.name}': removed guest memory ({described})",
                      _unmap_all([removed], keep_alive=old_memtable))
        self.mem_regs_removed += 1
        log.info("vhost-user port '%s': REM_MEM_REG: %s (%d regions left)", self.name, described,
                 len(self._regions))

    def _install_regions(self, regions: list[_MemRegion]):
        """Publishes a memory table of these regions; returns the table it replaced (None if none)."""
        memtable = _build_memtable(regions)
        lib.vs_vhost_dev_set_mem(self.dev, memtable)
        if self._iotlb is not None:
            # Cached translations point into the old table; a new one may reuse its address.
            lib.vs_iotlb_flush_caches(self._iotlb.c)
        old, self._memtable, self._regions = self._memtable, memtable, regions
        return old

    def _ring_in_memory(self, ring: _Ring) -> bool:
        addr = ring.addr
        return all(lib.vs_mem_translate_uva(self._memtable, uva, 1) != ffi.NULL
                   for uva in (addr.desc, addr.avail, addr.used))
    def _set_log_base(self, msg, desc: protocol.LogDescription):
        size, offset = desc.mmap_size, desc.mmap_offset
        where = f"log of {size:#x} bytes at offset {offset:#x}"
        if not self._has_protocol_feature(ProtocolFeature.LOG_SHMFD):
            self._refuse_log(f"{where}: LOG_SHMFD was not negotiated")
        if size == 0:
            self._refuse_log(f"{where}: the log is empty")
        if self._postcopy_listening:
            self._refuse_log(f"{where}: postcopy is listening (a destination does not log)")
        if self._memtable is None or not self._regions:
            self._refuse_log(f"{where}: no memory table yet, nothing to log")
        top = max(r.desc.guest_phys_addr + r.desc.size for r in self._regions)
        need = int(lib.vs_dirty_log_bytes_for(top))
        most = int(lib.vs_dirty_log_bytes_for(top + self.max_memory)) + LOG_SLACK
        if size < need:
            self._refuse_log(f"{where}: too small for guest memory up to {top:#x} ({need:#x} bytes needed)")
        if size > most:
            self._refuse_log(f"{where}: larger than guest memory up to {top:#x} plus the port's max_memory "
                             f"could need ({most:#x} bytes)")
        fd = msg.fds[0]
        try:
            st = os.fstat(fd)
        except OSError as exc:
            self._refuse_log(f"{where}: fstat failed: {exc.strerror}")
        if not stat.S_ISREG(st.st_mode):
            self._refuse_log(f"{where}: the fd is not a shared memory file")
        if offset + size > st.st_size:
            self._refuse_log(f"{where}: past the end of its fd ({st.st_size:#x} bytes)")
        start = offset - offset % mmap.PAGESIZE
        try:
            mapping = mmap.mmap(fd, offset - start + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=start)
        except (OSError, ValueError, OverflowError) as exc:
            self._refuse_log(f"{where}: mmap failed: {exc}")
        buffer = ffi.from_buffer(mapping)
        c_log = ffi.new("struct vs_dirty_log *")
        c_log.bitmap = ffi.cast("uint8_t *", buffer) + (offset - start)
        c_log.size = size
        new = _DirtyLog(mapping, buffer, c_log, dev=self.dev)
        try:
            new.slot = guestmem.register(buffer, len(mapping), self.dev, lib.VS_MAX_MEM_SLOTS)
        except OSError as exc:
            new.unmap()
            self._refuse_log(f"{where}: cannot watch the mapping for faults: {exc.strerror}")
        old, self._log = self._log, new
        self._update_log()
        if old is not None:
            self._reclaim(f"port '{self.name}': replaced dirty log", old.unmap)
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = "?"
        log.info("vhost-user port '%s': dirty log mapped: %s bytes at offset %#x of %s (guest memory up to %#x)",
                 self.name, size, offset, kind, top)

    def _refuse_log(self, why: str) -> NoReturn:
        self.log_refused += 1
        raise RequestRefused(f"SET_LOG_BASE: {why}; refused")

    def _update_log(self) -> None:
        """Points the C device at the log while LOG_ALL is negotiated and a log is mapped.
        A log that stops being used stays mapped: a PMD may still be marking it."""
        logging_on = (self._log is not None and self.features & (1 << protocol.VHOST_F_LOG_ALL)
                      and not self._postcopy_listening)
        self.dev.log = self._log.c if logging_on else ffi.NULL

    def _set_log_fd(self, msg, body):
        old, self.log_fd = self.log_fd, msg.take_fd()
        close_fds([old])

    def _set_vring_num(self, msg, state: VringState):
        ring = self._ring(Request.SET_VRING_NUM, state.index)
        size = state.num
        if size == 0 or size > lib.VS_MAX_RING_SIZE or size & (size - 1):
            raise ProtocolError(f"SET_VRING_NUM: vring {ring.index}: size {size} is not a power of two "
                                f"up to {lib.VS_MAX_RING_SIZE}")
        self._reconfigure(ring, Request.SET_VRING_NUM, lambda: setattr(ring, "size", size))

    def _set_vring_addr(self, msg, addr: VringAddr):
        ring = self._ring(Request.SET_VRING_ADDR, addr.index)
        self._reconfigure(ring, Request.SET_VRING_ADDR, lambda: setattr(ring, "addr", addr))

    def _set_vring_base(self, msg, state: VringState):
        ring = self._ring(Request.SET_VRING_BASE, state.index)
        # A packed ring's base has the used side in its high half (QEMU); vs_packed_setup checks it.
        packed = self.features & (1 << protocol.VIRTIO_F_RING_PACKED)
        if state.num > 0xFFFF and not packed:
            raise ProtocolError(f"SET_VRING_BASE: vring {ring.index}: base {state.num} exceeds 65535")
        self._reconfigure(ring, Request.SET_VRING_BASE, lambda: setattr(ring, "base", state.num))

    def _get_vring_base(self, msg, state: VringState):
        ring = self._ring(Request.GET_VRING_BASE, state.index)
        self._stop_rings([ring], close=True)
        if not self._protocol_features_negotiated:
            ring.enabled = False      # it was enabled by its kick, which is gone
        return VringState(ring.index, ring.base)

    def _set_vring_kick(self, msg, body: VringFd):
        ring = self._ring(Request.SET_VRING_KICK, body.index)
        fd = -1 if body.nofd else _take_eventfd(msg, Request.SET_VRING_KICK, ring.index)

        def apply():
            self._release_fds(f"vring {ring.index} kick fd", [ring.kickfd])
            ring.kickfd = fd
            ring.kick_set = True
            if not self._protocol_features_negotiated:
                ring.enabled = True   # vhost-user.rst: "the ring starts directly in the enabled state"

        self._reconfigure(ring, Request.SET_VRING_KICK, apply)

    def _set_vring_call(self, msg, body: VringFd):
        ring = self._ring(Request.SET_VRING_CALL, body.index)
        fd = -1 if body.nofd else _take_eventfd(msg, Request.SET_VRING_CALL, ring.index)
        old = ring.callfd
        vr = self._vring(ring.index)
        if ring.started:
            # QEMU swaps the call fd whenever the guest masks or unmasks the
            # queue's interrupt; the ring keeps running, with a brief pause.
            lib.vs_vring_set_enabled(vr, 0)
            self._wait_for_pmds()
            vr.callfd = fd
            vr.call_broken = 0        # a new fd: the guest may be notified again
            lib.vs_vring_set_enabled(vr, 0 if self._iotlb and ring.index in self._iotlb.paused else 1)
        else:
            vr.call_broken = 0        # no PMD touches a ring that has not started
        ring.callfd = fd
        ring.call_set = True
        self._release_fds(f"vring {ring.index} call fd", [old])
        self._try_start(ring, Request.SET_VRING_CALL)

    def _set_vring_err(self, msg, body: VringFd):
        ring = self._ring(Request.SET_VRING_ERR, body.index)
        fd = -1 if body.nofd else msg.take_fd()
        close_fds([ring.errfd])
        ring.errfd = fd

    def _set_vring_enable(self, msg, state: VringState):
        ring = self._ring(Request.SET_VRING_ENABLE, state.index)
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: vring {ring.index}: value {state.num} is not 0 or 1")
        ring.enabled = bool(state.num)
        if ring.enabled:
            self._try_start(ring, Request.SET_VRING_ENABLE)
        elif ring.started:
            self._halt_rings([ring])

    def _set_backend_req_fd(self, msg, body):
        old, self.backend_req_fd = self.backend_req_fd, msg.take_fd()
        close_fds([old])

    def _iotlb_msg(self, msg, body: IotlbMsg):
        if self._iotlb is None:
            raise RequestRefused("IOTLB_MSG: VIRTIO_F_ACCESS_PLATFORM was not negotiated")
        self._iotlb.handle(body)
        if body.type == lib.VS_IOTLB_MSG_INVALIDATE:
            # Acknowledged only once no PMD still uses a translation it took away.  A ring
            # whose own addresses went pauses (disabled in C, still started here: no link
            # flap, as Linux flushes its whole IOTLB every few milliseconds) until they
            # translate again.
            hit = self._iotlb.rings_hit(body.iova, body.size)
            for index in hit:
                lib.vs_vring_set_enabled(self._vring(index), 0)
            self._wait_for_pmds()
            self._iotlb.paused.update(hit)
        self._resume_rings()
        for ring in self._rings:
            self._try_start(ring, Request.IOTLB_MSG)
            if ring.started and ring.index % 2 == 0:
                # Asks for the next receive buffers now, while no frame waits for them.
                lib.vs_iotlb_probe_rx(self.dev, self._vring(ring.index), lib.VS_IOTLB_PROBE_DEPTH)

    def _resume_rings(self) -> None:
        """Paused rings run again once their addresses translate (else a MISS goes out):
        where they were if nothing moved, else restarted on the new addresses."""
        packed = bool(self.features & (1 << protocol.VIRTIO_F_RING_PACKED))
        for index in sorted(self._iotlb.paused):
            ring = self._rings[index]
            uvas = self._iotlb.ring_uvas(index, ring.size, ring.addr, packed)
            if uvas is None:
                continue
            self._iotlb.paused.discard(index)
            if uvas == self._iotlb.ring_started_uvas.get(index):
                lib.vs_vring_set_enabled(self._vring(index), 1)
            else:
                self._halt_rings([ring])
                self._try_start(ring, Request.IOTLB_MSG)

    def send_iotlb_misses(self) -> None:
        """Sends the IOTLB misses the PMDs recorded (the guestmem eventfd woke us)."""
        if self._iotlb is not None:
            self._iotlb.send_misses()

    def _get_status(self, msg, body):
        return self.status

    def _set_status(self, msg, status: int):
        if status > 0xFF:
            raise ProtocolError(f"SET_STATUS: status {status:#x} is wider than 8 bits")
        self.status = status

    def _net_set_mtu(self, msg, mtu: int):
        if not 68 <= mtu <= 65535:
            self.mtu_refused += 1
            raise RequestRefused(f"NET_SET_MTU: MTU {mtu} is outside 68..65535")
        self.mtu = mtu
        log.info("vhost-user port '%s': MTU %d (from the front-end)", self.name, mtu)
        self._emit("mtu", {"mtu": mtu})

    def _send_rarp(self, msg, value: int):
        mac = protocol.pack_u64(value)[:6]
        text = ":".join(f"{b:02x}" for b in mac)
        if mac[0] & 1 or not any(mac):
            # No guest has such a MAC; announcing it would teach every switch a broadcast source.
            raise RequestRefused(f"SEND_RARP: {text} is not a unicast MAC address")
        self.rarp_mac = mac
        log.info("vhost-user port '%s': SEND_RARP for %s", self.name, text)
        if self._on_rarp is not None:
            try:
                self._on_rarp(mac)
            except Exception:
                log.exception("vhost-user port '%s': on_rarp failed", self.name)
        self._emit("rarp", {"mac": text})

    # ------------------------------------------------------------------ rings

    def _reconfigure(self, ring: _Ring, request: Request, apply: Callable[[], None]) -> None:
        """Changes a ring's configuration; a running ring is halted first and
        restarted afterwards from where it stopped."""
        if ring.started:
            self._halt_rings([ring])
        apply()
        self._try_start(ring, request)

    def _ready(self, ring: _Ring) -> bool:
        return (not ring.started and ring.enabled and ring.size is not None and ring.addr is not None
                and ring.kick_set and ring.call_set and self._memtable is not None)

    def _try_start(self, ring: _Ring, request: Request) -> None:
        if self._ready(ring):
            self._start_ring(ring, request)

    def _start_ring(self, ring: _Ring, request: Request, emit: bool = True) -> None:
        vr = ffi.addressof(self.dev.vrings, ring.index)
        vr.kickfd = ring.kickfd
        vr.callfd = ring.callfd
        addr = ring.addr
        # The used ring's guest-physical address, for the dirty log (dirty_log.h).
        vr.log_used_gpa = addr.log
        vr.log_used = 1 if addr.flags & (1 << protocol.VHOST_VRING_F_LOG) else 0
        desc, avail, used = addr.desc, addr.avail, addr.used
        if self._iotlb is not None:
            lib.vs_iotlb_flush_caches(self._iotlb.c)   # the memory table may have changed
            packed = bool(self.features & (1 << protocol.VIRTIO_F_RING_PACKED))
            uvas = self._iotlb.ring_uvas(ring.index, ring.size, addr, packed)
            if uvas is None:
                return                # the front-end was asked; an UPDATE starts the ring
            desc, avail, used = uvas
            self._iotlb.ring_started(ring.index, ring.size, addr, packed, uvas)
        resumed = int(vr.resumed_from_used)
        rc = lib.vs_vring_setup(self.dev, ring.index, ring.size, desc, avail, used, ring.base)
        if rc != 0:
            reason = ffi.string(lib.vs_vq_error_name(rc)).decode()
            raise ProtocolError(f"{request.name}: vring {ring.index}: cannot start: {reason} (size {ring.size}, "
                                f"desc {addr.desc:#x}, avail {addr.avail:#x}, used {addr.used:#x})")
        started_at = int(lib.vs_vring_base(vr))   # a packed ring's carries its wrap counters (bits 15 and 31)
        if int(vr.resumed_from_used) != resumed:
            # vs_vring_setup took the index from the used ring in guest memory, or a packed ring's
            # base from its used side (and counted it).
            log.warning("vhost-user port '%s': vring %d: base %#x from the front-end, but the used index is "
                        "%#x: resuming from the used index (a restarted switch or front-end; frames in flight "
                        "may be resent or lost)", self.name, ring.index, ring.base, started_at)
        ring.base = started_at
        lib.vs_vring_set_enabled(vr, 1)
        ring.started = True
        log.info("vhost-user port '%s': vring %d started (size %d, base %d)", self.name, ring.index,
                 ring.size, ring.base)
        if emit:
            self._emit("queue", {"queue": ring.index, "enabled": True})

    def _halt_rings(self, rings: list[_Ring], emit: bool = True) -> None:
        """Disables running rings and waits for the PMDs; records where each stopped."""
        running = [r for r in rings if r.started]
        if not running:
            return
        for ring in running:
            lib.vs_vring_set_enabled(ffi.addressof(self.dev.vrings, ring.index), 0)
        self._wait_for_pmds()
        for ring in running:
            ring.base = int(lib.vs_vring_base(self._vring(ring.index)))
            ring.started = False
            if self._iotlb is not None:
                self._iotlb.ring_stopped(ring.index)
            log.info("vhost-user port '%s': vring %d stopped at %d", self.name, ring.index, ring.base)
            if emit:
                self._emit("queue", {"queue": ring.index, "enabled": False})

    def _stop_rings(self, rings: list[_Ring], close: bool) -> None:
        """Halts rings and forgets their fds and addresses (GET_VRING_BASE, teardown)."""
        self._halt_rings(rings)
        fds = []
        for ring in rings:
            vr = self._vring(ring.index)
            vr.kickfd = -1
            vr.callfd = -1
            ring.addr = None
            if close:
                fds += ring.forget_fds()
        self._release_fds("ring fds", fds)

    def _release_fds(self, what: str, fds: list[int]) -> None:
        """Closes fds a PMD may have read from the ring (kick, call) once it cannot use them."""
        fds = [fd for fd in fds if fd is not None and fd >= 0]
        if fds:
            self._reclaim(f"port '{self.name}': {what}", lambda: close_fds(fds))

    def _update_link(self) -> None:
        """The device is up once the first queue pair runs and, with
        PROTOCOL_F_STATUS, the driver has said DRIVER_OK (DPDK virtio_is_ready)."""
        up = self._rings[0].started and self._rings[1].started
        if up and self._has_protocol_feature(ProtocolFeature.STATUS):
            up = bool(self.status & protocol.STATUS_DRIVER_OK)
        if up != self._link_up:
            self._link_up = up
            log.info("vhost-user port '%s': device %s", self.name, "ready" if up else "not ready")
            self._emit("link", {"up": up})


def _row(request: Request, payload: Payload, fds: Fds, reply: Reply, quiesce: bool, handler: Callable):
    return MessageRule(request, payload, fds, reply, quiesce, handler)


# The message table: one row per request the back-end handles, everything
# about it in one place.  Anything missing is refused as not supported,
# without its payload being parsed (connection.py).
#        request                        payload              fds             reply              quiesce  handler
MESSAGES: dict[Request, MessageRule] = {row.request: row for row in (
    _row(Request.GET_FEATURES,          Payload.NONE,        Fds.NONE,       Reply.U64,         False,   VhostUserDevice._get_features),
    _row(Request.SET_FEATURES,          Payload.U64,         Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._set_features),
    _row(Request.SET_OWNER,             Payload.NONE,        Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._set_owner),
    _row(Request.RESET_OWNER,           Payload.NONE,        Fds.NONE,       Reply.ACK,         True,    VhostUserDevice._reset_owner),
    _row(Request.SET_MEM_TABLE,         Payload.MEMORY,      Fds.PER_REGION, Reply.ACK_OR_MEMORY, True,  VhostUserDevice._set_mem_table),
    _row(Request.SET_LOG_BASE,          Payload.LOG,         Fds.ONE,        Reply.EMPTY,       False,   VhostUserDevice._set_log_base),
    _row(Request.SET_LOG_FD,            Payload.NONE,        Fds.ONE,        Reply.ACK,         False,   VhostUserDevice._set_log_fd),
    _row(Request.SET_VRING_NUM,         Payload.VRING_STATE, Fds.NONE,       Reply.ACK,         True,    VhostUserDevice._set_vring_num),
    _row(Request.SET_VRING_ADDR,        Payload.VRING_ADDR,  Fds.NONE,       Reply.ACK,         True,    VhostUserDevice._set_vring_addr),
    _row(Request.SET_VRING_BASE,        Payload.VRING_STATE, Fds.NONE,       Reply.ACK,         True,    VhostUserDevice._set_vring_base),
    _row(Request.GET_VRING_BASE,        Payload.VRING_STATE, Fds.NONE,       Reply.VRING_STATE, True,    VhostUserDevice._get_vring_base),
    _row(Request.SET_VRING_KICK,        Payload.VRING_FD,    Fds.VRING_FD,   Reply.ACK,         True,    VhostUserDevice._set_vring_kick),
    _row(Request.SET_VRING_CALL,        Payload.VRING_FD,    Fds.VRING_FD,   Reply.ACK,         True,    VhostUserDevice._set_vring_call),
    _row(Request.SET_VRING_ERR,         Payload.VRING_FD,    Fds.VRING_FD,   Reply.ACK,         False,   VhostUserDevice._set_vring_err),
    _row(Request.GET_PROTOCOL_FEATURES, Payload.NONE,        Fds.NONE,       Reply.U64,         False,   VhostUserDevice._get_protocol_features),
    _row(Request.SET_PROTOCOL_FEATURES, Payload.U64,         Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._set_protocol_features),
    _row(Request.GET_QUEUE_NUM,         Payload.NONE,        Fds.NONE,       Reply.U64,         False,   VhostUserDevice._get_queue_num),
    _row(Request.SET_VRING_ENABLE,      Payload.VRING_STATE, Fds.NONE,       Reply.ACK,         True,    VhostUserDevice._set_vring_enable),
    _row(Request.SEND_RARP,             Payload.U64,         Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._send_rarp),
    _row(Request.NET_SET_MTU,           Payload.U64,         Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._net_set_mtu),
    _row(Request.SET_BACKEND_REQ_FD,    Payload.NONE,        Fds.ONE,        Reply.ACK,         False,   VhostUserDevice._set_backend_req_fd),
    _row(Request.IOTLB_MSG,             Payload.IOTLB,       Fds.NONE,       Reply.ACK,         True,    VhostUserDevice._iotlb_msg),
    _row(Request.SET_STATUS,            Payload.U64,         Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._set_status),
    _row(Request.GET_STATUS,            Payload.NONE,        Fds.NONE,       Reply.U64,         False,   VhostUserDevice._get_status),
    _row(Request.GET_MAX_MEM_SLOTS,     Payload.NONE,        Fds.NONE,       Reply.U64,         False,   VhostUserDevice._get_max_mem_slots),
    _row(Request.ADD_MEM_REG,           Payload.MEMORY_REGION, Fds.ONE,      Reply.ACK,         True,    VhostUserDevice._add_mem_reg),
    _row(Request.REM_MEM_REG,           Payload.MEMORY_REGION, Fds.AT_MOST_ONE, Reply.ACK,      True,    VhostUserDevice._rem_mem_reg),
    _row(Request.POSTCOPY_ADVISE,       Payload.NONE,        Fds.NONE,       Reply.FD,          False,   VhostUserDevice._postcopy_advise),
    _row(Request.POSTCOPY_LISTEN,       Payload.NONE,        Fds.NONE,       Reply.ACK,         False,   VhostUserDevice._postcopy_listen),
    _row(Request.POSTCOPY_END,          Payload.NONE,        Fds.NONE,       Reply.U64,         False,   VhostUserDevice._postcopy_end),
)}
VhostUserDevice.messages = MESSAGES

# The front-end's acknowledgement of a postcopy SET_MEM_TABLE reply (rule_for): it
# installs the memory, so it waits for the PMDs like any memory table.
POSTCOPY_MEM_TABLE_ACK = _row(Request.SET_MEM_TABLE, Payload.U64, Fds.NONE, Reply.ACK, True,
                              VhostUserDevice._postcopy_mem_table_ack)
