"""Postcopy live migration, the back-end's part, over a real vhost-user socket.

The test plays QEMU's destination (hw/virtio/vhost-user.c): POSTCOPY_ADVISE
(the reply carries a userfaultfd), POSTCOPY_LISTEN, then SET_MEM_TABLE,
which the back-end answers with its own address of each region, and the
acknowledgement after which the back-end registers its mappings with the
userfaultfd; POSTCOPY_END unregisters them.  Registration is read from the
kernel (/proc/self/smaps: the "um" VmFlag, userfaultfd missing-page
tracking), and a real missing page is made by punching a hole in the guest's
memfd: a thread playing the PMD then sleeps on it until the test, playing
QEMU, reads the fault from the fd and wakes it.  And every refusal.
"""

from __future__ import annotations

import mmap
import os
import select
import threading
import time

import pytest

from tests.support.frames import frame, mac
from tests.support.frontend import DRIVER_PROTOCOL_FEATURES, RequestFailed
from tests.support.vhost_servers import frontend_factory, harness_factory
from tests.unit.test_vhost_protocol import Harness, check_rings_running, loop_thread  # noqa: F401 (fixture)
from vswitch.native import ffi, lib
from vswitch.vhost import protocol, userfault
from vswitch.vhost.backend import VhostUserBackend
from vswitch.vhost.device import MESSAGES
from vswitch.vhost.protocol import ProtocolFeature, Request, bits

PAGEFAULT = 1 << ProtocolFeature.PAGEFAULT
POSTCOPY_FEATURES = DRIVER_PROTOCOL_FEATURES | bits(ProtocolFeature.PAGEFAULT, ProtocolFeature.LOG_SHMFD)
UVA_OFFSET = 0x7F0000000000


class PostcopyHarness(Harness):
    """A back-end whose port has `postcopy: true` (or not)."""

    def __init__(self, loop, path, postcopy=True):
        super().__init__(loop, path)
        self.pmd: threading.Thread | None = None      # a thread playing the PMD, waited for by quiesce
        self.backend = VhostUserBackend("vhost0", self.path, "server", 1, self.dev, self._quiesce,
                                        self._event, postcopy=postcopy)

    def _quiesce(self):
        super()._quiesce()
        if self.pmd is not None:
            self.pmd.join(10)

    def postcopy(self) -> dict:
        return self.info()["postcopy"]


@pytest.fixture
def make_server(loop_thread, tmp_path):
    yield from harness_factory(PostcopyHarness, loop_thread, tmp_path)


@pytest.fixture
def frontends():
    yield from frontend_factory(UVA_OFFSET, protocol_features=POSTCOPY_FEATURES)


@pytest.fixture
def ufds():
    """Userfaultfds the test received: closed at the end."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def uffd_registered(start: int, length: int) -> bool:
    """True if the kernel tracks missing pages of every mapping in [start, start+length) for a userfaultfd."""
    seen, flags = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                flags = (lo, hi) if lo < start + length and start < hi else None
            elif head == "VmFlags:" and flags is not None:
                seen.append("um" in line.split()[1:])
    if not seen:
        raise AssertionError(f"no mapping at {start:#x}")
    return all(seen)


def region(server):
    """The back-end's one mapped region, published or waiting for the ack: (mapping address, length, region start)."""
    def get():
        device = server.backend.device
        r = (device._postcopy_pending or device._regions)[0]
        return r.address, len(r.mapping), r.region_address
    return server.loop.call(get)


def to_listen(server, fe, ufds):
    """Connects as QEMU's destination does, up to POSTCOPY_LISTEN."""
    fe.handshake(stop_before=Request.SET_MEM_TABLE)
    ufds.append(fe.postcopy_advise())
    fe.postcopy_listen()
    return ufds[-1]


def postcopy_start(server, fe, ufds):
    """The destination's whole start: ADVISE, LISTEN, the postcopy memory table, the rings."""
    ufd = to_listen(server, fe, ufds)
    reply = fe.set_mem_table_postcopy()
    fe.handshake(start_after=Request.SET_MEM_TABLE)
    fe.sync()
    return ufd, reply


