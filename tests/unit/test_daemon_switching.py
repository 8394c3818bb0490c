"""vswitchd end to end with in-process vhost-user front-ends (no root needed).

Each front-end is a Python guest (tests/support/frontend.py) that does the
real vhost-user handshake over the port's socket and shares its memfd memory
with the switch, like DPDK virtio-user does.
"""

from __future__ import annotations

import os

import pytest

from tests.support.frames import BROADCAST, frame, mac, wait_for
from tests.support.daemon import Vswitchd
from tests.support.frontend import VhostUserFrontend


def vhost_ports(tmp_path, n, mode="server", queues=1):
    return [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock"), "mode": mode,
             "queues": queues} for i in range(n)]


def link(d: Vswitchd, name: str) -> str:
    return d.port(name)["link"]


@pytest.fixture
def three(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 3)) as d:
        guests = d.connect_guests(["vm0", "vm1", "vm2"])
        yield d, guests
        for fe in guests:
            fe.close()


def test_broadcast_reaches_every_other_port_then_unicast_only_its_port(three):
    d, (g0, g1, g2) = three
    g0.send_frame(0, frame(BROADCAST, mac(1)))
    assert [len(g.receive(0, 1, timeout=0.5)) for g in (g0, g1, g2)] == [0, 1, 1]
    g2.send_frame(0, frame(mac(1), mac(3)))
    assert [len(g.receive(0, 1, timeout=0.5)) for g in (g0, g1, g2)] == [1, 0, 0]
    g0.send_frame(0, frame(mac(3), mac(1), b"hello"))
    got = [g.receive(0, 1, timeout=0.5) for g in (g0, g1, g2)]
    assert [len(x) for x in got] == [0, 0, 1]
    assert got[2][0].data == frame(mac(3), mac(1), b"hello")
    fdb = {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}
    assert fdb == {"02:00:00:00:00:01": "vm0", "02:00:00:00:00:03": "vm2"}
    stats = {p["name"]: p["stats"] for p in d.ctl("show")["ports"]}
    assert stats["vm0"]["rx_packets"] == 2 and stats["vm0"]["tx_packets"] == 1
    assert stats["vm1"]["tx_packets"] == 1 and stats["vm2"]["tx_packets"] == 2
    assert all(s["rx_errors"] == 0 and s["tx_dropped"] == 0 for s in stats.values())
    human = d.ctl_raw("fdb", "show", "--port", "vm2").stdout
    assert "02:00:00:00:00:03" in human and "02:00:00:00:00:01" not in human


def test_show_reports_type_mode_link_queues_and_counters(three):
    d, _ = three
    p = d.port("vm1")
    assert (p["type"], p["mode"], p["link"], p["queues"]) == ("vhost-user", "server", "up", 1)
    assert set(p["stats"]) >= {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped",
                               "rx_errors", "tx_errors"}
    human = d.ctl_raw("show").stdout.splitlines()
    assert human[0].split()[:5] == ["PORT", "TYPE", "MODE", "LINK", "QUEUES"]
    assert human[2].split()[:5] == ["vm1", "vhost-user", "server", "up", "1"]


def test_fdb_flush(three):
    d, (g0, g1, g2) = three
    g0.send_frame(0, frame(BROADCAST, mac(1)))
    wait_for(lambda: d.ctl("fdb", "show")["entries"], what="a learned entry")
    assert d.ctl("fdb", "flush")["flushed"] == 1
    assert d.ctl("fdb", "show")["entries"] == []
    stats = d.ctl("fdb", "stats")
    assert stats["learned"] == 1 and stats["entries"] == 0


