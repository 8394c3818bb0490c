"""vIOMMU over the vhost-user protocol: ACCESS_PLATFORM behind `iommu: true`,
IOTLB_MSG from a hand-driven front-end, MISS requests back on the back-end
request channel, rings that start once their IOVAs are mapped.

The back-end runs on its loop thread as in test_vhost_protocol.py; no PMD
runs, the test calls the C burst functions itself.
"""

from __future__ import annotations

import os

import pytest

from tests.support.frames import frame, mac
from tests.support.frontend import RequestFailed
from tests.support.vhost_servers import frontend_factory, harness_factory
from tests.unit.test_vhost_protocol import Harness, loop_thread  # noqa: F401 (fixture)
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.backend import VhostUserBackend
from vswitch.vhost.protocol import Request

RO, WO, RW = lib.VS_IOTLB_ACCESS_RO, lib.VS_IOTLB_ACCESS_WO, lib.VS_IOTLB_ACCESS_RW
ACCESS_PLATFORM = 1 << protocol.VIRTIO_F_ACCESS_PLATFORM
UVA_OFFSET = 0x7F0000000000


class IommuHarness(Harness):
    """A back-end whose port has `iommu: true`."""

    def __init__(self, loop, path, iommu=True):
        super().__init__(loop, path)
        self.backend = VhostUserBackend("vhost0", self.path, "server", 1, self.dev, self._quiesce,
                                        self._event, iommu=iommu)


@pytest.fixture
def make_server(loop_thread, tmp_path):
    yield from harness_factory(IommuHarness, loop_thread, tmp_path)


@pytest.fixture
def frontends():
    yield from frontend_factory(UVA_OFFSET)


def started(server, index) -> bool:
    return bool(server.loop.call(lambda: server.backend.device._rings[index].started))


def iotlb_info(server) -> dict:
    return server.info()["iotlb"]


def dequeue(server, index=1, max_=32) -> list[bytes]:
    """One TX burst from the C ring, as the PMD would; the frames, then returned to the guest."""
    pkts = ffi.new("struct vs_pkt[]", max_)
    vr = server.dev.vrings + index
    n = lib.vs_vring_dequeue_burst(server.dev, vr, pkts, max_)
    frames = [b"".join(ffi.buffer(pkts[i].segs[s].addr, pkts[i].segs[s].len)[:] for s in range(pkts[i].nsegs))
              for i in range(n)]
    lib.vs_vring_dequeue_done(server.dev, vr, pkts, n)
    return frames


def map_rings(fe):
    """Maps exactly the rings' parts, IOVA = guest-physical."""
    for ring in fe.rings:
        size = ring.size
        for gpa, length in ((ring.desc_gpa, 16 * size), (ring.avail_gpa, 6 + 2 * size),
                            (ring.used_gpa, 6 + 8 * size)):
            fe.iotlb_update(gpa, length, RW)


def test_access_platform_is_offered_only_with_iommu(make_server, frontends):
    plain = make_server(iommu=False)
    fe = frontends(plain.path)
    assert not fe.get_u64(Request.GET_FEATURES) & ACCESS_PLATFORM
    fe.handshake()
    with pytest.raises(RequestFailed):
        fe.iotlb_update(fe.mem.gpa_base, 4096)
    fe.sync()
    server = make_server()
    assert frontends(server.path).get_u64(Request.GET_FEATURES) & ACCESS_PLATFORM


def test_rings_start_once_their_iovas_are_mapped_and_the_back_end_asks_for_them(make_server, frontends):
    server = make_server()
    fe = frontends(server.path, iommu=True)
    fe.handshake()
    assert fe.features & ACCESS_PLATFORM
    misses = fe.iotlb_misses()
    assert misses and misses[0].type == lib.VS_IOTLB_MSG_MISS
    assert misses[0].iova == fe.rings[0].desc_gpa and misses[0].perm == RO   # an IOVA, not a UVA
    assert not started(server, 0) and not started(server, 1)
    map_rings(fe)
    fe.sync()
    assert started(server, 0) and started(server, 1)
    # The ring runs on the front-end's addresses of those IOVAs.
    assert int(ffi.cast("uintptr_t", server.dev.vrings[0].desc)) != 0
    assert iotlb_info(server)["entries"] == 6


def test_a_tx_miss_in_the_ring_engine_goes_to_the_front_end_and_its_answer_moves_the_ring(make_server, frontends):
    server = make_server()
    fe = frontends(server.path, iommu=True)
    fe.handshake()
    map_rings(fe)
    fe.sync()
    fe.iotlb_misses(timeout=0.2)                      # the rings' misses, answered already
    f = frame(mac(2), mac(1), os.urandom(200))
    head = fe.send_frame(0, f)
    buf, length = fe.tx_ring(0).read_desc(head)[:2]
    assert dequeue(server) == []
    [miss] = fe.iotlb_misses()
    assert (miss.iova, miss.perm) == (buf, RO)
    fe.iotlb_update(buf, length, RO)
    assert dequeue(server) == [f]
    assert iotlb_info(server)["misses_sent"] >= 1