# ------------------------------------------------------------------ offer and flow


def test_pagefault_is_offered_only_with_postcopy_and_then_without_mem_slots(make_server, frontends):
    plain, postcopy = make_server(postcopy=False), make_server()
    offered = {}
    for name, server in (("plain", plain), ("postcopy", postcopy)):
        fe = frontends(server.path)
        fe.handshake(stop_before=Request.SET_PROTOCOL_FEATURES)
        offered[name] = fe.offered_protocol_features
    assert not offered["plain"] & PAGEFAULT
    assert offered["postcopy"] & PAGEFAULT
    assert offered["plain"] & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert not offered["postcopy"] & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert offered["postcopy"] & ~PAGEFAULT == offered["plain"] & ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)


def test_advise_listen_mem_table_ack_registers_then_end_unregisters(make_server, frontends, ufds):
    server = make_server()
    fe = frontends(server.path)
    ufd = to_listen(server, fe, ufds)
    assert userfault.is_userfaultfd(ufd)
    assert server.postcopy().items() >= {"advised": True, "listening": True, "registered_regions": 0}.items()

    reply = fe.set_mem_table_postcopy(ack=None)
    address, length, region_start = region(server)
    sent = fe.memory_regions()[0]
    # The reply: the same region, at the switch's address; QEMU finds faulting pages by it.
    assert reply == [protocol.MemoryRegion(sent.guest_phys_addr, sent.size, region_start, sent.mmap_offset)]
    assert region_start != sent.user_addr
    # Mapped, not registered, not published until the acknowledgement.
    assert not uffd_registered(address, length)
    assert server.dev.mem == ffi.NULL and server.postcopy()["awaiting_ack"]

    fe.send_message(Request.SET_MEM_TABLE, protocol.pack_u64(0))
    fe.handshake(start_after=Request.SET_MEM_TABLE)
    fe.sync()
    assert uffd_registered(address, length)
    assert server.dev.mem != ffi.NULL
    check_rings_running(server.dev, fe)
    info = server.postcopy()
    assert info["registered_regions"] == 1 and info["registered_bytes"] == length and not info["awaiting_ack"]

    # Frames flow as usual over pages that are present.
    fe.send_frame(0, frame(mac(2), mac(1), b"present"))
    assert dequeue(server) == [frame(mac(2), mac(1), b"present")]

    assert fe.postcopy_end() == 0
    assert not uffd_registered(address, length)
    info = server.postcopy()
    assert not info["advised"] and not info["listening"] and info["registered_regions"] == 0
    assert info["listens"] == 1 and info["ends"] == 1 and info["refused"] == 0
    check_rings_running(server.dev, fe)       # the rings run on, on the same memory
    assert server.backend.connected and server.protocol_errors == 0


def dequeue(server, index=1, max_=32) -> list[bytes]:
    """One TX burst from the C ring, as the PMD would (tests/unit/test_viommu_protocol.py)."""
    pkts = ffi.new("struct vs_pkt[]", max_)
    vr = server.dev.vrings + index
    n = lib.vs_vring_dequeue_burst(server.dev, vr, pkts, max_)
    frames = [b"".join(ffi.buffer(pkts[i].segs[s].addr, pkts[i].segs[s].len)[:] for s in range(pkts[i].nsegs))
              for i in range(n)]
    lib.vs_vring_dequeue_done(server.dev, vr, pkts, n)
    return frames


def missing_page_under_next_frame(fe, payload: bytes):
    """Posts a TX frame, then takes the page of its descriptor out of the guest's memfd
    (as a page not yet migrated): returns the page's guest-physical address and content.
    The ring engine reads the descriptor in C, without the GIL, as the PMD thread does."""
    ring = fe.tx_ring(0)
    head = fe.send_frame(0, frame(mac(2), mac(1), payload))
    gpa = ring.desc_gpa + 16 * head
    page = gpa - gpa % mmap.PAGESIZE
    content = fe.mem.read(page, mmap.PAGESIZE)
    offset = page - fe.mem.gpa_base
    fe.mem.mm.madvise(mmap.MADV_REMOVE, offset, mmap.PAGESIZE)
    assert fe.mem.read(page, 8) == bytes(8)   # gone from the file (our own read made a zero page again)
    fe.mem.mm.madvise(mmap.MADV_REMOVE, offset, mmap.PAGESIZE)
    return page, content


