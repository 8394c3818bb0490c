"""vhost-user protocol tests: VhostUserBackend over a real UNIX socket.

The back-end runs on an asyncio loop in a background thread, as in the
daemon; the test thread plays the front-end (tests/support/frontend.py) or
sends hand-made messages, then checks the C device struct the back-end
configured.  No PMD runs: `quiesce` is a counter, and where a test needs
the ring engine to move an index it calls the C burst functions itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import threading
import time

import pytest

from tests.support.frontend import BackendClosed, RequestFailed, VhostUserFrontend
from tests.support.vhost_servers import harness_factory
from tests.support.virtio_driver import GuestMemory
from vswitch import native_sources
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.backend import VhostUserBackend
from vswitch.vhost.device import MESSAGES, VhostUserDevice
from vswitch.vhost.protocol import ProtocolError, ProtocolFeature, Request, bits


# --------------------------------------------------------------------------- fixtures

class LoopThread:
    """An asyncio loop on its own thread; call() runs a function on it and returns the result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Harness:
    """One back-end, its C device, and what it reported."""

    def __init__(self, loop: LoopThread, path, mode="server", queues=1):
        self.loop = loop
        self.path = str(path)
        self.dev = ffi.new("struct vs_vhost_dev *")
        lib.vs_vhost_dev_init(self.dev, queues)
        self.events: list[tuple[str, dict]] = []
        self.rarps: list[bytes] = []
        self.quiesces = 0
        self.backend = VhostUserBackend("vhost0", self.path, mode, queues, self.dev, self._quiesce,
                                        self._event, on_rarp=self.rarps.append)

    def _quiesce(self):
        self.quiesces += 1

    def _event(self, kind, fields):
        self.events.append((kind, fields))

    def start(self):
        self.loop.call(self.backend.start)

    def stop(self):
        self.loop.run(self.backend.stop())

    def info(self) -> dict:
        return self.loop.call(self.backend.info)

    @property
    def protocol_errors(self) -> int:
        return self.loop.call(lambda: self.backend.protocol_errors)

    def wait(self, predicate, what: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.loop.call(predicate):
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_connected(self, connected=True):
        self.wait(lambda: self.backend.connected == connected, f"connected={connected}")

    def link_events(self) -> list[bool]:
        return [f["up"] for k, f in self.events if k == "link"]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def make_harness(loop_thread, tmp_path):
    """make(mode="server", queues=1, name="vhost.sock", start=True): a Harness; all stopped after the test."""
    yield from harness_factory(Harness, loop_thread, tmp_path, default_name="vhost.sock")


@pytest.fixture
def server(make_harness):
    return make_harness()


@pytest.fixture
def frontends(tmp_path):
    made = []

    def make(path, **kw):
        fe = VhostUserFrontend(path, **kw)
        made.append(fe)
        return fe
    yield make
    for fe in made:
        fe.close()


def open_fds() -> set[int]:
    return set(int(n) for n in os.listdir("/proc/self/fd"))


def uva_ptr(dev, uva, length):
    return int(ffi.cast("uintptr_t", lib.vs_mem_translate_uva(dev.mem, uva, length)))


def ptr(p) -> int:
    return int(ffi.cast("uintptr_t", p))


# ------------------------------------------------------------------ parsing (no socket)

def test_header_parsing_rejects_bad_flags_and_sizes():
    assert protocol.parse_header(protocol.HEADER.pack(1, 1, 0)).name == "GET_FEATURES"
    assert protocol.parse_header(protocol.HEADER.pack(99, 9, 8)).need_reply
    for flags, words in ((0, "version"), (2, "version"), (5, "reply flag"), (0x101, "unknown flag")):
        with pytest.raises(ProtocolError, match=words):
            protocol.parse_header(protocol.HEADER.pack(2, flags, 8))
    with pytest.raises(ProtocolError, match="SET_FEATURES: payload size 4097 exceeds"):
        protocol.parse_header(protocol.HEADER.pack(2, 1, 4097))


def test_payload_parsing():
    assert protocol.parse_payload(MESSAGES[Request.SET_FEATURES], protocol.pack_u64(7), 0) == 7
    with pytest.raises(ProtocolError, match="SET_FEATURES: payload is 4 bytes, expected 8"):
        protocol.parse_payload(MESSAGES[Request.SET_FEATURES], b"\0" * 4, 0)
    with pytest.raises(ProtocolError, match="SET_FEATURES: 1 file descriptors attached, expected 0"):
        protocol.parse_payload(MESSAGES[Request.SET_FEATURES], protocol.pack_u64(7), 1)
    kick = protocol.parse_payload(MESSAGES[Request.SET_VRING_KICK], protocol.pack_vring_fd(3, nofd=True), 0)
    assert (kick.index, kick.nofd) == (3, True)
    with pytest.raises(ProtocolError, match="expected 1"):
        protocol.parse_payload(MESSAGES[Request.SET_VRING_KICK], protocol.pack_vring_fd(3), 0)
    with pytest.raises(ProtocolError, match="unknown bits"):
        protocol.parse_payload(MESSAGES[Request.SET_VRING_CALL], protocol.pack_u64(0x200), 1)
    region = protocol.MemoryRegion(0x1000, 0x2000, 0x7000, 0)
    second = protocol.MemoryRegion(0x3000, 0x1000, 0x9000, 0)
    table = protocol.parse_payload(MESSAGES[Request.SET_MEM_TABLE], protocol.pack_memory_table([region, second]), 2)
    assert table.regions == (region, second)
    with pytest.raises(ProtocolError, match="region 1 overlaps region 0 in guest addresses"):
        protocol.parse_payload(MESSAGES[Request.SET_MEM_TABLE], protocol.pack_memory_table([region, region]), 2)
    with pytest.raises(ProtocolError, match="region 1 overlaps region 0 in user addresses"):
        protocol.parse_payload(MESSAGES[Request.SET_MEM_TABLE], protocol.pack_memory_table(
            [region, protocol.MemoryRegion(0x3000, 0x1000, 0x8000, 0)]), 2)
    with pytest.raises(ProtocolError, match="9 memory regions"):
        protocol.parse_payload(MESSAGES[Request.SET_MEM_TABLE], protocol.pack_memory_table([region] * 9), 9)
    with pytest.raises(ProtocolError, match="overflows"):
        protocol.parse_payload(MESSAGES[Request.SET_MEM_TABLE],
                               protocol.pack_memory_table([protocol.MemoryRegion(2**64 - 0x1000, 0x2000, 0, 0)]), 1)
    with pytest.raises(ProtocolError, match="expected 40"):
        protocol.parse_payload(MESSAGES[Request.SET_MEM_TABLE], protocol.pack_memory_table([region])[:-1] + b"", 1)


def test_the_message_table_has_one_row_per_request():
    assert all(request is row.request for request, row in MESSAGES.items())
    assert all(getattr(VhostUserDevice, row.handler.__name__) is row.handler for row in MESSAGES.values())
    assert {r for r, row in MESSAGES.items() if row.fds is not protocol.Fds.NONE} == {
        Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR,
        Request.SET_BACKEND_REQ_FD, Request.ADD_MEM_REG, Request.REM_MEM_REG, Request.SET_LOG_BASE,
        Request.SET_LOG_FD}
    assert {r: row.reply for r, row in MESSAGES.items() if row.reply is not protocol.Reply.ACK} == {
        Request.GET_FEATURES: protocol.Reply.U64, Request.GET_PROTOCOL_FEATURES: protocol.Reply.U64,
        Request.GET_QUEUE_NUM: protocol.Reply.U64, Request.GET_STATUS: protocol.Reply.U64,
        Request.GET_VRING_BASE: protocol.Reply.VRING_STATE, Request.GET_MAX_MEM_SLOTS: protocol.Reply.U64,
        Request.SET_LOG_BASE: protocol.Reply.EMPTY, Request.SET_MEM_TABLE: protocol.Reply.ACK_OR_MEMORY,
        Request.POSTCOPY_ADVISE: protocol.Reply.FD, Request.POSTCOPY_END: protocol.Reply.U64}
    # What may change under the PMDs: memory, ring configuration and fds, and the device as a whole.
    assert {r for r, row in MESSAGES.items() if row.quiesce} == {
        Request.RESET_OWNER, Request.SET_MEM_TABLE, Request.SET_VRING_NUM, Request.SET_VRING_ADDR,
        Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
        Request.SET_VRING_ENABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG, Request.IOTLB_MSG}


def test_a_handler_may_wait_for_the_pmds_only_if_its_row_says_so(make_harness, frontends, monkeypatch, caplog):
    """The table's quiesce column is enforced: a handler that waits for the
    PMDs against its row is a bug, which costs its connection and no more."""
    server = make_harness()
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.sync()
    quiesces = server.quiesces
    # Disabling a running ring waits for the PMDs; its row says so.
    fe.request(Request.SET_VRING_ENABLE, protocol.pack_vring_state(0, 0), need_reply=True)
    assert server.quiesces == quiesces + 1 and server.backend.connected
    row = MESSAGES[Request.SET_VRING_ENABLE]
    monkeypatch.setitem(MESSAGES, Request.SET_VRING_ENABLE, dataclasses.replace(row, quiesce=False))
    fe.request(Request.SET_VRING_ENABLE, protocol.pack_vring_state(0, 1), need_reply=True)   # starts: no wait
    with pytest.raises(BackendClosed):
        fe.request(Request.SET_VRING_ENABLE, protocol.pack_vring_state(0, 0), need_reply=True)
    server.wait_connected(False)
    errors = [str(r.exc_info[1]) for r in caplog.records if r.exc_info and "internal error" in r.getMessage()]
    assert errors == ["SET_VRING_ENABLE: the handler waits for the PMDs, but its row in MESSAGES says it does not"]


def test_virtio_numbers_have_one_definition():
    """Feature bits, ring flags and limits shared by C and Python are defined
    in vswitch/vhost/virtio.h only: Python takes them from lib."""
    root = native_sources.PACKAGE_DIR
    names = re.compile(r"^\s*#\s*define\s+((?:VIRTIO|VIRTQ|VHOST)_\w+|VS_MAX_(?:MEM_REGIONS|QUEUE_PAIRS|VRINGS|RING_SIZE))\b",
                       re.M)
    defined = {name: names.findall((root / name).read_text())
               for name in native_sources.HEADERS + native_sources.SOURCES + native_sources.PRIVATE_HEADERS}
    assert {path for path, found in defined.items() if found} == {"vhost/virtio.h"}, defined
    for path in sorted(root.rglob("*.py")):
        literals = re.findall(r"^((?:VIRTIO|VIRTQ|VHOST)_\w+|MAX_MEM_REGIONS)\s*=\s*\d", path.read_text(), re.M)
        assert not literals, f"{path}: {literals} restate numbers virtio.h defines"
    for name in defined["vhost/virtio.h"]:
        if hasattr(protocol, name):
            assert getattr(protocol, name) == getattr(lib, name), name
    assert protocol.MAX_MEM_REGIONS == lib.VS_MAX_MEM_REGIONS


# VIRTIO_NET_F_GUEST_UFO: Linux guests no longer use UFO, and the switch does not offer it.
NOT_OFFERED_FEATURE = 10


def test_offered_features():
    offered = protocol.OFFERED_FEATURES
    for bit in (32, 15, 28, 29, 17, 22, 27, 30, protocol.VIRTIO_F_IN_ORDER, protocol.VIRTIO_F_RING_PACKED):
        assert offered & (1 << bit)
    assert offered & (1 << protocol.VHOST_F_LOG_ALL)      # live migration: dirty page logging
    assert offered & (1 << 21)      # GUEST_ANNOUNCE: after a migration the guest sends its own GARPs
    assert not offered & (1 << NOT_OFFERED_FEATURE)
    # Checksum and TCP segmentation offloads, both ways (the switch does them in
    # software for a destination that lacks them: vswitch/pmd/offload.c).
    for bit in (protocol.VIRTIO_NET_F_CSUM, protocol.VIRTIO_NET_F_GUEST_CSUM,
                protocol.VIRTIO_NET_F_HOST_TSO4, protocol.VIRTIO_NET_F_HOST_TSO6,
                protocol.VIRTIO_NET_F_GUEST_TSO4, protocol.VIRTIO_NET_F_GUEST_TSO6):
        assert offered & (1 << bit)
    assert protocol.OFFERED_PROTOCOL_FEATURES == bits(0, 1, 2, 3, 4, 5, 15, 16)


# ------------------------------------------------------------------------- handshake

def check_rings_running(dev, fe):
    for ring in fe.rings:
        vr = dev.vrings + ring.index
        assert lib.vs_vring_is_enabled(vr), f"vring {ring.index} not enabled"
        assert vr.size == ring.size
        assert ptr(vr.desc) == uva_ptr(dev, ring.desc_uva, 16 * ring.size) != 0
        assert ptr(vr.avail) == uva_ptr(dev, ring.avail_uva, 4)
        assert ptr(vr.used) == uva_ptr(dev, ring.used_uva, 4)
        assert vr.kickfd >= 0 and vr.callfd >= 0


def test_full_handshake_configures_the_device(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.sync()
    dev = server.dev
    assert dev.features == fe.features
    assert fe.features & (1 << protocol.VIRTIO_F_VERSION_1)
    assert fe.features & (1 << protocol.VIRTIO_NET_F_MRG_RXBUF)
    assert dev.hdr_len == 12
    assert dev.mem != ffi.NULL and dev.mem.nregions == 1
    check_rings_running(dev, fe)
    # The back-end maps the same memfd: what the guest writes, the device sees.
    fe.rings[1].write_desc(0, 0x1234, 99, 0, 0)
    assert dev.vrings[1].desc[0].addr == 0x1234 and dev.vrings[1].desc[0].len == 99
    assert server.link_events() == [True]
    assert [f for k, f in server.events if k == "queue"] == [
        {"queue": 0, "enabled": True}, {"queue": 1, "enabled": True}]
    assert server.kinds()[0] == "connected"
    info = server.info()
    assert info["connected"] and info["mode"] == "server" and info["path"] == server.path
    assert int(info["features"], 16) == fe.features
    assert int(info["protocol_features"], 16) == fe.protocol_features
    assert int(info["status"], 16) & protocol.STATUS_DRIVER_OK
    assert [(r["index"], r["size"], r["enabled"], r["kick"], r["call"]) for r in info["rings"]] == [
        (0, 256, True, "fd", "fd"), (1, 256, True, "fd", "fd")]
    assert info["protocol_errors"] == 0
    assert fe.queue_num == 1


def test_legacy_header_without_version_1_and_mergeable(server, frontends):
    fe = frontends(server.path, disable_features=bits(protocol.VIRTIO_F_VERSION_1, protocol.VIRTIO_NET_F_MRG_RXBUF,
                                                        protocol.VIRTIO_RING_F_EVENT_IDX,
                                                        protocol.VIRTIO_RING_F_INDIRECT_DESC)).connect()
    fe.handshake()
    fe.sync()
    assert server.dev.hdr_len == 10
    assert not server.dev.features & bits(protocol.VIRTIO_RING_F_EVENT_IDX, protocol.VIRTIO_RING_F_INDIRECT_DESC)
    check_rings_running(server.dev, fe)


def test_without_protocol_features_rings_start_at_kick(server, frontends):
    fe = frontends(server.path, disable_features=bits(protocol.VHOST_USER_F_PROTOCOL_FEATURES)).connect()
    fe.handshake()
    fe.sync()
    assert fe.protocol_features == 0
    check_rings_running(server.dev, fe)
    assert server.link_events() == [True]


def test_link_waits_for_driver_ok_when_status_is_negotiated(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake(stop_before=Request.SET_STATUS)
    fe.sync()
    assert lib.vs_vring_is_enabled(server.dev.vrings + 0) and server.link_events() == []
    fe.set_u64(Request.SET_STATUS, 0x0F)
    assert fe.get_u64(Request.GET_STATUS) == 0x0F
    assert server.link_events() == [True]
    fe.set_u64(Request.SET_STATUS, 0)          # a driver reset
    fe.sync()
    assert server.link_events() == [True, False]


def test_multiqueue(make_harness, frontends):
    h = make_harness(queues=3)
    fe = frontends(h.path, queues=2).connect()
    fe.handshake()
    fe.sync()
    assert fe.queue_num == 3
    assert fe.features & (1 << protocol.VIRTIO_NET_F_MQ)
    check_rings_running(h.dev, fe)
    assert not lib.vs_vring_is_enabled(h.dev.vrings + 4)
    # Disabling a queue pair keeps its fds; re-enabling resumes it.
    fe.set_vring_enable(3, False)
    assert not lib.vs_vring_is_enabled(h.dev.vrings + 3)
    assert h.info()["rings"][3]["kick"] == "fd"
    fe.set_vring_enable(3, True)
    check_rings_running(h.dev, fe)
    assert h.link_events() == [True]


def test_guest_physical_and_user_addresses_may_differ(server, frontends):
    fe = frontends(server.path, uva_offset=0x7F00_0000_0000).connect()
    fe.handshake()
    fe.sync()
    region = server.dev.mem.regions[0]
    assert region.user_addr == region.guest_phys_addr + 0x7F00_0000_0000
    check_rings_running(server.dev, fe)
    fe.rings[0].write_desc(5, 0xABCD, 7)
    assert server.dev.vrings[0].desc[5].addr == 0xABCD


def test_get_vring_base_stops_the_ring_and_returns_last_avail_idx(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.sync()
    tx = fe.tx_ring(0)
    for n in range(5):
        tx.post_tx(bytes([n]) * 60)
    # Play the PMD: consume the five frames from the guest's TX ring.
    pkts = ffi.new("struct vs_pkt[32]")
    vr = server.dev.vrings + 1
    got = lib.vs_vring_dequeue_burst(server.dev, vr, pkts, 32)
    lib.vs_vring_dequeue_done(server.dev, vr, pkts, got)
    assert got == 5 and vr.last_avail_idx == 5
    assert fe.get_vring_base(1) == 5
    assert not lib.vs_vring_is_enabled(vr) and vr.kickfd == -1 and vr.callfd == -1
    assert server.link_events() == [True, False]
    assert {"queue": 1, "enabled": False} in [f for k, f in server.events if k == "queue"]
    assert fe.get_vring_base(0) == 0
    # The front-end restarts the ring from where it stopped.
    ring = fe.rings[1]
    fe.request(Request.SET_VRING_BASE, protocol.pack_vring_state(1, 5))
    fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(1, ring.desc_uva, ring.used_uva, ring.avail_uva))
    fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(1), [fe.kickfds[1]])
    fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(1, nofd=True))
    assert lib.vs_vring_is_enabled(vr) and vr.last_avail_idx == 5 and vr.callfd == -1


def test_vring_base_before_start_is_echoed(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake(stop_before=Request.SET_VRING_NUM)
    fe.request(Request.SET_VRING_BASE, protocol.pack_vring_state(0, 1234))
    assert fe.get_vring_base(0) == 1234


def test_reply_ack(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    ack = protocol.FLAG_NEED_REPLY | protocol.VERSION
    fe.send_message(Request.SET_OWNER, flags=ack)
    assert fe.recv_reply(Request.SET_OWNER) == protocol.pack_u64(0)
    # Refusals with NEED_REPLY get a failure ack; the connection stays up.
    with pytest.raises(RequestFailed):
        fe.set_u64(Request.NET_SET_MTU, 20, need_reply=True)
    with pytest.raises(RequestFailed):
        fe.request(99, protocol.pack_u64(0), need_reply=True)
    with pytest.raises(RequestFailed):
        fe.request(Request.SET_VRING_ENDIAN, protocol.pack_vring_state(0, 0), need_reply=True)
    with pytest.raises(RequestFailed):
        fe.set_u64(Request.SET_FEATURES, 1 << NOT_OFFERED_FEATURE, need_reply=True)
    fe.set_u64(Request.NET_SET_MTU, 9000, need_reply=True)
    # A request with its own reply does not get an ack as well.
    fe.send_message(Request.GET_QUEUE_NUM, flags=ack)
    assert fe.recv_reply(Request.GET_QUEUE_NUM) == protocol.pack_u64(1)
    fe.sync()
    assert server.protocol_errors == 4
    assert server.info()["mtu"] == 9000
    assert server.backend.connected


def test_send_rarp(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.request(Request.SEND_RARP, bytes.fromhex("525400123456") + b"\0\0")
    fe.sync()
    assert server.rarps == [bytes.fromhex("525400123456")]
    assert ("rarp", {"mac": "52:54:00:12:34:56"}) in server.events


def test_set_backend_req_fd_is_kept_and_replaced(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    first, fe._backend_req_peer = fe._backend_req_peer, None
    fe._set_backend_req_fd()       # a second one replaces (and closes) the first
    first.settimeout(2)
    assert first.recv(1) == b""    # our peer's end was closed by the back-end
    first.close()


def test_call_fd_swap_keeps_the_ring_running(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.sync()
    fds_before = open_fds()
    new_call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(0), [new_call])
        vr = server.dev.vrings + 0
        assert lib.vs_vring_is_enabled(vr)
        assert os.path.samestat(os.fstat(vr.callfd), os.fstat(new_call))
        # The back-end closed the old call fd it had, and holds one for the new.
        assert len(open_fds()) == len(fds_before) + 1
        assert [f for k, f in server.events if k == "queue"] == [
            {"queue": 0, "enabled": True}, {"queue": 1, "enabled": True}]
    finally:
        os.close(new_call)


def test_mem_table_replacement_while_running(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.sync()
    dev = server.dev
    old_desc = ptr(dev.vrings[0].desc)
    quiesces = server.quiesces
    # An identical table (same file) keeps the mappings.
    fe.set_mem_table()
    assert ptr(dev.vrings[0].desc) == old_desc and server.quiesces == quiesces
    # The same layout in another file is a new table: rings move to the new mapping.
    with GuestMemory(fe.mem.size, gpa_base=fe.mem.gpa_base) as copy:
        copy.mm[:] = fe.mem.mm[:]
        region = fe.memory_regions()[0]
        fe.request(Request.SET_MEM_TABLE, protocol.pack_memory_table([region]), [copy.fd])
        assert server.quiesces > quiesces
        assert ptr(dev.vrings[0].desc) != old_desc
        check_rings_running(dev, fe)
        copy.write(fe.rings[0].desc_gpa, b"\x77" * 8)
        assert dev.vrings[0].desc[0].addr == 0x7777777777777777
    assert server.link_events() == [True]


def test_reset_owner_stops_the_device_and_keeps_the_connection(server, frontends):
    fe = frontends(server.path).connect()
    fe.handshake()
    fe.request(Request.RESET_OWNER, need_reply=False)
    fe.sync()
    assert server.link_events() == [True, False]
    assert server.dev.mem == ffi.NULL
    assert not lib.vs_vring_is_enabled(server.dev.vrings + 0)
    assert server.backend.connected
    fe.handshake()
    fe.sync()
    check_rings_running(server.dev, fe)


# ------------------------------------------------------------------ hostile messages

def region_of(fe, **changes):
    r = fe.memory_regions()[0]
    return protocol.MemoryRegion(**{**r.__dict__, **changes})


def send_with_pipe(fe, request, payload):
    rd, wr = os.pipe()
    try:
        fe.send_message(request, payload, [rd])
    finally:
        os.close(rd)
        os.close(wr)


def too_many_fds(fe):
    fds = [os.eventfd(0) for _ in range(9)]
    try:
        table = protocol.pack_memory_table([region_of(fe)] * 8)
        fe.send_message(Request.SET_MEM_TABLE, table, fds)
    finally:
        for fd in fds:
            os.close(fd)


def small_file_region(fe):
    with GuestMemory(1 << 16) as small:
        fe.send_message(Request.SET_MEM_TABLE, protocol.pack_memory_table([region_of(fe)]), [small.fd])


def ring_outside_memory(fe):
    fe.handshake(stop_before=Request.SET_VRING_NUM)
    fe.request(Request.SET_VRING_NUM, protocol.pack_vring_state(0, 256), need_reply=False)
    fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(0, 0xDEAD0000, 0xDEAD8000, 0xDEAD4000),
               need_reply=False)
    fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(0, nofd=True), need_reply=False)
    fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(0, nofd=True), need_reply=False)
    fe.request(Request.SET_VRING_ENABLE, protocol.pack_vring_state(0, 1), need_reply=False)


def until(step):
    """Runs the handshake up to `step` (with acks off, so the bad message is the only one waited on)."""
    def run(fe, then):
        fe.use_reply_ack = False
        fe.handshake(stop_before=step)
        then(fe)
    return run


HOSTILE = {
    "bad version": lambda fe: fe.send_message(Request.GET_FEATURES, flags=2),
    "version 0": lambda fe: fe.send_message(Request.GET_FEATURES, flags=0),
    "reply flag in a request": lambda fe: fe.send_message(Request.SET_OWNER, flags=5),
    "unknown flag bits": lambda fe: fe.send_message(Request.SET_OWNER, flags=0x41),
    "short payload": lambda fe: fe.send_message(Request.SET_FEATURES, b"\0" * 4),
    "payload for a request without one": lambda fe: fe.send_message(Request.SET_OWNER, b"\0" * 8),
    "huge size field": lambda fe: fe.send_message(Request.SET_FEATURES, b"\0" * 8, size=1 << 30),
    "fd on SET_FEATURES": lambda fe: send_with_pipe(fe, Request.SET_FEATURES, protocol.pack_u64(0)),
    "fd on GET_FEATURES": lambda fe: send_with_pipe(fe, Request.GET_FEATURES, b""),
    "kick without fd or NOFD": lambda fe: fe.send_message(Request.SET_VRING_KICK, protocol.pack_vring_fd(0)),
    "kick with NOFD and an fd": lambda fe: send_with_pipe(fe, Request.SET_VRING_KICK,
                                                          protocol.pack_vring_fd(0, nofd=True)),
    "vring index out of range": lambda fe: fe.send_message(Request.SET_VRING_NUM,
                                                           protocol.pack_vring_state(2, 256)),
    "call index out of range": lambda fe: fe.send_message(Request.SET_VRING_CALL,
                                                          protocol.pack_vring_fd(200, nofd=True)),
    "ring size not a power of two": lambda fe: fe.send_message(Request.SET_VRING_NUM,
                                                               protocol.pack_vring_state(0, 100)),
    "ring size too big": lambda fe: fe.send_message(Request.SET_VRING_NUM, protocol.pack_vring_state(0, 65536)),
    "vring base too big": lambda fe: fe.send_message(Request.SET_VRING_BASE,
                                                     protocol.pack_vring_state(0, 70000)),
    "enable value 2": lambda fe: fe.send_message(Request.SET_VRING_ENABLE, protocol.pack_vring_state(0, 2)),
    "too many regions": lambda fe: send_with_pipe(fe, Request.SET_MEM_TABLE,
                                                  protocol.pack_memory_table([region_of(fe)] * 9)),
    "too many fds": too_many_fds,
    "regions overlap": lambda fe: fe.send_message(
        Request.SET_MEM_TABLE, protocol.pack_memory_table([region_of(fe)] * 2), [fe.mem.fd, fe.mem.fd]),
    "region count and fds differ": lambda fe: send_with_pipe(
        fe, Request.SET_MEM_TABLE, protocol.pack_memory_table([region_of(fe)] * 2)),
    "region size overflows": lambda fe: fe.send_message(
        Request.SET_MEM_TABLE, protocol.pack_memory_table([region_of(fe, size=2**64 - 0x1000)]), [fe.mem.fd]),
    "region offset overflows": lambda fe: fe.send_message(
        Request.SET_MEM_TABLE, protocol.pack_memory_table([region_of(fe, mmap_offset=2**64 - 0x10)]),
        [fe.mem.fd]),
    "region past the end of its file": small_file_region,
    "region on an fd that cannot be mapped": lambda fe: send_with_pipe(
        fe, Request.SET_MEM_TABLE, protocol.pack_memory_table([region_of(fe)])),
    "zero regions": lambda fe: fe.send_message(Request.SET_MEM_TABLE, protocol.pack_memory_table([])),
    "features not offered, no NEED_REPLY": lambda fe: fe.send_message(
        Request.SET_FEATURES, protocol.pack_u64(1 << NOT_OFFERED_FEATURE)),
    "protocol features not offered": lambda fe: fe.send_message(
        Request.SET_PROTOCOL_FEATURES, protocol.pack_u64(1 << ProtocolFeature.INBAND_NOTIFICATIONS)),
    "unknown request, no NEED_REPLY": lambda fe: fe.send_message(77, protocol.pack_u64(0)),
    "unsupported request with an fd": lambda fe: send_with_pipe(fe, Request.SET_INFLIGHT_FD, b""),
    "ring outside guest memory": ring_outside_memory,
    "status wider than 8 bits": lambda fe: fe.send_message(Request.SET_STATUS, protocol.pack_u64(0x100)),
    "mtu out of range": lambda fe: fe.send_message(Request.NET_SET_MTU, protocol.pack_u64(67)),
    "mid-handshake garbage": lambda fe: until(Request.SET_VRING_KICK)(
        fe, lambda f: f.send_message(Request.SET_VRING_KICK, protocol.pack_vring_fd(0) + b"x")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_message_closes_only_that_connection(server, frontends, case):
    fds_before = open_fds()
    errors_before = server.protocol_errors
    fe = frontends(server.path).connect()
    HOSTILE[case](fe)
    assert fe.wait_closed(), f"{case}: the back-end kept the connection"
    server.wait_connected(False)
    assert server.protocol_errors == errors_before + 1
    assert server.dev.mem == ffi.NULL
    fe.close()
    assert open_fds() == fds_before, f"{case}: file descriptors leaked"
    # The listening socket still works: a new front-end completes a handshake.
    good = frontends(server.path).connect()
    good.handshake()
    good.sync()
    check_rings_running(server.dev, good)
    assert server.protocol_errors == errors_before + 1


def test_no_fd_leak_over_connect_handshake_disconnect(server, frontends):
    fds_before = open_fds()
    for _ in range(3):
        fe = frontends(server.path, queues=1).connect()
        fe.handshake()
        fe.sync()
        fe.close()
        server.wait_connected(False)
        assert open_fds() == fds_before
    assert server.kinds().count("connected") == 3 and server.kinds().count("disconnected") == 3
    assert server.link_events() == [True, False] * 3


def test_disconnect_mid_message_and_mid_handshake(server, frontends):
    fds_before = open_fds()
    fe = frontends(server.path).connect()
    fe.handshake(stop_before=Request.SET_VRING_KICK)
    # Half a header with an fd attached, then hang up.
    fe.sock.sendmsg([protocol.encode_message(Request.SET_VRING_KICK)[:6]],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fe.kickfds[0].to_bytes(4, "little"))])
    fe.close()
    server.wait_connected(False)
    assert open_fds() == fds_before
    assert server.protocol_errors == 0
    good = frontends(server.path).connect()
    good.handshake()
    good.sync()
    check_rings_running(server.dev, good)


def test_a_half_sent_message_does_not_block_the_loop(make_harness, frontends):
    a = make_harness(name="a.sock")
    b = make_harness(name="b.sock")
    slow = frontends(a.path).connect()
    slow.handshake(stop_before=Request.SET_FEATURES)
    data = protocol.encode_message(Request.SET_FEATURES, protocol.pack_u64(slow.features))
    slow.sock.sendall(data[:5])
    other = frontends(b.path).connect()
    other.handshake()
    other.sync()
    check_rings_running(b.dev, other)
    slow.sock.sendall(data[5:15])
    time.sleep(0.05)
    slow.sock.sendall(data[15:])
    slow.sync()
    assert a.dev.features == slow.features


def test_second_front_end_is_refused_while_one_is_connected(server, frontends):
    first = frontends(server.path).connect()
    first.handshake()
    second = frontends(server.path).connect()
    assert second.wait_closed()
    first.sync()
    check_rings_running(server.dev, first)
    assert server.kinds().count("connected") == 1


def test_server_keeps_listening_after_disconnect(server, frontends):
    for n in range(2):
        fe = frontends(server.path).connect()
        fe.handshake()
        fe.sync()
        check_rings_running(server.dev, fe)
        fe.disconnect()
        server.wait_connected(False)
        assert not lib.vs_vring_is_enabled(server.dev.vrings + 0)
        assert server.dev.vrings[0].kickfd == -1
    assert server.kinds() == (["connected", "queue", "queue", "link", "queue", "queue", "link", "disconnected"] * 2)


def test_stop_tears_down_and_removes_the_socket(make_harness, frontends):
    h = make_harness()
    fe = frontends(h.path).connect()
    fe.handshake()
    fe.sync()
    h.stop()
    assert not os.path.exists(h.path)
    assert fe.wait_closed()
    assert h.dev.mem == ffi.NULL and not lib.vs_vring_is_enabled(h.dev.vrings + 1)
    assert h.link_events() == [True, False] and h.kinds()[-1] == "disconnected"


def test_stale_socket_is_replaced_but_other_files_are_not(make_harness, tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                                   # bound, never listening: stale
    h = make_harness(name="stale.sock")
    assert h.info()["path"] == str(stale)

    (tmp_path / "file.sock").write_text("not a socket")
    h2 = make_harness(name="file.sock", start=False)
    with pytest.raises(FileExistsError, match="not a socket"):
        h2.start()
    assert (tmp_path / "file.sock").read_text() == "not a socket"

    h3 = make_harness(name="stale.sock", start=False)   # h is listening on it
    with pytest.raises(FileExistsError, match="in use"):
        h3.start()


def test_client_mode_connects_when_the_socket_appears_and_after_restarts(make_harness, frontends, tmp_path):
    h = make_harness(mode="client", name="qemu.sock")
    time.sleep(0.4)                        # a few failed attempts with backoff
    assert not h.backend.connected
    fe = frontends(h.path).listen()
    fe.accept()
    fe.handshake()
    fe.sync()
    check_rings_running(h.dev, fe)
    # The front-end restarts: connection dropped, socket gone for a while, then back.
    fe.disconnect()
    fe.stop_listening()
    h.wait_connected(False)
    assert h.link_events() == [True, False]
    time.sleep(0.5)
    fe.listen()
    fe.accept()
    fe.handshake()
    fe.sync()
    check_rings_running(h.dev, fe)
    # A disconnect with the socket still there: back within the first backoff step.
    fe.disconnect()
    h.wait_connected(False)
    fe.accept()
    fe.handshake()
    fe.sync()
    assert h.kinds().count("connected") == 3


def test_client_mode_reconnects_after_a_protocol_error(make_harness, frontends):
    h = make_harness(mode="client", name="qemu.sock")
    fe = frontends(h.path).listen()
    fe.accept()
    fe.send_message(Request.SET_FEATURES, b"\0")
    assert fe.wait_closed()
    fe.disconnect()
    fe.accept()
    fe.handshake()
    fe.sync()
    assert h.protocol_errors == 1


def test_client_mode_stop_does_not_hang(make_harness):
    h = make_harness(mode="client", name="nobody.sock")
    time.sleep(0.2)
    started = time.monotonic()
    h.stop()
    assert time.monotonic() - started < 1


# ------------------------------------------------- the test front-end's data helpers

@pytest.mark.parametrize("disable, tx_options, rx_options", [
    (0, {}, {}),
    (0, {"segments": 3, "header_separate": True}, {"size": 100}),          # mergeable: 3 buffers
    (0, {"indirect": True, "segments": 2}, {"indirect": True}),
    (bits(protocol.VIRTIO_F_VERSION_1, protocol.VIRTIO_NET_F_MRG_RXBUF), {"segments": 2},
     {"size": 300, "segments": 3}),                                        # 10-byte header, chained RX
])
def test_frames_flow_through_the_configured_rings(server, frontends, disable, tx_options, rx_options):
    """Plays the PMD by hand: the guest's TX frame is dequeued by the ring
    engine and enqueued into the same guest's RX ring."""
    fe = frontends(server.path, disable_features=disable).connect()
    fe.handshake()
    fe.sync()
    frame = bytes(range(256))[:250]
    fe.send_frame(0, frame, **tx_options)
    fe.post_rx(0, 8, **rx_options)
    dev = server.dev
    pkts = ffi.new("struct vs_pkt[32]")
    got = lib.vs_vring_dequeue_burst(dev, dev.vrings + 1, pkts, 32)
    assert got == 1 and pkts[0].len == len(frame)
    sent = lib.vs_vring_enqueue_burst(dev, dev.vrings + 0, ffi.new("struct vs_pkt *[1]", [pkts + 0]), 1)
    lib.vs_vring_dequeue_done(dev, dev.vrings + 1, pkts, got)
    assert sent == 1
    fe.wait_tx_done(0)
    (received,) = fe.receive(0)
    assert received.data == frame
    assert len(received.header) == fe.hdr_len
    if fe.hdr_len == 12 and rx_options.get("size") == 100:
        assert received.num_buffers == 3


def test_virtio_user_order_call_and_err_first(server, frontends):
    """DPDK virtio-user sends SET_VRING_CALL before the ring's size and
    addresses; QEMU also sends SET_VRING_ERR.  Every fd is closed on disconnect."""
    fds_before = open_fds()
    fe = frontends(server.path).connect()
    fe.handshake(stop_before=Request.SET_VRING_NUM)
    for ring in fe.rings:
        i = ring.index
        fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(i), [fe.callfds[i]])
        err = os.eventfd(0)
        fe.request(Request.SET_VRING_ERR, protocol.pack_vring_fd(i), [err])
        os.close(err)
        fe.request(Request.SET_VRING_NUM, protocol.pack_vring_state(i, ring.size))
        fe.request(Request.SET_VRING_BASE, protocol.pack_vring_state(i, 0))
        fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(i, ring.desc_uva, ring.used_uva, ring.avail_uva))
        fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(i), [fe.kickfds[i]])
        fe.set_vring_enable(i, True)
    fe.set_u64(Request.SET_STATUS, 0x0F)
    check_rings_running(server.dev, fe)
    assert server.link_events() == [True]
    fe.close()
    server.wait_connected(False)
    assert open_fds() == fds_before


# ------------------------------------------------------------------ floods of refused requests

class FrozenClock:
    """Stands in for the back-end's clock, so that budgets and log rate limits do not depend on the machine's speed."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backend_lines(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("vswitch.vhost.") and r.levelno >= level and "'vhost0'" in r.getMessage()]


def test_a_flood_of_refused_requests_is_cut_off(make_harness, frontends, caplog):
    from vswitch.vhost.connection import MAX_PROTOCOL_VIOLATIONS
    caplog.set_level(logging.INFO)
    flooded, other = make_harness(), make_harness(name="other.sock")
    flooded.backend.connection.clock = FrozenClock()
    good = frontends(other.path).connect()
    good.handshake()
    fe = frontends(flooded.path).connect()
    fe.handshake()
    fe.sync()
    sent = 0
    with pytest.raises(BackendClosed):
        for _ in range(1000):
            fe.send_message(Request.NET_SET_MTU, protocol.pack_u64(20),
                            flags=protocol.VERSION | protocol.FLAG_NEED_REPLY)
            sent += 1
    assert fe.wait_closed(), "the back-end kept a front-end that sent 1000 refused requests"
    flooded.wait_connected(False)
    # The bound's worth of requests were answered (a failure ack each), the next one closed the connection.
    assert flooded.protocol_errors == MAX_PROTOCOL_VIOLATIONS + 1
    warnings = backend_lines(caplog, logging.WARNING)
    assert len(warnings) <= 4, warnings
    assert len(backend_lines(caplog)) <= 30, backend_lines(caplog)
    assert any(f"{MAX_PROTOCOL_VIOLATIONS - 1} more similar log lines suppressed" in w for w in warnings), warnings
    assert any("too many refused requests" in w for w in warnings), warnings
    # The other port saw nothing of it.
    assert other.backend.connected and other.protocol_errors == 0
    check_rings_running(other.dev, good)
    good.sync()
    # The flooded port takes a new front-end.
    again = frontends(flooded.path).connect()
    again.handshake()
    again.sync()
    check_rings_running(flooded.dev, again)


def test_an_occasional_refused_request_keeps_the_connection(server, frontends):
    from vswitch.vhost.connection import MAX_PROTOCOL_VIOLATIONS, VIOLATION_FORGIVEN_AFTER
    clock = server.backend.connection.clock = FrozenClock()
    fe = frontends(server.path).connect()
    fe.handshake()
    refused = 0
    for _ in range(3):   # three bursts, each up to the bound, far enough apart
        for _ in range(MAX_PROTOCOL_VIOLATIONS):
            with pytest.raises(RequestFailed):
                fe.set_u64(Request.NET_SET_MTU, 70000, need_reply=True)
            refused += 1
        clock.now += MAX_PROTOCOL_VIOLATIONS * VIOLATION_FORGIVEN_AFTER
    fe.set_u64(Request.NET_SET_MTU, 9000, need_reply=True)
    fe.sync()
    assert server.backend.connected
    assert server.protocol_errors == refused
    assert server.info()["mtu"] == 9000
    check_rings_running(server.dev, fe)
