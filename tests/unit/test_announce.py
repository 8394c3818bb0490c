"""A migrated guest's announcement (README "Live migration", "The MAC moves").

Two ways, as QEMU decides by what the guest negotiated:

* GUEST_ANNOUNCE: the switch offers it (and the `features:` key turns it
  off, alone or with `ctrl_vq`); QEMU then asks the guest to send its own
  gratuitous ARPs, which the switch switches like any frame.
* SEND_RARP (a guest without it): the switch sends a RARP frame from the
  guest's MAC as if the guest had sent it on its port (pmd.h
  vs_port_announce), learned there and flooded to every other port of the
  port's VLAN, and counts it (rarp_sent).

The PMD-level tests drive vs_pmd_poll_once in the test's thread with the C
sides of guests (tests/unit/test_ring_engine.py's Guest, read back byte for
byte) and null ports (tests/unit/test_vlan.py's Switch); the daemon tests
drive a vswitchd with the Python vhost-user front-end.
"""

from __future__ import annotations

import struct

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for
from tests.support.frontend import DRIVER_FEATURES, VhostUserFrontend
from tests.support.null_pmd import null_stats
from tests.unit.test_vlan import ACCESS10, ACCESS20, Switch
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.protocol import Request

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_MAC_TEXT = "52:54:00:12:34:56"
GUEST_ANNOUNCE = 1 << 21         # VIRTIO_NET_F_GUEST_ANNOUNCE, virtio 1.2 5.1.3


