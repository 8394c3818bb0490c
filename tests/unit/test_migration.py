"""Live migration, the switch's part: dirty page logging and ring hand-over.

The ring engine tests give a device a dirty bitmap by hand and check that,
after frames are received, exactly the pages the switch wrote have their
bit: the receive buffers, the used ring (split) or the descriptors written
back (packed), and the sending guest's used ring.  The protocol tests drive
the back-end as QEMU does during a migration: SET_LOG_BASE with a memfd,
LOG_ALL turned on and off with SET_FEATURES while the rings run, ring
addresses resent with VHOST_VRING_F_LOG; GET_VRING_BASE at the source and
the destination resuming at that index; and the hostile SET_LOG_BASEs.
"""

from __future__ import annotations

import logging
import os

import pytest

from tests.support.frames import frame, mac
from tests.support.frontend import DRIVER_PROTOCOL_FEATURES
from tests.unit.test_packed_ring import PACKED
from tests.unit.test_ring_engine import DEFAULT_FEATURES, Guest, make_rig  # noqa: F401  (make_rig: fixture)
from tests.unit.test_vhost_protocol import (  # noqa: F401  (fixtures)
    backend_lines, check_rings_running, frontends, loop_thread, make_harness, server,
)
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.protocol import ProtocolFeature, Request, bits

PAGE = 4096
F_IN_ORDER = 1 << lib.VIRTIO_F_IN_ORDER
LOG_ALL = 1 << protocol.VHOST_F_LOG_ALL


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


def logged_pages(bitmap) -> set[int]:
    return {byte * 8 + bit for byte, value in enumerate(bytes(bitmap)) if value for bit in range(8)
            if value >> bit & 1}


class Log:
    """A dirty bitmap covering a guest's memory, given to its device as SET_LOG_BASE would."""

    def __init__(self, guest: Guest, size: int | None = None):
        end = max(m.gpa_base + m.size for m in guest.mems)
        self.size = size if size is not None else int(lib.vs_dirty_log_bytes_for(end))
        self.bitmap = ffi.new("uint8_t[]", self.size)
        self.c = ffi.new("struct vs_dirty_log *")
        self.c.bitmap = self.bitmap
        self.c.size = self.size
        guest.dev.log = self.c

    def pages(self) -> set[int]:
        return logged_pages(ffi.buffer(self.bitmap))


def log_used_at_gpa(g: Guest) -> None:
    """What SET_VRING_ADDR with VHOST_VRING_F_LOG tells a ring: its used ring's guest-physical address."""
    for vq in g.rx + g.tx:
        vr = g.vring(vq.index)
        vr.log_used = 1
        vr.log_used_gpa = vq.used_gpa