def test_a_missing_page_puts_the_pmd_to_sleep_until_the_front_end_places_it(make_server, frontends, ufds):
    server = make_server()
    fe = frontends(server.path)
    ufd, reply = postcopy_start(server, fe, ufds)
    page, content = missing_page_under_next_frame(fe, b"migrated late")
    got = []
    pmd = server.pmd = threading.Thread(target=lambda: got.extend(dequeue(server)), daemon=True)
    pmd.start()
    # QEMU's fault thread: the fault arrives on the fd the switch handed over, at the switch's address.
    assert select.select([ufd], [], [], 5)[0], "no fault on the userfaultfd"
    event, _, _, _, _flags, address, _ = userfault.MSG.unpack(os.read(ufd, userfault.MSG.size))
    assert event == userfault.UFFD_EVENT_PAGEFAULT
    expected = reply[0].user_addr + (page - reply[0].guest_phys_addr)
    assert address == expected, f"fault at {address:#x}, the page is at {expected:#x}"
    time.sleep(0.2)
    assert pmd.is_alive() and not got            # asleep on the page
    fe.mem.write(page, content)                  # the page arrives (QEMU: UFFDIO_COPY into the file)
    userfault.wake(ufd, address, mmap.PAGESIZE)
    pmd.join(5)
    assert not pmd.is_alive()
    assert got == [frame(mac(2), mac(1), b"migrated late")]
    assert server.backend.connected and server.protocol_errors == 0


def test_a_front_end_that_vanishes_mid_postcopy_does_not_leave_the_pmd_asleep(make_server, frontends, ufds):
    server = make_server()
    fe = frontends(server.path)
    ufd, _ = postcopy_start(server, fe, ufds)
    missing_page_under_next_frame(fe, b"never sent")
    done = threading.Event()
    pmd = server.pmd = threading.Thread(target=lambda: (dequeue(server), done.set()), daemon=True)
    pmd.start()
    assert select.select([ufd], [], [], 5)[0]
    time.sleep(0.1)
    assert not done.is_set()
    # QEMU dies: its socket closes (its copy of the fd stays open here, as a hung QEMU's would).
    fe.disconnect()
    server.wait_connected(False)
    # Teardown unregistered the memory: the sleeping thread went on (reading a zero page).
    assert done.wait(5), "the PMD thread is still asleep on the missing page"
    assert not server.postcopy()["advised"]


def test_the_dirty_log_is_not_used_while_listening(make_server, frontends, ufds, tmp_path):
    server = make_server()
    fe = frontends(server.path)
    postcopy_start(server, fe, ufds)
    log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(log_fd, 1 << 16)
        with pytest.raises(RequestFailed):
            fe.request(Request.SET_LOG_BASE, protocol.pack_log(1 << 12, 0), [log_fd], need_reply=True)
        # LOG_ALL on while listening: the C device gets no log.
        fe.set_u64(Request.SET_FEATURES, fe.features | 1 << protocol.VHOST_F_LOG_ALL)
        assert server.dev.log == ffi.NULL
        assert server.info()["log_refused"] == 1
        fe.set_u64(Request.SET_FEATURES, fe.features)
        assert fe.postcopy_end() == 0
        # After END the port is an ordinary one again: a log is taken.
        fe.request(Request.SET_LOG_BASE, protocol.pack_log(int(lib.vs_dirty_log_bytes_for(
            fe.mem.gpa_base + fe.mem.size)), 0), [log_fd], reply=True)
        fe.set_u64(Request.SET_FEATURES, fe.features | 1 << protocol.VHOST_F_LOG_ALL)
        assert server.dev.log != ffi.NULL
    finally:
        os.close(log_fd)


# ------------------------------------------------------------------ refusals