def rarp(src: bytes) -> bytes:
    """The RARP frame QEMU's announce_self_create() builds (net/announce.c), written out field by field."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, src, b"\0" * 4, src, b"\0" * 4)
    return (b"\xff" * 6 + src + b"\x80\x35" + arp).ljust(60, b"\0")


def rarp_tagged(src: bytes, vid: int) -> bytes:
    r = rarp(src)
    return r[:12] + struct.pack("!HH", 0x8100, vid) + r[12:]


def announce(port, src: bytes = GUEST_MAC) -> int:
    return lib.vs_port_announce(port.port, ffi.from_buffer("uint8_t[]", src))


# --- the PMD ---------------------------------------------------------------------------


def test_announcement_is_flooded_in_the_ports_vlan_only_and_learned_there(closing):
    sw = Switch(closing, {"a10": ("guest", ACCESS10), "b10": ("guest", ACCESS10), "c20": ("guest", ACCESS20),
                          "trunk": ("guest", {"mode": "trunk", "trunks": [10, 20]}), "plain": ("guest", None),
                          "n10": ("null", ACCESS10), "n20": ("null", ACCESS20)})
    a10 = sw.ports["a10"]
    assert announce(a10) == 1
    sw.pmd.poll()
    assert sw.received("b10") == [rarp(GUEST_MAC)]
    assert sw.received("trunk") == [rarp_tagged(GUEST_MAC, 10)]
    assert null_stats(sw.ports["n10"])["tx_packets"] == 1
    assert sw.received("c20") == [] and sw.received("plain") == [] and sw.received("a10") == []
    assert null_stats(sw.ports["n20"])["tx_packets"] == 0
    assert a10.port.stats.rarp_sent == 1
    assert sw.pmd.fib.lookup(GUEST_MAC_TEXT, vlan=10) == a10.port.port_no
    assert sw.pmd.fib.lookup(GUEST_MAC_TEXT, vlan=0) is None
    # Sent once: the next passes find nothing pending.
    sw.pmd.poll(3)
    assert sw.received("b10") == [] and a10.port.stats.rarp_sent == 1 and a10.port.announce == 0


def test_announcement_without_vlans_reaches_every_other_port_and_moves_the_mac(closing):
    sw = Switch(closing, {"old": ("guest", None), "new": ("guest", None), "other": ("guest", None),
                          "n": ("null", None)})
    sw.send("old", frame(BROADCAST, GUEST_MAC))
    sw.received("new"), sw.received("other")
    assert sw.pmd.fib.lookup(GUEST_MAC_TEXT) == sw.ports["old"].port.port_no
    assert announce(sw.ports["new"]) == 1
    sw.pmd.poll()
    # The old port gets it too: whatever lies behind it learns the move as well.
    assert sw.received("old") == [rarp(GUEST_MAC)] and sw.received("other") == [rarp(GUEST_MAC)]
    assert sw.received("new") == []
    assert null_stats(sw.ports["n"])["tx_packets"] == 2
    assert sw.pmd.fib.lookup(GUEST_MAC_TEXT) == sw.ports["new"].port.port_no
    assert sw.ports["new"].port.stats.rarp_sent == 1 and sw.ports["old"].port.stats.rarp_sent == 0


def test_repeated_announcements_of_one_mac_each_send_a_frame_and_another_mac_replaces_them(closing):
    sw = Switch(closing, {"a": ("guest", None), "b": ("guest", None)})
    a = sw.ports["a"]
    assert [announce(a) for _ in range(3)] == [1, 2, 3]
    sw.pmd.poll()                # one frame per poll of the port's queue
    assert sw.received("b") == [rarp(GUEST_MAC)]
    sw.pmd.poll(4)
    assert sw.received("b") == [rarp(GUEST_MAC)] * 2 and a.port.stats.rarp_sent == 3
    assert announce(a) == 1 and announce(a, mac(7)) == 1
    sw.pmd.poll(3)
    assert sw.received("b") == [rarp(mac(7))] and a.port.stats.rarp_sent == 4


@pytest.mark.parametrize("bad", [BROADCAST, bytes.fromhex("01005e000001"), bytes(6)],
                         ids=["broadcast", "multicast", "zero"])
def test_announcement_of_a_mac_no_guest_can_have_is_refused(closing, bad):
    sw = Switch(closing, {"a": ("guest", None), "b": ("guest", None)})
    assert announce(sw.ports["a"], bad) == -22      # -EINVAL
    sw.pmd.poll(2)
    assert sw.received("b") == [] and sw.ports["a"].port.stats.rarp_sent == 0


def test_announcement_is_captured_as_received_and_not_sent_from_a_mirror_output(closing):
    from tests.unit.test_capture import frames_of, monitor
    from vswitch.capture import Capture

    sw = Switch(closing, {"a": ("guest", None), "b": ("guest", None), "out": ("guest", None)})
    a, out = sw.ports["a"], sw.ports["out"]
    rx_a = Capture("a", "rx")
    a.port.monitor = ta = monitor(rx=[rx_a])
    announce(a)
    sw.pmd.poll()
    assert frames_of(rx_a) == [rarp(GUEST_MAC)] and sw.received("b") == [rarp(GUEST_MAC)]
    # A mirror's output port takes nothing in: not even the switch's frame for it.
    out.port.monitor = to = monitor(mirror_output=True)
    announce(out)
    sw.pmd.poll()
    assert sw.received("b") == [] and out.port.stats.rarp_sent == 0 and out.port.stats.mirror_output_dropped == 1
    del ta, to


# --- the daemon: SEND_RARP and the feature bit -------------------------------------------


def vhost(tmp_path, name: str, **extra) -> dict:
    return {"name": name, "type": "vhost-user", "path": str(tmp_path / f"{name}.sock"), **extra}


def fdb(d: Vswitchd) -> dict:
    return {(e["mac"], e["vlan"]): e["port"] for e in d.ctl("fdb", "show")["entries"]}


def test_send_rarp_floods_a_rarp_in_the_ports_vlan_learns_it_and_counts_it(tmp_path):
    ports = [vhost(tmp_path, "new", vlan=ACCESS10), vhost(tmp_path, "peer", vlan=ACCESS10),
             vhost(tmp_path, "other", vlan=ACCESS20), {"name": "n10", "type": "null", "vlan": ACCESS10},
             {"name": "n20", "type": "null", "vlan": ACCESS20}]
    with Vswitchd(tmp_path, ports=ports) as d:
        new, peer, other = d.connect_guests(["new", "peer", "other"])
        new.request(Request.SEND_RARP, GUEST_MAC + b"\0\0")
        new.sync()
        [got] = peer.receive(0, 1, timeout=5)
        assert got.data == rarp(GUEST_MAC)
        wait_for(lambda: fdb(d).get((GUEST_MAC_TEXT, 10)) == "new", what="the MAC learned on 'new' in VLAN 10")
        # The PMD counts after the frame went out: the counters may lag the frame by a moment.
        wait_for(lambda: d.port("new")["stats"]["rarp_sent"] == 1, what="rarp_sent 1")
        wait_for(lambda: d.port("n10")["stats"]["tx_packets"] == 1, what="the null port in VLAN 10 sent it")
        assert d.port("n20")["stats"]["tx_packets"] == 0 and d.port("new")["stats"]["rarp_sent"] == 1
        assert other.receive(0, 1, timeout=0.3) == [] and new.receive(0, 1, timeout=0.1) == []
        assert (GUEST_MAC_TEXT, 0) not in fdb(d)
        assert "rarp_sent 1 (RARP frames sent for the guest on SEND_RARP)" in d.ctl_raw("show").stdout
        for fe in (new, peer, other):
            fe.close()


def test_send_rarp_with_a_multicast_mac_is_refused_and_counted(tmp_path):
    with Vswitchd(tmp_path, ports=[vhost(tmp_path, "a"), vhost(tmp_path, "b")]) as d:
        a, b = d.connect_guests(["a", "b"])
        a.send_message(Request.SEND_RARP, bytes.fromhex("01005e000001") + b"\0\0")
        assert a.wait_closed(timeout=5)      # refused without NEED_REPLY: the connection closes, as DPDK's
        wait_for(lambda: d.port("a")["stats"]["protocol_errors"] == 1, what="the refusal counted")
        assert "SEND_RARP: 01:00:5e:00:00:01 is not a unicast MAC address" in d.log()
        assert d.port("a")["stats"]["rarp_sent"] == 0 and b.receive(0, 1, timeout=0.3) == []
        for fe in (a, b):
            fe.close()


def offered(d: Vswitchd, name: str) -> list[str]:
    return d.port(name)["vhost"]["offered_feature_names"]


def test_guest_announce_is_offered_negotiated_and_turned_off_by_the_features_key(tmp_path):
    ports = [vhost(tmp_path, "on"), vhost(tmp_path, "off", features={"guest_announce": False}),
             vhost(tmp_path, "noctrl", features={"ctrl_vq": False})]
    with Vswitchd(tmp_path, ports=ports) as d:
        assert "guest_announce" in offered(d, "on")
        # GUEST_ANNOUNCE needs the control queue (virtio 5.1.3.1): it goes with ctrl_vq.
        assert "guest_announce" not in offered(d, "off") and "ctrl_vq" in offered(d, "off")
        assert "guest_announce" not in offered(d, "noctrl")
        fe = VhostUserFrontend(tmp_path / "on.sock", features=DRIVER_FEATURES | GUEST_ANNOUNCE).connect()
        fe.handshake()
        assert fe.features & GUEST_ANNOUNCE
        wait_for(lambda: "guest_announce" in d.port("on")["vhost"]["negotiated_feature_names"],
                 what="GUEST_ANNOUNCE negotiated")
        off = VhostUserFrontend(tmp_path / "off.sock", features=DRIVER_FEATURES | GUEST_ANNOUNCE).connect()
        off.handshake()
        assert not off.features & GUEST_ANNOUNCE
        assert "turned off: guest_announce" in d.ctl_raw("show").stdout
        for x in (fe, off):
            x.close()


def test_guest_announce_group_covers_exactly_its_bit_and_ctrl_vq_takes_it_along():
    assert protocol.OFFERED_FEATURES & GUEST_ANNOUNCE
    assert protocol.FEATURE_GROUPS["guest_announce"] == GUEST_ANNOUNCE
    assert protocol.FEATURE_GROUPS["ctrl_vq"] & GUEST_ANNOUNCE
    assert protocol.disabled_features({"guest_announce": False}) == GUEST_ANNOUNCE
    assert protocol.feature_names(GUEST_ANNOUNCE) == ["guest_announce"]


def test_rarp_sent_is_a_prometheus_counter(tmp_path):
    from tests.unit.test_metrics import free_port, samples, scrape

    port = free_port()
    with Vswitchd(tmp_path, ports=[vhost(tmp_path, "a"), vhost(tmp_path, "b")],
                  extra={"metrics": {"listen": f"127.0.0.1:{port}"}}) as d:
        a, b = d.connect_guests(["a", "b"])
        for _ in range(2):
            a.request(Request.SEND_RARP, GUEST_MAC + b"\0\0")
            a.sync()
            assert [f.data for f in b.receive(0, 1, timeout=5)] == [rarp(GUEST_MAC)]
        wait_for(lambda: d.port("a")["stats"]["rarp_sent"] == 2, what="rarp_sent 2")
        got = samples(scrape(f"http://127.0.0.1:{port}/metrics")[1])
        assert got[("vswitch_port_rarp_sent_total", (("port", "a"), ("type", "vhost-user")))] == 2
        assert got[("vswitch_port_rarp_sent_total", (("port", "b"), ("type", "vhost-user")))] == 0
        for fe in (a, b):
            fe.close()