def split_used_entries(vq, start: int, count: int) -> list[tuple[int, int]]:
    out = []
    for i in range(start, start + count):
        slot = i % vq.size
        data = vq.mem.read(vq.used_gpa + 4 + 8 * slot, 8)
        out.append((int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little")))
    return out


def buffer_pages(chains: dict, entries: list[tuple[int, int]]) -> set[int]:
    """The pages of the first `len` bytes of each used entry's chain."""
    out: set[int] = set()
    for id_, length in entries:
        chain = chains[id_]
        for addr, size in zip(chain.addrs, chain.lengths):
            take = min(size, length)
            out |= pages(addr, take)
            length -= take
    return out


def split_used_pages(vq, start: int, count: int) -> set[int]:
    out = pages(vq.used_gpa + 2, 2)           # used->idx
    for i in range(start, start + count):
        out |= pages(vq.used_gpa + 4 + 8 * (i % vq.size), 8)
    return out


@pytest.mark.parametrize("log_used", [True, False], ids=["log_guest_addr", "used_ring_address"])
@pytest.mark.parametrize("payload, rx_size", [(60, 2048), (1400, 512), (3000, 4096)])
def test_split_rx_logs_exactly_the_buffers_and_the_used_rings(make_rig, log_used, payload, rx_size):
    a, b = Guest(0), Guest(1)
    rig = make_rig(a, b)
    a_log, b_log = Log(a), Log(b)
    if log_used:
        log_used_at_gpa(a)
        log_used_at_gpa(b)
    b.rx[0].post_rx(40, size=rx_size)
    chains = dict(b.rx[0]._chains)
    frames = [frame(mac(2), mac(1), os.urandom(payload)) for _ in range(5)]
    for f in frames:
        a.tx[0].post_tx(f)
    assert rig.poll() == 5
    used = b.rx[0].used_idx
    entries = split_used_entries(b.rx[0], 0, used)
    assert b_log.pages() == buffer_pages(chains, entries) | split_used_pages(b.rx[0], 0, used)
    # The sender's TX buffers are only read: its used ring is all it gets logged.
    assert a_log.pages() == split_used_pages(a.tx[0], 0, 5)
    assert [f.data for f in b.rx[0].read_rx_frames()] == frames
    assert a_log.c.outside == 0 and b_log.c.outside == 0
    assert b_log.c.bits_set == len(b_log.pages())


def test_split_used_ring_wrapping_around_logs_both_ends(make_rig):
    a, b = Guest(0, ring_size=16), Guest(1, ring_size=16)
    rig = make_rig(a, b)
    for _ in range(3):                       # used index 12: the next burst wraps
        b.rx[0].post_rx(4)
        for _ in range(4):
            a.tx[0].post_tx(frame(mac(2), mac(1), b"x" * 60))
        rig.poll()
        b.rx[0].read_rx_frames()
        a.tx[0].get_used()
    b_log = Log(b)
    b.rx[0].post_rx(8)
    chains = dict(b.rx[0]._chains)
    for _ in range(8):
        a.tx[0].post_tx(frame(mac(2), mac(1), b"y" * 60))
    rig.poll()
    entries = split_used_entries(b.rx[0], 12, 8)
    assert b_log.pages() == buffer_pages(chains, entries) | split_used_pages(b.rx[0], 12, 8)


def packed_desc_pages(vq, first: int, count: int) -> set[int]:
    out: set[int] = set()
    for i in range(first, first + count):
        out |= pages(vq.desc_gpa + 16 * (i % vq.size), 16)
    return out


@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("payload, rx_size", [(60, 2048), (1400, 512)])
def test_packed_rx_logs_exactly_the_buffers_and_the_descriptors_written_back(make_rig, in_order, payload,
                                                                              rx_size):
    features = PACKED | (F_IN_ORDER if in_order else 0)
    a, b = Guest(0, features=features), Guest(1, features=features)
    rig = make_rig(a, b)
    a_log, b_log = Log(a), Log(b)
    b.rx[0].post_rx(40, size=rx_size)
    bufs = {c.id: c for c in b.rx[0]._chains.values()}
    frames = [frame(mac(2), mac(1), os.urandom(payload)) for _ in range(5)]
    for f in frames:
        a.tx[0].post_tx(f)
    assert rig.poll() == 5
    received = b.rx[0].read_rx_frames()
    assert [f.data for f in received] == frames
    used_buffers = sum(f.num_buffers for f in received)
    # Each receive buffer is one descriptor: the first `used_buffers` slots were written back,
    # and each buffer holds hdr + frame bytes from its start.
    expected = packed_desc_pages(b.rx[0], 0, used_buffers)
    for f in received:
        left = len(f.header) + len(f.data)
        for head in f.heads:
            chain = bufs[head]
            take = min(chain.lengths[0], left)
            expected |= pages(chain.addrs[0], take)
            left -= take
    assert b_log.pages() == expected
    # The sender: the TX descriptors written back (one entry for the burst with IN_ORDER,
    # over the same slots).
    assert a_log.pages() == packed_desc_pages(a.tx[0], 0, 5)
    assert a_log.c.outside == 0 and b_log.c.outside == 0


def test_without_a_log_nothing_is_marked_and_a_short_log_is_not_overrun(make_rig):
    a, b = Guest(0), Guest(1)
    rig = make_rig(a, b)
    # b's buffers lie past what a one-byte bitmap covers (8 pages): counted, never written past.
    guard = ffi.new("uint8_t[64]")
    short = ffi.new("struct vs_dirty_log *")
    short.bitmap = guard
    short.size = 1
    b.dev.log = short
    b.rx[0].post_rx(4)
    a.tx[0].post_tx(frame(mac(2), mac(1), b"z" * 100))
    rig.poll()
    assert a.dev.log == ffi.NULL and b.rx[0].read_rx_frames()
    assert short.outside > 0 and bytes(ffi.buffer(guard))[1:] == bytes(63)


# ----------------------------------------------------------------------------- protocol

MIGRATING_FRONTEND = dict(protocol_features=DRIVER_PROTOCOL_FEATURES | bits(ProtocolFeature.LOG_SHMFD))


def make_log_fd(size: int, file_size: int | None = None) -> tuple[int, object]:
    fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size if file_size is None else file_size)
    import mmap
    return fd, mmap.mmap(fd, max(size if file_size is None else file_size, 1))


def log_size_for(fe) -> int:
    r = fe.mem.region()
    return int(lib.vs_dirty_log_bytes_for(r["guest_phys_addr"] + r["size"]))


def move_frames(dev, fe, n: int = 1) -> None:
    """Plays the PMD: n frames from the guest's TX ring into its own RX ring."""
    for _ in range(n):
        fe.send_frame(0, frame(mac(2), mac(1), os.urandom(100)))
    fe.post_rx(0, n)
    pkts = ffi.new("struct vs_pkt[32]")
    got = lib.vs_vring_dequeue_burst(dev, dev.vrings + 1, pkts, 32)
    ptrs = ffi.new("struct vs_pkt *[32]", [pkts + i for i in range(got)])
    assert lib.vs_vring_enqueue_burst(dev, dev.vrings + 0, ptrs, got) == n
    lib.vs_vring_dequeue_done(dev, dev.vrings + 1, pkts, got)
    fe.wait_tx_done(0)
    assert len(fe.receive(0, n)) == n


def set_log_base(fe, size: int, offset: int = 0, fd: int | None = None) -> bytes:
    own = fd is None
    if own:
        fd, _ = make_log_fd(size + offset)
    try:
        return fe.request(Request.SET_LOG_BASE, protocol.pack_log(size, offset), [fd], reply=True)
    finally:
        if own:
            os.close(fd)


def test_offered_for_migration():
    assert protocol.OFFERED_FEATURES & LOG_ALL
    assert protocol.OFFERED_PROTOCOL_FEATURES & bits(ProtocolFeature.LOG_SHMFD, ProtocolFeature.RARP)


def test_logging_follows_log_all_and_the_log_base(server, frontends):
    fe = frontends(server.path, **MIGRATING_FRONTEND).connect()
    fe.handshake()
    fe.sync()
    size = log_size_for(fe)
    fd, bitmap = make_log_fd(size)
    try:
        # QEMU waits for a reply to SET_LOG_BASE: an empty one.
        assert fe.request(Request.SET_LOG_BASE, protocol.pack_log(size, 0), [fd], reply=True) == b""
    finally:
        os.close(fd)
    assert server.info()["dirty_log"] == {"mapped": True, "logging": False, "size": size, "bits_set": 0,
                                          "pending": 0, "outside": 0}
    move_frames(server.dev, fe)
    assert not logged_pages(bitmap), "logged without LOG_ALL"

    # Migration starts: LOG_ALL while the rings run, then each ring's address with the log flag.
    fe.set_u64(Request.SET_FEATURES, fe.features | LOG_ALL)
    check_rings_running(server.dev, fe)
    assert server.dev.log != ffi.NULL
    for ring in fe.rings:
        fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(
            ring.index, ring.desc_uva, ring.used_uva, ring.avail_uva,
            flags=1 << protocol.VHOST_VRING_F_LOG, log=ring.used_gpa))
    check_rings_running(server.dev, fe)
    for ring in fe.rings:
        vr = server.dev.vrings[ring.index]
        assert (vr.log_used, vr.log_used_gpa) == (1, ring.used_gpa)
    rx, tx = fe.rx_ring(0), fe.tx_ring(0)
    rx_used_before = rx.used_idx
    move_frames(server.dev, fe, 3)
    got = logged_pages(bitmap)
    assert split_used_pages(rx, rx_used_before, 3) <= got and split_used_pages(tx, 1, 3) <= got
    assert server.info()["dirty_log"]["bits_set"] == len(got)

    # Migration ends (or is cancelled): LOG_ALL off, nothing more is logged.
    bitmap[:] = bytes(size)
    fe.set_u64(Request.SET_FEATURES, fe.features)
    assert server.dev.log == ffi.NULL
    move_frames(server.dev, fe)
    assert not logged_pages(bitmap)
    check_rings_running(server.dev, fe)