def test_guest_disconnect_and_reconnect_in_server_mode(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2)) as d:
        g1 = VhostUserFrontend(tmp_path / "vm1.sock").connect()
        g1.handshake()
        g1.post_rx(0, 32)
        for attempt in range(3):
            g0 = VhostUserFrontend(tmp_path / "vm0.sock").connect()
            g0.handshake()
            wait_for(lambda: link(d, "vm0") == "up", what="vm0 up")
            g0.send_frame(0, frame(BROADCAST, mac(1), bytes([attempt]) * 40))
            [got] = g1.receive(0, 1, timeout=2)
            assert got.data[14] == attempt
            g0.close()
            wait_for(lambda: link(d, "vm0") == "down", what="vm0 down")
        assert os.path.exists(tmp_path / "vm0.sock")  # still listening
        g1.close()


def test_client_mode_connects_and_reconnects(tmp_path):
    sock0 = tmp_path / "vm0.sock"
    fe0 = VhostUserFrontend(sock0).listen()
    ports = vhost_ports(tmp_path, 2)
    ports[0]["mode"] = "client"
    with Vswitchd(tmp_path, ports=ports) as d:
        g1 = VhostUserFrontend(tmp_path / "vm1.sock").connect()
        g1.handshake()
        g1.post_rx(0, 32)
        fe0.accept()
        fe0.handshake()
        wait_for(lambda: link(d, "vm0") == "up", what="vm0 up")
        assert d.port("vm0")["mode"] == "client"
        fe0.send_frame(0, frame(BROADCAST, mac(1)))
        assert len(g1.receive(0, 1, timeout=2)) == 1
        # The front-end restarts: the switch connects again by itself.
        fe0.close()
        wait_for(lambda: link(d, "vm0") == "down", what="vm0 down")
        fe0 = VhostUserFrontend(sock0).listen()
        fe0.accept()
        fe0.handshake()
        wait_for(lambda: link(d, "vm0") == "up", what="vm0 up again")
        fe0.send_frame(0, frame(BROADCAST, mac(1)))
        assert len(g1.receive(0, 1, timeout=2)) == 1
        g1.close()
    fe0.close()


def test_multiqueue_port(tmp_path):
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2, queues=2)) as d:
        guests = []
        for i in range(2):
            fe = VhostUserFrontend(tmp_path / f"vm{i}.sock", queues=2).connect()
            fe.handshake()
            fe.post_rx(0, 16)
            fe.post_rx(1, 16)
            guests.append(fe)
        wait_for(lambda: link(d, "vm0") == "up" and link(d, "vm1") == "up", what="links up")
        guests[0].send_frame(1, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(1, 1, timeout=2)) == 1
        guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(0, 1, timeout=2)) == 1
        q = d.port("vm0")["queue_stats"]
        assert [x["packets"] for x in q] == [0, 1, 0, 1]
        for fe in guests:
            fe.close()


def test_hostile_guest_does_not_disturb_others(three):
    d, (g0, g1, g2) = three
    # g0 posts a chain pointing outside its memory, then an avail index jump.
    ring = g0.tx_ring(0)
    ring.write_desc(200, 0xdead00000000, 64, 0, 0)
    ring.publish_raw(200)
    g0.kick(ring.index)
    wait_for(lambda: d.port("vm0")["stats"]["rx_errors"] == 1, what="the error counted")
    g1.send_frame(0, frame(BROADCAST, mac(2)))
    assert len(g2.receive(0, 1, timeout=2)) == 1
    ring.set_avail_idx(ring.avail_idx + 1000)
    wait_for(lambda: d.port("vm0")["queue_stats"][1]["broken"], what="the ring stopped")
    g1.send_frame(0, frame(BROADCAST, mac(2)))
    assert len(g2.receive(0, 1, timeout=2)) == 1
    # One log line per ring per second at most, naming each reason.
    log = wait_for(lambda: "ring stopped" in d.log() and d.log(), what="the log lines")
    assert "port 'vm0' vring 1: dropped malformed descriptor chains: 1 x buffer outside guest memory" in log
    assert "1 x avail index jumped by more than the ring size" in log


