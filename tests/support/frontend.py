"""An in-process vhost-user front-end, in Python: the part DPDK virtio-user
or QEMU plays, built on the mock guest driver (virtio_driver.py).

It talks to a back-end over a real UNIX socket with real fd passing: guest
memory is a memfd sent with SET_MEM_TABLE, kick and call are eventfds.  It
is blocking and meant to run on the test's thread while the back-end's
asyncio loop runs on another.

Typical use:

    fe = VhostUserFrontend(path, queues=2, disable_features=bits(VIRTIO_NET_F_MRG_RXBUF))
    fe.connect()              # or fe.accept() for a back-end in client mode
    fe.handshake()            # GET_FEATURES ... SET_STATUS DRIVER_OK
    fe.send_frame(0, frame)   # guest TX on queue pair 0
    fe.post_rx(0, 16)         # guest RX buffers
    frames = fe.receive(0)
    fe.close()

Fault injection: `handshake(stop_before=Request.SET_MEM_TABLE)` stops half
way (close the front-end to disconnect mid-handshake); `truncate_memory`
takes the guest memory away under the back-end's mappings; `send_message` sends
anything, with any flags, any size field and any fds; `request` is the
same plus reply handling.  Errors: BackendClosed when the back-end hung up,
RequestFailed when it answered a NEED_REPLY request with a failure ack.
"""

from __future__ import annotations

import os
import select
import socket
import time

from tests.support.virtio_driver import (
    NET_HDR_LEN_LEGACY, NET_HDR_LEN_MRG, GuestMemory, PackedQueue, RxFrame, SplitQueue,
)
from vswitch.vhost import protocol
from vswitch.vhost.protocol import ProtocolFeature, Request, bits

# What this front-end's "driver" understands, as virtio-user without a control queue.
DRIVER_FEATURES = bits(
    protocol.VIRTIO_F_VERSION_1,
    protocol.VIRTIO_NET_F_MRG_RXBUF,
    protocol.VIRTIO_RING_F_INDIRECT_DESC,
    protocol.VIRTIO_RING_F_EVENT_IDX,
    protocol.VIRTIO_NET_F_MQ,
    protocol.VIRTIO_F_ANY_LAYOUT,
    protocol.VHOST_USER_F_PROTOCOL_FEATURES,
)
DRIVER_PROTOCOL_FEATURES = bits(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.STATUS,
    ProtocolFeature.RARP, ProtocolFeature.NET_MTU, ProtocolFeature.BACKEND_REQ,
)
DRIVER_OK_STATUS = (protocol.STATUS_ACKNOWLEDGE | protocol.STATUS_DRIVER | protocol.STATUS_FEATURES_OK
                    | protocol.STATUS_DRIVER_OK)


class BackendClosed(Exception):
    """The back-end closed the connection."""


class RequestFailed(Exception):
    """The back-end answered a NEED_REPLY request with a non-zero ack."""