def test_a_new_log_base_replaces_the_log(server, frontends):
    fe = frontends(server.path, **MIGRATING_FRONTEND).connect()
    fe.handshake()
    fe.set_u64(Request.SET_FEATURES, fe.features | LOG_ALL)
    size = log_size_for(fe)
    first_fd, first = make_log_fd(size)
    second_fd, second = make_log_fd(size + 4096, size + 8192)
    try:
        set_log_base(fe, size, fd=first_fd)
        set_log_base(fe, size + 4096, offset=4096, fd=second_fd)   # offset: the log starts a page in
    finally:
        os.close(first_fd)
        os.close(second_fd)
    move_frames(server.dev, fe)
    assert not logged_pages(first)
    assert logged_pages(second[:4096]) == set() and logged_pages(second[4096:])
    assert server.info()["dirty_log"]["size"] == size + 4096


def test_set_log_fd_is_kept_until_disconnect(server, frontends):
    fe = frontends(server.path, **MIGRATING_FRONTEND).connect()
    fe.handshake()
    efd = os.eventfd(0)
    try:
        fe.request(Request.SET_LOG_FD, b"", [efd])
        fe.sync()
        assert server.backend.device.log_fd >= 0
    finally:
        os.close(efd)
    fe.close()
    server.wait_connected(False)
    assert server.backend.device.log_fd == -1