def test_sigterm_closes_guest_connections_and_removes_sockets(tmp_path):
    d = Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2)).start()
    fe = VhostUserFrontend(tmp_path / "vm0.sock").connect()
    fe.handshake()
    assert d.stop() == 0
    assert fe.wait_closed(timeout=5)
    assert not os.path.exists(tmp_path / "vm0.sock") and not os.path.exists(tmp_path / "vm1.sock")
    fe.close()


@pytest.mark.parametrize("request_code, payload", [
    (0x7fff, b""),            # an unknown request without NEED_REPLY
    (2, b"\x00" * 3),         # SET_FEATURES with a 3-byte payload
])
def test_malformed_message_closes_only_that_connection(three, tmp_path, request_code, payload):
    d, (g0, g1, g2) = three
    g0.send_message(request_code, payload)
    assert g0.wait_closed(timeout=5)
    wait_for(lambda: link(d, "vm0") == "down", what="vm0 down")
    g1.send_frame(0, frame(BROADCAST, mac(2)))
    assert len(g2.receive(0, 1, timeout=2)) == 1
    again = VhostUserFrontend(tmp_path / "vm0.sock").connect()
    again.handshake()
    wait_for(lambda: link(d, "vm0") == "up", what="vm0 up again")
    again.close()


@pytest.mark.parametrize("disabled", ["none", "MRG_RXBUF", "INDIRECT_DESC", "EVENT_IDX", "VERSION_1"])
def test_features_turned_off_by_the_front_end(tmp_path, disabled):
    from vswitch.vhost import protocol
    bit = {"none": 0, "MRG_RXBUF": protocol.VIRTIO_NET_F_MRG_RXBUF,
           "INDIRECT_DESC": protocol.VIRTIO_RING_F_INDIRECT_DESC,
           "EVENT_IDX": protocol.VIRTIO_RING_F_EVENT_IDX, "VERSION_1": protocol.VIRTIO_F_VERSION_1}[disabled]
    mask = 0 if disabled == "none" else 1 << bit
    with Vswitchd(tmp_path, ports=vhost_ports(tmp_path, 2)) as d:
        guests = []
        for i in range(2):
            fe = VhostUserFrontend(tmp_path / f"vm{i}.sock", disable_features=mask).connect()
            fe.handshake()
            assert not fe.features & mask
            fe.post_rx(0, 32, size=1024)
            guests.append(fe)
        wait_for(lambda: link(d, "vm0") == "up" and link(d, "vm1") == "up", what="links up")
        big = frame(BROADCAST, mac(1), os.urandom(1400))  # needs 2 buffers with MRG_RXBUF
        guests[0].send_frame(0, big, indirect=disabled != "INDIRECT_DESC", segments=3)
        small = frame(BROADCAST, mac(1))
        for _ in range(40):
            guests[0].send_frame(0, small)
        got = guests[1].receive(0, 41, timeout=3)
        if mask & (1 << protocol.VIRTIO_NET_F_MRG_RXBUF):
            # Without mergeable buffers a 1 KiB buffer cannot hold the big frame: dropped and counted.
            assert [g.data for g in got] == [small] * 32
            assert d.port("vm1")["stats"]["tx_dropped"] >= 1
        else:
            assert [g.data for g in got] == [big] + [small] * 30
        for fe in guests:
            fe.close()


def test_send_rarp_moves_the_mac_to_the_announcing_port(three):
    """After a live migration QEMU sends SEND_RARP: the guest's MAC now lives behind this port."""
    from vswitch.vhost.protocol import Request
    d, (g0, g1, g2) = three
    g0.send_frame(0, frame(BROADCAST, mac(7)))
    wait_for(lambda: {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}.get("02:00:00:00:00:07") == "vm0",
             what="mac learned on vm0")
    g2.request(Request.SEND_RARP, mac(7) + b"\0\0")
    g2.sync()
    wait_for(lambda: {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}.get("02:00:00:00:00:07") == "vm2",
             what="mac moved to vm2")
