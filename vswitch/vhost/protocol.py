"""The vhost-user wire format: requests, header, payloads and their validation.

Reference: QEMU docs/interop/vhost-user.rst.  A message is a 12-byte header
(u32 request, u32 flags, u32 size) followed by `size` bytes of payload, in the
machine's native byte order, with file descriptors passed as SCM_RIGHTS
ancillary data.

This module knows the syntax only: what a request's payload looks like, how
many file descriptors it may carry, and whether the numbers in it are
well-formed.  Whether a request makes sense in the current device state is
the device's business (vswitch/vhost/device.py).  Every failure raises
ProtocolError with a one-line message that names the request, so that a log
line says exactly what the front-end got wrong.

It is shared by the back-end (parse_header, parse_payload, encode_reply; the
row type of its message table, MessageRule) and by the test front-end
(encode_message, the pack_* helpers, parse_reply).  Feature bits and limits
the C fast path uses too come from vswitch/vhost/virtio.h through `lib`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable

from vswitch.native import lib


class ProtocolError(Exception):
    """A message that breaks the protocol; the back-end closes the connection."""


class RequestRefused(ProtocolError):
    """A well-formed request the back-end will not perform (unknown request,
    features it did not offer, a value out of range).  With NEED_REPLY the
    front-end gets a failure ack and the connection stays open; without it,
    the connection is closed, as DPDK does."""


class Request(enum.IntEnum):
    """Front-end to back-end request codes (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


def request_name(code: int) -> str:
    """A printable name for any request code, known or not."""
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


# Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

# SET_VRING_KICK / CALL / ERR payload: bits 0-7 vring index, bit 8 "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100

MAX_MEM_REGIONS = lib.VS_MAX_MEM_REGIONS
# With CONFIGURE_MEM_SLOTS, regions come one by one (ADD_MEM_REG) up to this many.
MAX_MEM_SLOTS = lib.VS_MAX_MEM_SLOTS
MAX_FDS_PER_MESSAGE = MAX_MEM_REGIONS
# Largest payload we read: big enough for every request the spec defines
# (GET_CONFIG carries up to 256 bytes of config space plus 12), so that an
# unsupported request can still be read whole and refused politely.
MAX_PAYLOAD_SIZE = 4096

U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")      # index, flags, desc, used, avail, log
LOG = struct.Struct("=QQ")                 # SET_LOG_BASE: mmap_size, mmap_offset
MEMORY_HEADER = struct.Struct("=II")       # nregions, padding
MEMORY_REGION = struct.Struct("=QQQQ")     # guest_phys_addr, size, user_addr, mmap_offset
SINGLE_MEMORY_REGION = struct.Struct("=QQQQQ")  # padding, then a region (ADD_MEM_REG, REM_MEM_REG)
IOTLB_MSG = struct.Struct("=QQQBB6x")      # iova, size, uaddr, perm, type (struct vhost_iotlb_msg)


class BackendRequest(enum.IntEnum):
    """Back-end to front-end request codes, sent on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1


# --- virtio feature bits (virtio 1.x and vhost-user) --------------------------
# Defined once, in vswitch/vhost/virtio.h, for C and Python alike.

VIRTIO_NET_F_CSUM = lib.VIRTIO_NET_F_CSUM
VIRTIO_NET_F_GUEST_CSUM = lib.VIRTIO_NET_F_GUEST_CSUM
VIRTIO_NET_F_MTU = lib.VIRTIO_NET_F_MTU
VIRTIO_NET_F_GUEST_TSO4 = lib.VIRTIO_NET_F_GUEST_TSO4
VIRTIO_NET_F_GUEST_TSO6 = lib.VIRTIO_NET_F_GUEST_TSO6
VIRTIO_NET_F_GUEST_ECN = lib.VIRTIO_NET_F_GUEST_ECN
VIRTIO_NET_F_HOST_TSO4 = lib.VIRTIO_NET_F_HOST_TSO4
VIRTIO_NET_F_HOST_TSO6 = lib.VIRTIO_NET_F_HOST_TSO6
VIRTIO_NET_F_HOST_ECN = lib.VIRTIO_NET_F_HOST_ECN
VIRTIO_NET_F_MRG_RXBUF = lib.VIRTIO_NET_F_MRG_RXBUF
VIRTIO_NET_F_CTRL_VQ = lib.VIRTIO_NET_F_CTRL_VQ
VIRTIO_NET_F_GUEST_ANNOUNCE = lib.VIRTIO_NET_F_GUEST_ANNOUNCE
VIRTIO_NET_F_MQ = lib.VIRTIO_NET_F_MQ
VHOST_F_LOG_ALL = lib.VHOST_F_LOG_ALL
VHOST_VRING_F_LOG = lib.VHOST_VRING_F_LOG
VIRTIO_F_ANY_LAYOUT = lib.VIRTIO_F_ANY_LAYOUT
VIRTIO_RING_F_INDIRECT_DESC = lib.VIRTIO_RING_F_INDIRECT_DESC
VIRTIO_RING_F_EVENT_IDX = lib.VIRTIO_RING_F_EVENT_IDX
VHOST_USER_F_PROTOCOL_FEATURES = lib.VHOST_USER_F_PROTOCOL_FEATURES
VIRTIO_F_VERSION_1 = lib.VIRTIO_F_VERSION_1
VIRTIO_F_ACCESS_PLATFORM = lib.VIRTIO_F_ACCESS_PLATFORM
VIRTIO_F_RING_PACKED = lib.VIRTIO_F_RING_PACKED
VIRTIO_F_IN_ORDER = lib.VIRTIO_F_IN_ORDER


def bits(*numbers: int) -> int:
    """A mask with the given bit numbers set."""
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


# What the back-end offers.  IN_ORDER: the ring engine uses buffers in the
# order they were made available (virtqueue.c, packed_ring.c).  RING_PACKED:
# packed rings in both directions (packed_ring.c).  Checksum and TCP segmentation
# offloads both ways (CSUM/HOST_TSO*: the guest may send partial checksums
# and 64 KiB TCP frames; GUEST_*: it takes them): a destination that did not
# negotiate one gets the work done in software (vswitch/pmd/offload.c).  No
# UFO: Linux guests no longer use it.  MTU: QEMU passes its host_mtu to the
# guest, and sends VHOST_USER_NET_SET_MTU, only when this bit is negotiated.
# LOG_ALL: live migration; while it is negotiated and SET_LOG_BASE gave a
# log, every page the switch writes in guest memory is logged (dirty_log.h).
# GUEST_ANNOUNCE: after a migration (or QMP announce-self) QEMU asks a guest
# that negotiated it to send gratuitous ARPs itself, through its control
# queue, which QEMU emulates; they are switched like any frame.  QEMU's
# vhost-net passes the bit through (user_feature_bits) and sends SEND_RARP
# only to a guest without it.
OFFERED_FEATURES = bits(
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
)


# What a port's `features:` key may turn off, by name, and the bits each
# covers.  A name takes with it what depends on its bits (virtio 5.1.3.1):
# TSO and ECN need checksum offload, MQ and GUEST_ANNOUNCE need the control
# queue.  Masking a
# bit that is not offered is harmless, so `packed` may be turned off whether
# packed rings are offered or not.
FEATURE_GROUPS = {
    "csum": bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                 VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN,
                 VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN),
    "tso": bits(VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN),
    "mrg_rxbuf": bits(VIRTIO_NET_F_MRG_RXBUF),
    "ctrl_vq": bits(VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VIRTIO_NET_F_GUEST_ANNOUNCE),
    "mq": bits(VIRTIO_NET_F_MQ),
    "indirect": bits(VIRTIO_RING_F_INDIRECT_DESC),
    "event_idx": bits(VIRTIO_RING_F_EVENT_IDX),
    "in_order": bits(VIRTIO_F_IN_ORDER),
    "packed": bits(VIRTIO_F_RING_PACKED),
    # Without it QEMU sends SEND_RARP and the switch announces the guest (pmd.h vs_port_announce).
    "guest_announce": bits(VIRTIO_NET_F_GUEST_ANNOUNCE),
}

# Each feature bit's name, as `vswitchctl show` prints it.
FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "csum", VIRTIO_NET_F_GUEST_CSUM: "guest_csum",
    VIRTIO_NET_F_GUEST_TSO4: "guest_tso4", VIRTIO_NET_F_GUEST_TSO6: "guest_tso6",
    VIRTIO_NET_F_GUEST_ECN: "guest_ecn", VIRTIO_NET_F_HOST_TSO4: "host_tso4",
    VIRTIO_NET_F_HOST_TSO6: "host_tso6", VIRTIO_NET_F_HOST_ECN: "host_ecn",
    VIRTIO_NET_F_MRG_RXBUF: "mrg_rxbuf", VIRTIO_NET_F_CTRL_VQ: "ctrl_vq", VIRTIO_NET_F_MQ: "mq",
    VIRTIO_NET_F_GUEST_ANNOUNCE: "guest_announce",
    VHOST_F_LOG_ALL: "log_all", VIRTIO_F_ANY_LAYOUT: "any_layout",
    VIRTIO_RING_F_INDIRECT_DESC: "indirect_desc", VIRTIO_RING_F_EVENT_IDX: "event_idx",
    VHOST_USER_F_PROTOCOL_FEATURES: "protocol_features", VIRTIO_F_VERSION_1: "version_1",
    VIRTIO_F_RING_PACKED: "ring_packed", VIRTIO_F_IN_ORDER: "in_order",
    VIRTIO_F_ACCESS_PLATFORM: "access_platform",
}


def feature_names(features: int) -> list[str]:
    """The names of the bits set in a feature mask, lowest bit first (`bit40` for one without a name)."""
    return [FEATURE_NAMES.get(bit, f"bit{bit}") for bit in range(64) if features >> bit & 1]


def disabled_features(features: dict | None) -> int:
    """The bits a port's `features:` key turns off."""
    mask = 0
    for name, on in (features or {}).items():
        if not on:
            mask |= FEATURE_GROUPS[name]
    return mask


class ProtocolFeature(enum.IntEnum):
    """vhost-user protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# PAGEFAULT (postcopy live migration, POSTCOPY_ADVISE/LISTEN/END) is offered
# only by ports with `postcopy: true` (VhostUserDevice.offered_protocol_features).
# LOG_SHMFD: the dirty log comes as a shared memory fd (SET_LOG_BASE); QEMU
# refuses to migrate a guest whose back-end lacks it.  RARP: after a
# migration QEMU sends SEND_RARP to the destination (a guest without
# GUEST_ANNOUNCE), and the switch sends a RARP frame from the guest's MAC
# out of the other ports of its VLAN, as if the guest had sent it.
OFFERED_PROTOCOL_FEATURES = bits(
    ProtocolFeature.MQ,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.RARP,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.NET_MTU,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.STATUS,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)

# Virtio device status bits (virtio 1.x, 2.1), carried by SET/GET_STATUS.
STATUS_ACKNOWLEDGE = 0x1
STATUS_DRIVER = 0x2
STATUS_DRIVER_OK = 0x4
STATUS_FEATURES_OK = 0x8


# --- payloads ----------------------------------------------------------------

class Payload(enum.Enum):
    """The payload shapes of vhost-user.rst, "Payload"."""

    NONE = "none"
    U64 = "u64"
    VRING_STATE = "vring state"
    VRING_ADDR = "vring address"
    VRING_FD = "u64 vring index and flags"    # SET_VRING_KICK / CALL / ERR
    MEMORY = "memory regions"
    MEMORY_REGION = "single memory region"    # ADD_MEM_REG / REM_MEM_REG
    LOG = "log description"                   # SET_LOG_BASE: u64 mmap size, u64 mmap offset
    IOTLB = "IOTLB message"


class Fds(enum.Enum):
    """How many file descriptors a request carries."""

    NONE = "none"
    ONE = "exactly one"
    VRING_FD = "one unless the NOFD bit is set"
    PER_REGION = "one per memory region"
    AT_MOST_ONE = "none, or one that is closed unused"   # REM_MEM_REG: the spec tolerates a stray fd


class Reply(enum.Enum):
    """What the back-end answers a request with."""

    ACK = "a REPLY_ACK u64 (0: done), if the front-end set NEED_REPLY"
    U64 = "u64"
    VRING_STATE = "vring state"
    EMPTY = "an empty reply, always (SET_LOG_BASE with LOG_SHMFD)"
    FD = "an empty reply carrying one fd, always (POSTCOPY_ADVISE: the userfaultfd)"
    ACK_OR_MEMORY = ("an ACK, or while postcopy listens the back-end's own memory table, always "
                     "(SET_MEM_TABLE: the front-end acknowledges it with a SET_MEM_TABLE of a u64 0)")


@dataclass(frozen=True)
class MessageRule:
    """One row of the message table (vswitch/vhost/device.py: MESSAGES): all
    the back-end knows about a request it handles.

    quiesce: the request may change what the PMD threads read (guest memory,
    ring addresses, ring fds), so its handler halts or pauses the running
    rings it changes and waits for the PMDs before it applies the change.  A
    request without it must not touch anything a PMD reads; its handler is
    not allowed to wait for the PMDs (the device checks).
    handler: called as handler(device, message, body); returns the reply's
    value (an int for U64, a VringState for VRING_STATE) or None (ACK)."""

    request: Request
    payload: Payload
    fds: Fds
    reply: Reply
    quiesce: bool
    handler: Callable


@dataclass(frozen=True)
class Header:
    request: int          # the raw code: it may be one we do not know
    flags: int
    size: int

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int             # front-end virtual addresses of the three rings
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class VringFd:
    index: int
    nofd: bool            # no fd attached: the ring is polled


@dataclass(frozen=True)
class MemoryRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class LogDescription:
    mmap_size: int        # bytes of log, from mmap_offset in the fd
    mmap_offset: int


@dataclass(frozen=True)
class IotlbMsg:
    iova: int
    size: int
    uaddr: int
    perm: int             # lib.VS_IOTLB_ACCESS_*
    type: int             # lib.VS_IOTLB_MSG_*


@dataclass(frozen=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


U64_MAX = (1 << 64) - 1


def parse_header(data: bytes) -> Header:
    """Decode and check a request header: version 1, no reply bit, no unknown
    flags, and a payload size we are willing to read."""
    request, flags, size = HEADER.unpack(data)
    name = request_name(request)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"{name}: bad version {flags & VERSION_MASK} in flags {flags:#x} (expected 1)")
    if flags & FLAG_REPLY:
        raise ProtocolError(f"{name}: a request must not carry the reply flag (flags {flags:#x})")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"{name}: unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"{name}: payload size {size} exceeds the {MAX_PAYLOAD_SIZE}-byte limit")
    return Header(request, flags, size)


def _expect_size(name: str, payload: bytes, expected: int, what: str) -> None:
    if len(payload) != expected:
        raise ProtocolError(f"{name}: payload is {len(payload)} bytes, expected {expected} ({what})")


def parse_payload(rule: MessageRule, payload: bytes, nfds: int):
    """Check the payload size and the number of attached fds of a request
    the back-end handles (its row in the message table), and decode the
    payload.  Returns None, an int, or one of the payload dataclasses above."""
    name = rule.request.name
    body = _decode(rule.payload, name, payload)
    expected_fds = _expected_fds(rule.fds, body)
    if rule.fds is Fds.AT_MOST_ONE and nfds <= 1:
        return body
    if nfds != expected_fds:
        raise ProtocolError(f"{name}: {nfds} file descriptors attached, expected {expected_fds} ({rule.fds.value})")
    return body


def _decode(shape: Payload, name: str, payload: bytes):
    if shape is Payload.NONE:
        _expect_size(name, payload, 0, "no payload")
        return None
    if shape is Payload.U64:
        _expect_size(name, payload, U64.size, "u64")
        return U64.unpack(payload)[0]
    if shape is Payload.VRING_STATE:
        _expect_size(name, payload, VRING_STATE.size, "vring state")
        return VringState(*VRING_STATE.unpack(payload))
    if shape is Payload.VRING_ADDR:
        _expect_size(name, payload, VRING_ADDR.size, "vring address")
        index, flags, desc, used, avail, log = VRING_ADDR.unpack(payload)
        return VringAddr(index, flags, desc, used, avail, log)
    if shape is Payload.VRING_FD:
        _expect_size(name, payload, U64.size, "u64 vring index and flags")
        value = U64.unpack(payload)[0]
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise ProtocolError(f"{name}: unknown bits {value & ~(VRING_INDEX_MASK | VRING_NOFD):#x} in {value:#x}")
        return VringFd(value & VRING_INDEX_MASK, bool(value & VRING_NOFD))
    if shape is Payload.MEMORY:
        return _decode_memory(name, payload)
    if shape is Payload.MEMORY_REGION:
        _expect_size(name, payload, SINGLE_MEMORY_REGION.size, "single memory region")
        region = MemoryRegion(*SINGLE_MEMORY_REGION.unpack(payload)[1:])
        _check_region(name, "the region", region)
        return region
    if shape is Payload.LOG:
        _expect_size(name, payload, LOG.size, "log description")
        return LogDescription(*LOG.unpack(payload))
    if shape is Payload.IOTLB:
        # Only the syntax: what the type and the numbers mean is the IOTLB's business (iotlb.py).
        _expect_size(name, payload, IOTLB_MSG.size, "struct vhost_iotlb_msg")
        return IotlbMsg(*IOTLB_MSG.unpack(payload))
    raise AssertionError(shape)


def _decode_memory(name: str, payload: bytes) -> MemoryTable:
    if len(payload) < MEMORY_HEADER.size:
        raise ProtocolError(f"{name}: payload is {len(payload)} bytes, too short for a memory table")
    nregions, _padding = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise ProtocolError(f"{name}: {nregions} memory regions, expected 1 to {MAX_MEM_REGIONS}")
    _expect_size(name, payload, MEMORY_HEADER.size + nregions * MEMORY_REGION.size,
                 f"{nregions} memory regions")
    regions = []
    for i in range(nregions):
        region = MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
        _check_region(name, f"region {i}", region)
        # Overlapping regions would make an address mean two places; no front-end sends them.
        for j, other in enumerate(regions):
            for what, a, b in (("guest", region.guest_phys_addr, other.guest_phys_addr),
                               ("user", region.user_addr, other.user_addr)):
                if a < b + other.size and b < a + region.size:
                    raise ProtocolError(f"{name}: region {i} overlaps region {j} in {what} addresses")
        regions.append(region)
    return MemoryTable(tuple(regions))


def _check_region(name: str, which: str, region: MemoryRegion) -> None:
    if region.size == 0:
        raise ProtocolError(f"{name}: {which} has size 0")
    # The end of a region must be representable, in every address space it lives in.
    for what, start in (("guest address", region.guest_phys_addr), ("user address", region.user_addr),
                        ("mmap offset", region.mmap_offset)):
        if start + region.size - 1 > U64_MAX:
            raise ProtocolError(f"{name}: {which} {what} {start:#x} + size {region.size:#x} overflows")


def _expected_fds(rule: Fds, body) -> int:
    if rule is Fds.NONE:
        return 0
    if rule is Fds.ONE:
        return 1
    if rule is Fds.VRING_FD:
        return 0 if body.nofd else 1
    if rule is Fds.PER_REGION:
        return len(body.regions)
    if rule is Fds.AT_MOST_ONE:
        return 0
    raise AssertionError(rule)


# --- encoding (replies from the back-end, requests from the test front-end) ----

def encode_reply_value(rule: MessageRule, value) -> bytes | None:
    """The payload of a handler's reply, as its row says; None for ACK rows."""
    if rule.reply is Reply.ACK:
        if value is not None:
            raise AssertionError(f"{rule.request.name}: the handler returned {value!r}, but its row says ACK")
        return None
    if rule.reply is Reply.U64:
        return pack_u64(value)
    if rule.reply is Reply.VRING_STATE:
        return pack_vring_state(value.index, value.num)
    if rule.reply is Reply.ACK_OR_MEMORY:
        return None if value is None else pack_memory_table(value.regions)
    if rule.reply is Reply.FD:
        return b""                   # the fd goes with it (connection.py)
    if rule.reply is Reply.EMPTY:
        if value is not None:
            raise AssertionError(f"{rule.request.name}: the handler returned {value!r}, but its row says EMPTY")
        return b""
    raise AssertionError(rule.reply)


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def encode_message(request: int, payload: bytes = b"", *, flags: int = VERSION, size: int | None = None) -> bytes:
    """A request as a front-end sends it.  `size` overrides the header's size
    field, so tests can lie about it."""
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def pack_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def pack_vring_addr(index: int, desc: int, used: int, avail: int, *, flags: int = 0, log: int = 0) -> bytes:
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


def pack_log(mmap_size: int, mmap_offset: int) -> bytes:
    return LOG.pack(mmap_size, mmap_offset)


def pack_vring_fd(index: int, nofd: bool = False) -> bytes:
    return U64.pack(index | (VRING_NOFD if nofd else 0))


def pack_iotlb_msg(iova: int, size: int, uaddr: int, perm: int, type_: int) -> bytes:
    return IOTLB_MSG.pack(iova, size, uaddr, perm, type_)


def pack_memory_table(regions: list[MemoryRegion] | tuple[MemoryRegion, ...]) -> bytes:
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset) for r in regions)


def pack_memory_region(region: MemoryRegion) -> bytes:
    """The payload of ADD_MEM_REG and REM_MEM_REG."""
    return SINGLE_MEMORY_REGION.pack(0, region.guest_phys_addr, region.size, region.user_addr, region.mmap_offset)


def parse_reply(expected_request: int, data: bytes) -> bytes:
    """Check a reply header against the request it answers; return its payload."""
    request, flags, size = HEADER.unpack_from(data)
    if request != expected_request:
        raise ProtocolError(f"{request_name(expected_request)}: reply is for {request_name(request)}")
    if flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY:
        raise ProtocolError(f"{request_name(expected_request)}: bad reply flags {flags:#x}")
    if len(data) != HEADER_SIZE + size:
        raise ProtocolError(f"{request_name(expected_request)}: reply size {size} does not match {len(data) - HEADER_SIZE}")
    return data[HEADER_SIZE:]