class VhostUserFrontend:
    """One front-end connection and the guest behind it.

    queues: queue pairs to set up (vrings 0 .. 2*queues-1; even = guest RX).
    features: virtio features to ask for (default: the driver's set); the
        handshake acks `offered & features & ~disable_features`.
    protocol_features: likewise, for protocol features.
    reply_ack: set NEED_REPLY on requests without a reply once REPLY_ACK is
        negotiated (as QEMU does for some, here for all: every step is then
        confirmed, and a refusal raises RequestFailed at once).
    backend_req: send SET_BACKEND_REQ_FD when BACKEND_REQ is negotiated.
    mtu: send NET_SET_MTU when NET_MTU is negotiated.
    uva_offset: front-end virtual address minus guest-physical address.
    iommu: ask for VIRTIO_F_ACCESS_PLATFORM, as a guest behind a vIOMMU whose
        IOVAs equal its guest-physical addresses: ring addresses go out as
        IOVAs, and the back-end learns mappings only from iotlb_update().
    """

    def __init__(self, path, *, queues: int = 1, ring_size: int = 256, mem_size: int = 8 << 20,
                 features: int = DRIVER_FEATURES, disable_features: int = 0,
                 protocol_features: int = DRIVER_PROTOCOL_FEATURES, reply_ack: bool = True,
                 backend_req: bool = True, mtu: int | None = None, uva_offset: int = 0,
                 gpa_base: int = 0x100000, timeout: float = 5.0, iommu: bool = False):
        self.path = os.fspath(path)
        self.queues = queues
        self.ring_size = ring_size
        self.iommu = iommu
        if iommu:
            features |= 1 << protocol.VIRTIO_F_ACCESS_PLATFORM
        self.wanted_features = features & ~disable_features
        self.wanted_protocol_features = protocol_features
        self.use_reply_ack = reply_ack
        self.want_backend_req = backend_req
        self.mtu = mtu
        self.timeout = timeout
        self.mem = GuestMemory(mem_size, gpa_base=gpa_base, uva_offset=uva_offset)
        self.sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        self.offered_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.rings: list[SplitQueue] = []
        self.kickfds: list[int] = []
        self.callfds: list[int] = []
        self._backend_req_peer: socket.socket | None = None

    # -- connection
    def connect(self) -> "VhostUserFrontend":
        """Connects to a back-end in server mode, waiting for its socket to appear."""
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.settimeout(self.timeout)
        self.sock = sock
        return self

    def listen(self) -> "VhostUserFrontend":
        """Listens on the path, for a back-end in client mode (QEMU `server=on`)."""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._listener.settimeout(self.timeout)
        return self

    def accept(self) -> "VhostUserFrontend":
        if self._listener is None:
            self.listen()
        sock, _ = self._listener.accept()
        sock.settimeout(self.timeout)
        self.sock = sock
        return self

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def disconnect(self) -> None:
        """Closes the connection only; the guest memory and rings stay (a new
        connection can replay the handshake on them)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.disconnect()
        self.stop_listening()
        for fd in self.kickfds + self.callfds:
            os.close(fd)
        self.kickfds, self.callfds = [], []
        if self._backend_req_peer is not None:
            self._backend_req_peer.close()
            self._backend_req_peer = None
        self.mem.close()

    def truncate_memory(self, size: int = 0) -> None:
        """Fault injection: cuts the guest memory file to `size` bytes, as a
        hostile front-end may at any time.  Our own mapping goes first, so a
        test that touches the guest memory afterwards gets an error, not SIGBUS."""
        self.mem.mm.close()
        self.mem.mm = None
        os.ftruncate(self.mem.fd, size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- messages
    def send_message(self, request: int, payload: bytes = b"", fds=(), *, flags: int = protocol.VERSION,
                     size: int | None = None) -> None:
        """Sends one message exactly as given (any flags, size field or fds)."""
        data = protocol.encode_message(int(request), payload, flags=flags, size=size)
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            b"".join(int(fd).to_bytes(4, "little", signed=True) for fd in fds))])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(f"{protocol.request_name(request)}: {exc}") from None

    def _recv_exact(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise BackendClosed(f"the back-end closed the connection while we waited for {what}")
            out += chunk
        return bytes(out)

    def recv_reply(self, request: int) -> bytes:
        name = protocol.request_name(request)
        header = self._recv_exact(protocol.HEADER_SIZE, f"the reply to {name}")
        size = protocol.HEADER.unpack(header)[2]
        return protocol.parse_reply(int(request), header + self._recv_exact(size, f"the reply to {name}"))

    def request(self, request: int, payload: bytes = b"", fds=(), *, reply: bool = False,
                need_reply: bool | None = None, flags: int | None = None, size: int | None = None):
        """Sends a request; returns the reply payload for requests with a
        reply, else None.  With NEED_REPLY (default: when REPLY_ACK was
        negotiated and use_reply_ack is on) waits for the ack and raises
        RequestFailed if it is not zero."""
        if need_reply is None:
            need_reply = not reply and self.use_reply_ack and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        if flags is None:
            flags = protocol.VERSION | (protocol.FLAG_NEED_REPLY if need_reply else 0)
        self.send_message(request, payload, fds, flags=flags, size=size)
        if reply:
            return self.recv_reply(request)
        if flags & protocol.FLAG_NEED_REPLY:
            ack = protocol.U64.unpack(self.recv_reply(request))[0]
            if ack != 0:
                raise RequestFailed(f"{protocol.request_name(request)}: the back-end answered {ack}")
        return None

    def recv_reply_with_fds(self, request: int) -> tuple[bytes, list[int]]:
        """A reply and the fds that came with it (POSTCOPY_ADVISE's userfaultfd)."""
        data, fds = b"", []
        while len(data) < protocol.HEADER_SIZE or len(data) < protocol.HEADER_SIZE + protocol.HEADER.unpack_from(data)[2]:
            want = (protocol.HEADER_SIZE - len(data) if len(data) < protocol.HEADER_SIZE
                    else protocol.HEADER_SIZE + protocol.HEADER.unpack_from(data)[2] - len(data))
            chunk, ancdata, _, _ = self.sock.recvmsg(want, socket.CMSG_SPACE(16))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += [int.from_bytes(payload[i:i + 4], "little") for i in range(0, len(payload), 4)]
            if not chunk:
                raise BackendClosed(f"the back-end closed the connection while we waited for the reply to "
                                    f"{protocol.request_name(request)}")
            data += chunk
        return protocol.parse_reply(int(request), data), fds

    # -- postcopy, as QEMU's destination does it (hw/virtio/vhost-user.c)
    def postcopy_advise(self) -> int:
        """POSTCOPY_ADVISE; returns the userfaultfd the back-end sent (ours to close)."""
        self.send_message(Request.POSTCOPY_ADVISE)
        payload, fds = self.recv_reply_with_fds(Request.POSTCOPY_ADVISE)
        if payload or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RequestFailed(f"POSTCOPY_ADVISE: reply of {len(payload)} bytes with {len(fds)} fds")
        return fds[0]

    def postcopy_listen(self) -> None:
        self.request(Request.POSTCOPY_LISTEN, need_reply=True)

    def postcopy_end(self) -> int:
        self.send_message(Request.POSTCOPY_END, flags=protocol.VERSION | protocol.FLAG_NEED_REPLY)
        return protocol.U64.unpack(self.recv_reply(Request.POSTCOPY_END))[0]

    def set_mem_table_postcopy(self, ack: int | None = 0) -> list[protocol.MemoryRegion]:
        """SET_MEM_TABLE while postcopy listens: the back-end answers with its own
        address of each region; then the acknowledgement (a SET_MEM_TABLE with a
        u64), unless ack is None.  Returns the regions of the reply."""
        sent = self.memory_regions()
        payload = protocol.pack_memory_table(sent)
        self.send_message(Request.SET_MEM_TABLE, payload, [self.mem.fd])
        reply = self.recv_reply(Request.SET_MEM_TABLE)
        if len(reply) != len(payload):
            raise RequestFailed(f"SET_MEM_TABLE: postcopy reply of {len(reply)} bytes, {len(payload)} sent")
        count = protocol.MEMORY_HEADER.unpack_from(reply)[0]
        regions = [protocol.MemoryRegion(*protocol.MEMORY_REGION.unpack_from(
            reply, protocol.MEMORY_HEADER.size + i * protocol.MEMORY_REGION.size)) for i in range(count)]
        if ack is not None:
            self.send_message(Request.SET_MEM_TABLE, protocol.pack_u64(ack))
        return regions

    def get_u64(self, request: Request) -> int:
        return protocol.U64.unpack(self.request(request, reply=True))[0]

    def set_u64(self, request: Request, value: int, **kw) -> None:
        self.request(request, protocol.pack_u64(value), **kw)

    def sync(self) -> None:
        """A round trip: every message sent before has been handled when it returns."""
        self.get_u64(Request.GET_FEATURES)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """True if the back-end closes the connection within the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                try:
                    if not self.sock.recv(4096):
                        return True
                except ConnectionResetError:
                    return True
        return False

    def has_protocol_feature(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << bit))

    # -- handshake
    @property
    def hdr_len(self) -> int:
        long_hdr = self.features & bits(protocol.VIRTIO_F_VERSION_1, protocol.VIRTIO_NET_F_MRG_RXBUF)
        return NET_HDR_LEN_MRG if long_hdr else NET_HDR_LEN_LEGACY

    def handshake(self, stop_before: Request | None = None, start_after: Request | None = None) -> None:
        """The whole setup a front-end performs, in QEMU's order.  With
        stop_before, returns just before sending that request; with
        start_after, skips every step up to and including that request."""
        skipping = start_after is not None
        for request, step in self._steps():
            if skipping:
                skipping = request != start_after
                continue
            if request == stop_before:
                return
            step()

    def _steps(self):
        yield Request.SET_OWNER, lambda: self.request(Request.SET_OWNER, need_reply=False)
        yield Request.GET_FEATURES, self._negotiate_features_offer
        if self.offered_features & (1 << protocol.VHOST_USER_F_PROTOCOL_FEATURES) and \
                self.wanted_features & (1 << protocol.VHOST_USER_F_PROTOCOL_FEATURES):
            yield Request.GET_PROTOCOL_FEATURES, self._get_protocol_features
            yield Request.SET_PROTOCOL_FEATURES, self._set_protocol_features
            if self.has_protocol_feature(ProtocolFeature.MQ):
                yield Request.GET_QUEUE_NUM, self._get_queue_num
            if self.want_backend_req and self.has_protocol_feature(ProtocolFeature.BACKEND_REQ):
                yield Request.SET_BACKEND_REQ_FD, self._set_backend_req_fd
        yield Request.SET_FEATURES, lambda: self.set_u64(Request.SET_FEATURES, self.features)
        if self.mtu is not None and self.has_protocol_feature(ProtocolFeature.NET_MTU):
            yield Request.NET_SET_MTU, lambda: self.set_u64(Request.NET_SET_MTU, self.mtu)
        yield Request.SET_MEM_TABLE, self.set_mem_table
        self._make_rings()
        for ring in self.rings:
            yield Request.SET_VRING_NUM, lambda r=ring: self.request(
                Request.SET_VRING_NUM, protocol.pack_vring_state(r.index, r.size))
            yield Request.SET_VRING_BASE, lambda r=ring: self.request(
                Request.SET_VRING_BASE, protocol.pack_vring_state(r.index, r.vring_base))
            yield Request.SET_VRING_ADDR, lambda r=ring: self.request(
                Request.SET_VRING_ADDR, protocol.pack_vring_addr(r.index, *self.ring_addresses(r)))
            yield Request.SET_VRING_KICK, lambda r=ring: self.request(
                Request.SET_VRING_KICK, protocol.pack_vring_fd(r.index), [self.kickfds[r.index]])
            yield Request.SET_VRING_CALL, lambda r=ring: self.request(
                Request.SET_VRING_CALL, protocol.pack_vring_fd(r.index), [self.callfds[r.index]])
        if self.features & (1 << protocol.VHOST_USER_F_PROTOCOL_FEATURES):
            for ring in self.rings:
                yield Request.SET_VRING_ENABLE, lambda r=ring: self.set_vring_enable(r.index, True)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            yield Request.SET_STATUS, lambda: self.set_u64(Request.SET_STATUS, DRIVER_OK_STATUS)

    def _negotiate_features_offer(self) -> None:
        self.offered_features = self.get_u64(Request.GET_FEATURES)
        self.features = self.offered_features & self.wanted_features
        if self.queues == 1:
            self.features &= ~(1 << protocol.VIRTIO_NET_F_MQ)

    def _get_protocol_features(self) -> None:
        self.offered_protocol_features = self.get_u64(Request.GET_PROTOCOL_FEATURES)

    def _set_protocol_features(self) -> None:
        # Negotiated once sent; acks only make sense after it, so none for this one.
        chosen = self.offered_protocol_features & self.wanted_protocol_features
        self.set_u64(Request.SET_PROTOCOL_FEATURES, chosen, need_reply=False)
        self.protocol_features = chosen

    def _get_queue_num(self) -> None:
        self.queue_num = self.get_u64(Request.GET_QUEUE_NUM)
        if self.queues > self.queue_num:
            raise RequestFailed(f"the back-end offers {self.queue_num} queue pairs, {self.queues} wanted")

    def _set_backend_req_fd(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        if self._backend_req_peer is not None:
            self._backend_req_peer.close()
        self._backend_req_peer = ours

    def memory_regions(self) -> list[protocol.MemoryRegion]:
        r = self.mem.region()
        return [protocol.MemoryRegion(r["guest_phys_addr"], r["size"], r["user_addr"], r["mmap_offset"])]

    def set_mem_table(self) -> None:
        self.request(Request.SET_MEM_TABLE, protocol.pack_memory_table(self.memory_regions()), [self.mem.fd])

    def _make_rings(self) -> None:
        """Lays out the rings once per front-end; a reconnect reuses them."""
        if self.rings:
            for ring in self.rings:
                ring.hdr_len = self.hdr_len
            return
        for index in range(2 * self.queues):
            if self.features & (1 << protocol.VIRTIO_F_RING_PACKED):
                in_order = bool(self.features & (1 << protocol.VIRTIO_F_IN_ORDER))
                ring = PackedQueue(self.mem, self.ring_size, hdr_len=self.hdr_len, index=index, in_order=in_order)
            else:
                ring = SplitQueue(self.mem, self.ring_size, hdr_len=self.hdr_len, index=index)
            self.rings.append(ring)
            self.kickfds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.callfds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def ring_addresses(self, ring) -> tuple[int, int, int]:
        """What SET_VRING_ADDR carries (desc, used, avail): IOVAs (here the guest-physical
        addresses) with ACCESS_PLATFORM negotiated, else front-end addresses."""
        if self.features & (1 << protocol.VIRTIO_F_ACCESS_PLATFORM):
            gpa = self.mem.gpa_base
            return (ring.desc_uva - ring.mem.uva_base + gpa, ring.used_uva - ring.mem.uva_base + gpa,
                    ring.avail_uva - ring.mem.uva_base + gpa)
        return ring.desc_uva, ring.used_uva, ring.avail_uva

    # -- vIOMMU
    def iotlb_update(self, iova: int, size: int, perm: int = 3, *, uaddr: int | None = None, **kw) -> None:
        """IOTLB_MSG UPDATE: iova maps to uaddr (default: where guest-physical iova is)."""
        uaddr = self.mem.gpa_to_uva(iova) if uaddr is None else uaddr
        self.request(Request.IOTLB_MSG, protocol.pack_iotlb_msg(iova, size, uaddr, perm, 2), **kw)

    def iotlb_invalidate(self, iova: int, size: int, **kw) -> None:
        self.request(Request.IOTLB_MSG, protocol.pack_iotlb_msg(iova, size, 0, 0, 3), **kw)

    def map_all(self, perm: int = 3) -> None:
        """Maps all guest memory, IOVA = guest-physical address."""
        self.iotlb_update(self.mem.gpa_base, self.mem.size, perm)

    def backend_requests(self, timeout: float = 1.0) -> list[tuple[int, int, bytes]]:
        """The back-end's requests on the SET_BACKEND_REQ_FD channel that arrive
        within the timeout (after the first, whatever is there): (request, flags, payload)."""
        sock = self._backend_req_peer
        out: list[tuple[int, int, bytes]] = []
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            wait = deadline - time.monotonic() if not out else 0.05
            ready, _, _ = select.select([sock], [], [], max(0.0, wait))
            if not ready:
                return out
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
            while len(buf) >= protocol.HEADER_SIZE:
                request, flags, size = protocol.HEADER.unpack_from(buf)
                if len(buf) < protocol.HEADER_SIZE + size:
                    break
                out.append((request, flags, buf[protocol.HEADER_SIZE:protocol.HEADER_SIZE + size]))
                buf = buf[protocol.HEADER_SIZE + size:]

    def iotlb_misses(self, timeout: float = 1.0) -> list[protocol.IotlbMsg]:
        """The IOTLB MISS requests the back-end sends within the timeout."""
        return [protocol.IotlbMsg(*protocol.IOTLB_MSG.unpack(payload))
                for request, _, payload in self.backend_requests(timeout)
                if request == protocol.BackendRequest.IOTLB_MSG]

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, protocol.pack_vring_state(index, 1 if enable else 0))

    def get_vring_base(self, index: int) -> int:
        reply = self.request(Request.GET_VRING_BASE, protocol.pack_vring_state(index, 0), reply=True)
        ring_index, base = protocol.VRING_STATE.unpack(reply)
        if ring_index != index:
            raise RequestFailed(f"GET_VRING_BASE: reply for vring {ring_index}, asked for {index}")
        return base

    # -- data
    def rx_ring(self, queue: int) -> SplitQueue:
        return self.rings[2 * queue]

    def tx_ring(self, queue: int) -> SplitQueue:
        return self.rings[2 * queue + 1]

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kickfds[index], 1)

    def send_frame(self, queue: int, frame: bytes, **options) -> int:
        """Guest TX: posts one frame on queue pair `queue` (options as
        SplitQueue.post_tx) and kicks.  Returns the head."""
        ring = self.tx_ring(queue)
        ring.get_used()             # reclaim what the back-end has finished with
        head = ring.post_tx(frame, **options)
        self.kick(ring.index)
        return head

    def wait_tx_done(self, queue: int, timeout: float | None = None) -> None:
        ring = self.tx_ring(queue)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while ring.in_flight():
            ring.get_used()
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue}: {ring.in_flight()} TX chains not returned")
            time.sleep(0.001)

    def post_rx(self, queue: int, count: int = 64, size: int = 2048, **options) -> list[int]:
        ring = self.rx_ring(queue)
        heads = ring.post_rx(count, size, **options)
        self.kick(ring.index)
        return heads

    def receive(self, queue: int, count: int = 1, timeout: float | None = None) -> list[RxFrame]:
        """Waits for `count` frames on queue pair `queue`'s RX ring (buffers
        must have been posted) and returns every frame received by then."""
        ring = self.rx_ring(queue)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        frames: list[RxFrame] = []
        while True:
            frames += ring.read_rx_frames()
            if len(frames) >= count or time.monotonic() > deadline:
                return frames
            time.sleep(0.001)