def _no_fd(fe):
    fe.send_message(Request.SET_LOG_BASE, protocol.pack_log(log_size_for(fe), 0))


def _pipe(fe):
    r, w = os.pipe()
    try:
        fe.send_message(Request.SET_LOG_BASE, protocol.pack_log(log_size_for(fe), 0), [r])
    finally:
        os.close(r)
        os.close(w)


def _send(fe, size, offset=0, file_size=None):
    fd, _ = make_log_fd(size, file_size)
    try:
        fe.send_message(Request.SET_LOG_BASE, protocol.pack_log(size, offset), [fd])
    finally:
        os.close(fd)


HOSTILE_LOGS = {
    "empty log": (lambda fe: _send(fe, 0, file_size=4096), "the log is empty"),
    "log too small for guest memory": (lambda fe: _send(fe, log_size_for(fe) - 1), "too small"),
    "log too large for guest memory": (lambda fe: fe.send_message(
        Request.SET_LOG_BASE, protocol.pack_log(1 << 40, 0), [fe.mem.fd]), "larger than guest memory"),
    "offset beyond the fd": (lambda fe: _send(fe, log_size_for(fe), offset=1 << 20,
                                              file_size=log_size_for(fe)), "past the end of its fd"),
    "offset overflows": (lambda fe: _send(fe, log_size_for(fe), offset=2**64 - 4096,
                                          file_size=log_size_for(fe)), "past the end of its fd"),
    "fd is a pipe": (_pipe, "not a shared memory file"),
    "fd missing": (_no_fd, "0 file descriptors attached, expected 1"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LOGS))