def test_the_message_rows(make_server):
    assert MESSAGES[Request.POSTCOPY_ADVISE].reply is protocol.Reply.FD
    assert MESSAGES[Request.POSTCOPY_END].reply is protocol.Reply.U64
    assert MESSAGES[Request.SET_MEM_TABLE].reply is protocol.Reply.ACK_OR_MEMORY
    assert not any(MESSAGES[r].quiesce for r in (Request.POSTCOPY_ADVISE, Request.POSTCOPY_LISTEN,
                                                 Request.POSTCOPY_END))


def refused(server, fe, request, payload=b"", fds=()):
    """Sends a request with NEED_REPLY; True if the back-end answered with a failure ack."""
    try:
        fe.request(request, payload, fds, need_reply=True)
    except RequestFailed:
        return True
    return False


def test_advise_on_a_port_without_postcopy_is_refused(make_server, frontends):
    server = make_server(postcopy=False)
    fe = frontends(server.path)
    fe.handshake()
    assert not fe.protocol_features & PAGEFAULT       # not offered, so not negotiated
    assert refused(server, fe, Request.POSTCOPY_ADVISE)
    assert server.postcopy()["refused"] == 1 and not server.postcopy()["advised"]
    # As QEMU sends it (no NEED_REPLY, waiting for the fd): the connection is closed.
    fe.send_message(Request.POSTCOPY_ADVISE)
    assert fe.wait_closed()


def test_advise_without_pagefault_negotiated_is_refused(make_server, frontends):
    server = make_server()
    fe = frontends(server.path, protocol_features=DRIVER_PROTOCOL_FEATURES)
    fe.handshake()
    assert refused(server, fe, Request.POSTCOPY_ADVISE)
    assert server.postcopy()["refused"] == 1


def test_out_of_order_postcopy_messages_are_refused(make_server, frontends, ufds):
    server = make_server()
    fe = frontends(server.path)
    fe.handshake(stop_before=Request.SET_MEM_TABLE)
    assert refused(server, fe, Request.POSTCOPY_LISTEN)          # LISTEN before ADVISE
    assert refused(server, fe, Request.POSTCOPY_END)             # END without LISTEN
    ufds.append(fe.postcopy_advise())
    assert refused(server, fe, Request.POSTCOPY_ADVISE)          # ADVISE twice
    assert refused(server, fe, Request.POSTCOPY_END)             # END after ADVISE, without LISTEN
    fe.postcopy_listen()
    assert refused(server, fe, Request.POSTCOPY_LISTEN)          # LISTEN twice
    assert server.postcopy()["refused"] == 5
    assert server.backend.connected
    fe.set_mem_table_postcopy()
    fe.handshake(start_after=Request.SET_MEM_TABLE)
    assert fe.postcopy_end() == 0
    assert refused(server, fe, Request.POSTCOPY_END)             # END twice
    assert server.postcopy()["refused"] == 6


def test_listen_after_the_memory_table_is_refused(make_server, frontends, ufds):
    server = make_server()
    fe = frontends(server.path)
    fe.handshake()
    ufds.append(fe.postcopy_advise())
    assert refused(server, fe, Request.POSTCOPY_LISTEN)
    assert not server.postcopy()["listening"] and server.postcopy()["refused"] == 1


@pytest.mark.parametrize("request_, payload", [
    (Request.POSTCOPY_ADVISE, protocol.pack_u64(0)),
    (Request.POSTCOPY_LISTEN, protocol.pack_u64(0)),
    (Request.POSTCOPY_END, b"\0" * 4),
])
def test_postcopy_messages_with_a_payload_close_the_connection(make_server, frontends, request_, payload):
    server = make_server()
    fe = frontends(server.path)
    fe.handshake(stop_before=Request.SET_MEM_TABLE)
    fe.send_message(request_, payload)
    assert fe.wait_closed()
    assert server.protocol_errors == 1 and server.postcopy()["refused"] == 0
    assert not server.postcopy()["advised"]


