"""The control-plane side of a device's IOTLB, for a guest behind a vIOMMU
(VIRTIO_F_ACCESS_PLATFORM, offered only with the port's `iommu: true`).

The table itself is C (vswitch/vhost/iotlb.[ch]), read by the PMDs.  Here:
VHOST_USER_IOTLB_MSG from the front-end (UPDATE, INVALIDATE; anything else
is refused), the ring addresses (IOVAs once ACCESS_PLATFORM is negotiated)
turned into the front-end's addresses for vs_vring_setup, and the misses
the PMDs record sent back as VHOST_USER_BACKEND_IOTLB_MSG MISS on the
back-end request channel.  The device (device.py) decides when: it starts a
ring once its addresses translate, retries after each UPDATE, and waits for
the PMDs after an INVALIDATE before it acknowledges it.

Threading: the daemon's asyncio loop, like device.py.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.protocol import BackendRequest, IotlbMsg, RequestRefused

log = logging.getLogger(__name__)

# A miss the front-end has not answered is asked again after this long.
MISS_RESEND_SECONDS = 0.1

ACCESS_NAMES = {lib.VS_IOTLB_ACCESS_RO: "ro", lib.VS_IOTLB_ACCESS_WO: "wo", lib.VS_IOTLB_ACCESS_RW: "rw"}

# Refusal reasons (enum vs_iotlb_error) as counter names.
REFUSAL_COUNTERS = {
    lib.VS_IOTLB_ERR_SIZE: "size_zero",
    lib.VS_IOTLB_ERR_WRAP: "wraps",
    lib.VS_IOTLB_ERR_PERM: "bad_perm",
    lib.VS_IOTLB_ERR_OVERLAP: "overlaps",
    lib.VS_IOTLB_ERR_OUTSIDE: "outside_memory",
}


def ring_parts(size: int, addr: protocol.VringAddr, packed: bool) -> list[tuple[str, int, int, int]]:
    """The ring's parts as (name, iova, length, access needed), in vs_vring_setup's order.
    The device writes the used ring and, in a packed ring, the descriptors and its event area."""
    ro, rw = lib.VS_IOTLB_ACCESS_RO, lib.VS_IOTLB_ACCESS_RW
    if packed:
        return [("desc", addr.desc, 16 * size, rw), ("driver event", addr.avail, 4, ro),
                ("device event", addr.used, 4, rw)]
    return [("desc", addr.desc, 16 * size, ro), ("avail", addr.avail, 4 + 2 * size + 2, ro),
            ("used", addr.used, 4 + 8 * size + 2, rw)]


class DeviceIotlb:
    """One session's IOTLB.  backend_fd() gives the back-end request channel (-1: none)."""

    def __init__(self, name: str, dev, backend_fd: Callable[[], int]):
        self.name = name
        self.dev = dev
        self.c = ffi.new("struct vs_iotlb *")
        lib.vs_iotlb_init(self.c)
        self._backend_fd = backend_fd
        self._asked: dict[tuple[int, int], float] = {}   # (page, access) -> when its MISS went
        self.ring_iovas: dict[int, list[tuple[int, int]]] = {}   # started ring -> its (iova, length)s
        self.ring_started_uvas: dict[int, tuple[int, int, int]] = {}   # started ring -> what it runs on
        self.paused: set[int] = set()    # started rings an invalidation took the addresses of
        self.unknown_type = 0
        self.misses_sent = 0
        self.miss_send_failed = 0
        self.rings_refused = 0

    def attach(self) -> None:
        self.dev.iotlb = self.c

    def detach(self) -> None:
        self.dev.iotlb = ffi.NULL

    # ------------------------------------------------------------ messages

    def handle(self, msg: IotlbMsg) -> None:
        """An IOTLB_MSG from the front-end; RequestRefused with one line if it is refused."""
        if msg.type == lib.VS_IOTLB_MSG_UPDATE:
            rc = lib.vs_iotlb_update(self.c, self.dev.mem, msg.iova, msg.size, msg.uaddr, msg.perm)
            if rc not in (lib.VS_IOTLB_OK, lib.VS_IOTLB_DUPLICATE):
                reason = ffi.string(lib.vs_iotlb_error_name(rc)).decode()
                raise RequestRefused(f"IOTLB_MSG: UPDATE iova {msg.iova:#x} size {msg.size:#x} uaddr "
                                     f"{msg.uaddr:#x} perm {msg.perm}: {reason}; refused")
        elif msg.type == lib.VS_IOTLB_MSG_INVALIDATE:
            lib.vs_iotlb_invalidate(self.c, msg.iova, msg.size)
            self._asked.clear()      # what was answered may be gone: ask again at once
        else:
            self.unknown_type += 1
            raise RequestRefused(f"IOTLB_MSG: unknown type {msg.type} (only UPDATE {lib.VS_IOTLB_MSG_UPDATE} and "
                                 f"INVALIDATE {lib.VS_IOTLB_MSG_INVALIDATE} go to the back-end); refused")

    def rings_hit(self, iova: int, size: int) -> list[int]:
        """Started rings with a part in [iova, iova + size) (size 0 or a wrap: to the end)."""
        last = (1 << 64) - 1 if size == 0 or iova + size - 1 >= 1 << 64 else iova + size - 1
        return [index for index, parts in self.ring_iovas.items()
                if any(start <= last and iova <= start + length - 1 for start, length in parts)]

    # --------------------------------------------------------------- rings

    def ring_uvas(self, index: int, size: int, addr: protocol.VringAddr, packed: bool) -> tuple[int, int, int] | None:
        """The front-end addresses of a ring's parts, or None: a MISS was sent for the first
        IOVA without an entry, or a part is mapped without the access it needs (logged, counted)."""
        uvas = []
        missing = ffi.new("uint64_t *")
        missing_perm = ffi.new("uint32_t *")
        for name, iova, length, access in ring_parts(size, addr, packed):
            uva = lib.vs_iotlb_translate_uva(self.c, iova, length, access, missing, missing_perm)
            if uva == 0:
                if missing_perm[0] == 0:
                    self.rings_refused += 1
                    log.warning("vhost-user port '%s': vring %d: %s at iova %#x is mapped without %s access "
                                "or not contiguously; the ring waits for a new mapping", self.name, index, name,
                                missing[0], ACCESS_NAMES[access])
                else:
                    self.ask(missing[0], missing_perm[0])
                return None
            uvas.append(uva)
        return uvas[0], uvas[1], uvas[2]

    def ring_started(self, index: int, size: int, addr: protocol.VringAddr, packed: bool,
                     uvas: tuple[int, int, int]) -> None:
        self.ring_iovas[index] = [(iova, length) for _, iova, length, _ in ring_parts(size, addr, packed)]
        self.ring_started_uvas[index] = uvas

    def ring_stopped(self, index: int) -> None:
        self.ring_iovas.pop(index, None)
        self.ring_started_uvas.pop(index, None)
        self.paused.discard(index)

    # -------------------------------------------------------------- misses

    def send_misses(self) -> None:
        """Sends the miss the PMDs recorded, if any (called when the guestmem eventfd wakes us)."""
        iova = ffi.new("uint64_t *")
        perm = ffi.new("uint32_t *")
        while lib.vs_iotlb_take_miss(self.c, iova, perm):
            self.ask(iova[0], perm[0])

    def ask(self, iova: int, perm: int) -> None:
        """Sends a MISS for iova, unless the same was asked a moment ago."""
        key = (iova & ~0xFFF, perm)
        now = time.monotonic()
        if now - self._asked.get(key, -MISS_RESEND_SECONDS) < MISS_RESEND_SECONDS:
            return
        self._asked[key] = now
        fd = self._backend_fd()
        message = protocol.HEADER.pack(BackendRequest.IOTLB_MSG, protocol.VERSION, protocol.IOTLB_MSG.size) + \
            protocol.pack_iotlb_msg(iova, 0, 0, perm, lib.VS_IOTLB_MSG_MISS)
        try:
            if fd < 0:
                raise OSError("no back-end request channel")
            os.set_blocking(fd, False)   # the front-end's side is its own file description
            if os.write(fd, message) != len(message):
                raise OSError("short write")
        except OSError as exc:
            self.miss_send_failed += 1
            log.warning("vhost-user port '%s': cannot send IOTLB MISS for iova %#x: %s", self.name, iova, exc)
            return
        self.misses_sent += 1
        log.debug("vhost-user port '%s': IOTLB MISS iova %#x perm %d", self.name, iova, perm)

    def info(self) -> dict:
        c = self.c
        return {
            "entries": int(c.nentries),
            "updates": int(c.updates),
            "invalidations": int(c.invalidations),
            "evictions": int(c.evictions),
            "duplicates": int(c.refused[lib.VS_IOTLB_DUPLICATE]),
            "misses": int(c.misses),
            "misses_sent": self.misses_sent,
            "miss_send_failed": self.miss_send_failed,
            "perm_denied": int(c.perm_denied),
            "outside_memory_lookups": int(c.outside),
            "rings_refused": self.rings_refused,
            "refused": {**{name: int(c.refused[err]) for err, name in REFUSAL_COUNTERS.items()},
                        "unknown_type": self.unknown_type},
        }