def test_hostile_log_base_is_refused_with_one_line_and_counted(server, frontends, case, caplog):
    caplog.set_level(logging.INFO)
    send, why = HOSTILE_LOGS[case]
    fe = frontends(server.path, **MIGRATING_FRONTEND).connect()
    fe.handshake()
    fe.sync()
    refused, errors = server.info()["log_refused"], server.protocol_errors
    send(fe)
    assert fe.wait_closed(), f"{case}: the back-end kept the connection"
    server.wait_connected(False)
    assert server.protocol_errors == errors + 1
    assert server.info()["log_refused"] == refused + (0 if case == "fd missing" else 1)
    [line] = [m for m in backend_lines(caplog, logging.WARNING) if "SET_LOG_BASE" in m]
    assert why in line and "\n" not in line
    assert server.dev.log == ffi.NULL
    # Nothing else disturbed: the next front-end runs.
    good = frontends(server.path).connect()
    good.handshake()
    good.sync()
    check_rings_running(server.dev, good)


@pytest.mark.parametrize("stop_before, protocol_features, why", [
    (Request.SET_MEM_TABLE, MIGRATING_FRONTEND["protocol_features"], "no memory table yet"),
    (None, DRIVER_PROTOCOL_FEATURES, "LOG_SHMFD was not negotiated"),
])
def test_log_base_out_of_place_is_refused(server, frontends, stop_before, protocol_features, why, caplog):
    fe = frontends(server.path, protocol_features=protocol_features).connect()
    fe.handshake(stop_before=stop_before)
    fd, _ = make_log_fd(4096)
    try:
        fe.send_message(Request.SET_LOG_BASE, protocol.pack_log(4096, 0), [fd])
    finally:
        os.close(fd)
    assert fe.wait_closed()
    assert server.info()["log_refused"] == 1
    assert any(why in m for m in backend_lines(caplog, logging.WARNING))


def test_destination_resumes_at_the_index_the_source_handed_over(make_harness, frontends):
    """GET_VRING_BASE stops each ring at the source; the destination, given
    that index with SET_VRING_BASE over the same guest memory, goes on from
    exactly there (not from the driver's avail index, nor from 0)."""
    src, dst = make_harness(name="src.sock"), make_harness(name="dst.sock")
    fe = frontends(src.path).connect()
    fe.handshake()
    fe.sync()
    fe.post_rx(0, 8)                          # buffers the source never fills
    move_frames(src.dev, fe, 3)
    bases = [fe.get_vring_base(i) for i in (0, 1)]
    assert bases == [3, 3]
    assert not any(lib.vs_vring_is_enabled(src.dev.vrings + i) for i in (0, 1))
    assert fe.rx_ring(0).avail_idx == 11      # the driver's index is further on: not the base

    fe.disconnect()
    fe.path = dst.path
    fe.connect()
    fe.handshake(stop_before=Request.SET_VRING_NUM)
    for ring, base in zip(fe.rings, bases):
        i = ring.index
        fe.request(Request.SET_VRING_NUM, protocol.pack_vring_state(i, ring.size))
        fe.request(Request.SET_VRING_BASE, protocol.pack_vring_state(i, base))
        fe.request(Request.SET_VRING_ADDR, protocol.pack_vring_addr(i, ring.desc_uva, ring.used_uva,
                                                                    ring.avail_uva))
        fe.request(Request.SET_VRING_KICK, protocol.pack_vring_fd(i), [fe.kickfds[i]])
        fe.request(Request.SET_VRING_CALL, protocol.pack_vring_fd(i), [fe.callfds[i]])
        fe.set_vring_enable(i, True)
    fe.set_u64(Request.SET_STATUS, 0xF)
    fe.sync()
    for i, base in enumerate(bases):
        vr = dst.dev.vrings + i
        assert lib.vs_vring_base(vr) == base and vr.resumed_from_used == 0
    # The next frame lands in the fourth buffer and the fourth used entry.
    rx = fe.rx_ring(0)
    move_frames(dst.dev, fe, 1)
    assert rx.used_idx == 4 and fe.tx_ring(0).used_idx == 4