def test_advise_with_an_fd_attached_closes_the_connection(make_server, frontends):
    server = make_server()
    fe = frontends(server.path)
    fe.handshake(stop_before=Request.SET_MEM_TABLE)
    fe.send_message(Request.POSTCOPY_ADVISE, b"", [fe.mem.fd])
    assert fe.wait_closed()
    assert not server.postcopy()["advised"]


@pytest.mark.parametrize("case", ["other request", "ack not zero", "ack of 4 bytes", "ack with an fd",
                                  "a second table"])
def test_anything_but_a_zero_ack_after_the_postcopy_table_closes_the_connection(make_server, frontends,
                                                                                ufds, case):
    server = make_server()
    fe = frontends(server.path)
    to_listen(server, fe, ufds)
    fe.set_mem_table_postcopy(ack=None)
    address, length, _ = region(server)
    if case == "other request":
        fe.send_message(Request.GET_FEATURES)
    elif case == "ack not zero":
        fe.send_message(Request.SET_MEM_TABLE, protocol.pack_u64(1))
    elif case == "ack of 4 bytes":
        fe.send_message(Request.SET_MEM_TABLE, b"\0" * 4)
    elif case == "ack with an fd":
        fe.send_message(Request.SET_MEM_TABLE, protocol.pack_u64(0), [fe.mem.fd])
    else:
        fe.send_message(Request.SET_MEM_TABLE, protocol.pack_memory_table(fe.memory_regions()), [fe.mem.fd])
    assert fe.wait_closed()
    server.wait_connected(False)
    assert server.protocol_errors == 1
    assert server.dev.mem == ffi.NULL
    info = server.postcopy()
    assert not info["advised"] and not info["awaiting_ack"] and info["registered_regions"] == 0


def test_a_reconnecting_front_end_starts_without_postcopy_state(make_server, frontends, ufds):
    server = make_server()
    fe = frontends(server.path)
    postcopy_start(server, fe, ufds)
    fe.disconnect()
    server.wait_connected(False)
    fe2 = frontends(server.path)
    fe2.handshake()
    fe2.sync()
    check_rings_running(server.dev, fe2)
    address, length, _ = region(server)
    assert not uffd_registered(address, length)
    assert refused(server, fe2, Request.POSTCOPY_LISTEN)        # the old ADVISE is gone with its session


def test_the_postcopy_key_is_a_boolean_off_by_default(tmp_path):
    from vswitch.config import ConfigError, parse
    from vswitch.ports.vhost_user import VhostUserPort

    port = {"name": "vm1", "type": "vhost-user", "path": str(tmp_path / "vm1.sock")}
    assert parse({"ports": [{**port, "postcopy": True}]}).ports[0]["postcopy"] is True
    assert parse({"ports": [port]}).ports[0].get("postcopy", False) is False
    with pytest.raises(ConfigError, match="postcopy"):
        parse({"ports": [{**port, "postcopy": "yes"}]}, "x.yaml")
    spec = parse({"ports": [{**port, "postcopy": True}]}).ports[0]
    vm = VhostUserPort("vm1", 0, spec, lambda *a: None, lambda: None)
    assert vm.backend.device.offered_protocol_features & PAGEFAULT
    assert vm.info()["postcopy"] is True
    plain = VhostUserPort("vm2", 1, parse({"ports": [port]}).ports[0], lambda *a: None, lambda: None)
    assert not plain.backend.device.offered_protocol_features & PAGEFAULT


def test_a_new_table_while_listening_is_answered_and_registered_too(make_server, frontends, ufds):
    """QEMU resends its table if the guest's memory changes during postcopy: the same exchange."""
    server = make_server()
    fe = frontends(server.path)
    postcopy_start(server, fe, ufds)
    first, first_length, _ = region(server)
    reply = fe.set_mem_table_postcopy()
    fe.sync()
    address, length, region_start = region(server)
    assert reply[0].user_addr == region_start and address != first
    assert uffd_registered(address, length)
    assert server.postcopy()["registered_regions"] == 1
    check_rings_running(server.dev, fe)
    assert fe.postcopy_end() == 0
    assert not uffd_registered(address, length)