@pytest.mark.parametrize("case, counter", [
    ("wraps", "wraps"), ("size 0", "size_zero"), ("overlaps", "overlaps"), ("perm 0", "bad_perm"),
    ("perm 7", "bad_perm"), ("outside guest memory", "outside_memory"), ("type MISS", "unknown_type"),
    ("type 9", "unknown_type"),
])
def test_hostile_iotlb_messages_are_refused_counted_and_the_session_goes_on(make_server, frontends, case, counter):
    server = make_server()
    fe = frontends(server.path, iommu=True)
    fe.handshake()
    fe.map_all()
    fe.sync()
    base, size = fe.mem.gpa_base, fe.mem.size
    iova, length, uaddr, perm, type_ = {
        "wraps": (2**64 - 4096, 8192, fe.mem.uva_base, RW, 2),
        "size 0": (base, 0, None, RW, 2),
        "overlaps": (base + 4096, 4096, fe.mem.gpa_to_uva(base) + 8192, RW, 2),
        "perm 0": (0x1000, 4096, fe.mem.uva_base, 0, 2),
        "perm 7": (0x1000, 4096, fe.mem.uva_base, 7, 2),
        "outside guest memory": (0x1000, 4096, fe.mem.uva_base + size, RW, 2),
        "type MISS": (0x1000, 4096, fe.mem.uva_base, RW, 1),
        "type 9": (0x1000, 4096, fe.mem.uva_base, RW, 9),
    }[case]
    uaddr = fe.mem.gpa_to_uva(iova) if uaddr is None else uaddr
    with pytest.raises(RequestFailed):
        fe.request(Request.IOTLB_MSG, protocol.pack_iotlb_msg(iova, length, uaddr, perm, type_))
    fe.sync()
    info = iotlb_info(server)
    assert info["refused"][counter] == 1 and info["entries"] == 1
    assert server.backend.connected and started(server, 0)


def test_a_short_iotlb_message_costs_the_connection(make_server, frontends):
    server = make_server()
    fe = frontends(server.path, iommu=True)
    fe.handshake()
    fe.send_message(Request.IOTLB_MSG, protocol.pack_iotlb_msg(0, 4096, 0, RW, 2)[:26])
    server.wait_connected(False)


def test_an_invalidation_waits_for_the_pmds_and_pauses_a_ring_whose_addresses_went(make_server, frontends):
    server = make_server()
    fe = frontends(server.path, iommu=True)
    fe.handshake()
    map_rings(fe)
    fe.sync()
    fe.iotlb_misses(timeout=0.2)
    tx_vr = server.dev.vrings[1]
    assert started(server, 1) and tx_vr.enabled
    # A range no ring uses: acknowledged after one wait for the PMDs; the rings run on.
    before = server.quiesces
    fe.iotlb_invalidate(fe.mem.gpa_base + fe.mem.size - 4096, 4096)
    assert server.quiesces == before + 1 and tx_vr.enabled
    # The TX ring's used ring: that ring pauses (no PMD touches it, no link event) and asks again.
    tx = fe.tx_ring(0)
    f = frame(mac(2), mac(1), b"a" * 100)
    head = fe.send_frame(0, f)
    events = len(server.events)
    fe.iotlb_invalidate(tx.used_gpa, 8)
    assert server.quiesces == before + 2
    assert not tx_vr.enabled and server.dev.vrings[0].enabled
    assert started(server, 1) and server.link_events()[-1] is True and len(server.events) == events
    [miss] = [m for m in fe.iotlb_misses() if m.iova == tx.used_gpa]
    assert miss.perm == RW
    # Mapped again, where it was: the ring resumes where it stood.
    fe.iotlb_update(tx.used_gpa, 6 + 8 * tx.size, RW)
    fe.sync()
    assert tx_vr.enabled
    buf, length = tx.read_desc(head)[:2]
    fe.iotlb_update(buf, length, RO)
    assert dequeue(server) == [f]


def test_a_paused_ring_whose_memory_moved_restarts_on_the_new_addresses(make_server, frontends):
    server = make_server()
    fe = frontends(server.path, iommu=True)
    fe.handshake()
    map_rings(fe)
    fe.sync()
    tx = fe.tx_ring(0)
    desc_before = int(ffi.cast("uintptr_t", server.dev.vrings[1].desc))
    fe.iotlb_invalidate(tx.desc_gpa, 16 * tx.size)
    assert not server.dev.vrings[1].enabled
    # The same IOVAs now lead to another page of guest memory (a hostile or remapping guest).
    elsewhere = fe.mem.alloc(16 * tx.size, 4096)
    fe.iotlb_update(tx.desc_gpa, 16 * tx.size, RW, uaddr=fe.mem.gpa_to_uva(elsewhere))
    fe.sync()
    assert server.dev.vrings[1].enabled
    assert int(ffi.cast("uintptr_t", server.dev.vrings[1].desc)) == desc_before + (elsewhere - tx.desc_gpa)


def test_the_iommu_key_is_a_boolean_off_by_default(tmp_path):
    from vswitch.config import ConfigError, parse
    from vswitch.ports.vhost_user import VhostUserPort

    port = {"name": "vm1", "type": "vhost-user", "path": str(tmp_path / "vm1.sock")}
    assert parse({"ports": [{**port, "iommu": True}]}).ports[0]["iommu"] is True
    assert parse({"ports": [port]}).ports[0].get("iommu", False) is False
    with pytest.raises(ConfigError, match="iommu"):
        parse({"ports": [{**port, "iommu": "yes"}]}, "x.yaml")
    spec = parse({"ports": [{**port, "iommu": True}]}).ports[0]
    vm = VhostUserPort("vm1", 0, spec, lambda *a: None, lambda: None)
    assert vm.backend.device.offered_features & ACCESS_PLATFORM
    assert vm.info()["iommu"] is True
