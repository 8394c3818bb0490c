"""VLANs in the packet loop: classification at ingress, learning per (MAC, VLAN),
flooding inside the VLAN, tags pushed and popped on the way out (pmd.c).

Ports are the C sides of vhost-user guests (tests/unit/test_ring_engine.py's
Guest: what they receive can be read back byte for byte) and null ports
(which count what they are sent), driven by vs_pmd_poll_once in the test's
thread, as in test_port_ops.py.
"""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Dot1Q, Ether

from tests.support.frames import BROADCAST, frame, mac
from tests.support.null_pmd import NullPort, Pmd, null_stats
from tests.unit.test_ring_engine import Guest
from vswitch.native import ffi, lib
from vswitch.ports import vlan as vlan_settings

F_V1 = 1 << 32


def tagged(dst: bytes, src: bytes, vid: int, pcp: int = 0, payload: bytes = b"y" * 50) -> bytes:
    return dst + src + struct.pack("!HH", 0x8100, (pcp << 13) | vid) + b"\x08\x00" + payload


def untag(data: bytes) -> bytes:
    return data[:12] + data[16:]


class Switch:
    """Ports with VLAN settings under one PMD; every port's queue 0 is polled."""

    def __init__(self, closing, ports: dict):
        self.ports = {}
        self.keep = []
        for port_no, (name, (kind, settings)) in enumerate(ports.items()):
            port = Guest(port_no) if kind == "guest" else NullPort(port_no)
            closing(port)
            if kind == "guest":
                port.rx[0].post_rx(64)
            self.set_vlan(port, settings)
            self.ports[name] = port
        self.pmd = Pmd([p.port for p in self.ports.values()], [(p.port, 0) for p in self.ports.values()])
        closing(self.pmd)
        self.pmd.table.n_vlan = sum(1 for p in self.ports.values() if p.port.vlan != ffi.NULL)

    def set_vlan(self, port, settings) -> None:
        c = vlan_settings.to_c(None if settings is None else vlan_settings.check(settings))
        self.keep.append(c)
        port.port.vlan = c

    def send(self, name: str, data: bytes, **kw) -> None:
        port = self.ports[name]
        if isinstance(port, NullPort):
            assert port.inject(data) == 0
        else:
            port.tx[0].post_tx(data, **kw)
        self.pmd.poll()

    def received(self, name: str) -> list[bytes]:
        return [f.data for f in self.ports[name].rx[0].read_rx_frames()]

    def dropped(self, name: str) -> int:
        return self.ports[name].port.stats.vlan_dropped


ACCESS10 = {"mode": "access", "tag": 10}
ACCESS20 = {"mode": "access", "tag": 20}


def test_access_port_frames_leave_trunks_tagged_and_access_ports_untagged(closing):
    sw = Switch(closing, {"a10": ("guest", ACCESS10), "b10": ("guest", ACCESS10), "c20": ("guest", ACCESS20),
                          "trunk": ("guest", {"mode": "trunk", "trunks": [10, 20]}), "plain": ("guest", None)})
    hello = frame(BROADCAST, mac(1))
    sw.send("a10", hello)
    assert sw.received("b10") == [hello]
    assert sw.received("trunk") == [tagged(BROADCAST, mac(1), 10, payload=b"x" * 50)]
    assert sw.received("c20") == [] and sw.received("plain") == []
    assert sw.dropped("a10") == 0


def test_trunk_frames_are_untagged_for_access_ports_and_keep_their_priority_on_trunks(closing):
    sw = Switch(closing, {"trunk": ("guest", {"mode": "trunk"}), "a10": ("guest", ACCESS10),
                          "c20": ("guest", ACCESS20), "t2": ("guest", {"mode": "trunk", "trunks": [10]}),
                          "plain": ("guest", None)})
    data = tagged(BROADCAST, mac(1), 10, pcp=5)
    sw.send("trunk", data)
    assert sw.received("a10") == [untag(data)]
    assert sw.received("t2") == [data]
    assert sw.received("c20") == [] and sw.received("plain") == []


def test_trunk_drops_and_counts_vlans_it_does_not_carry(closing):
    sw = Switch(closing, {"trunk": ("guest", {"mode": "trunk", "trunks": [10, 20]}), "a10": ("guest", ACCESS10),
                          "all": ("guest", {"mode": "trunk"})})
    sw.send("trunk", tagged(BROADCAST, mac(1), 30))
    sw.send("trunk", frame(BROADCAST, mac(1)))        # untagged: VLAN 0, not in its trunks
    assert sw.dropped("trunk") == 2
    assert sw.received("a10") == [] and sw.received("all") == []
    assert sw.pmd.fib.entries() == []


def test_trunk_without_a_list_carries_every_vlan_and_untagged_frames_as_vlan_0(closing):
    sw = Switch(closing, {"all": ("guest", {"mode": "trunk"}), "plain": ("guest", None),
                          "t30": ("guest", {"mode": "trunk", "trunks": [30]}), "a10": ("guest", ACCESS10)})
    data = tagged(BROADCAST, mac(1), 30)
    sw.send("all", data)
    assert sw.received("t30") == [data] and sw.received("plain") == [] and sw.received("a10") == []
    plain = frame(BROADCAST, mac(1))
    sw.send("all", plain)
    assert sw.received("plain") == [plain] and sw.received("t30") == []
    # VLAN 0 from a port without settings reaches the all-VLAN trunk as it is, tags included.
    sw.send("plain", tagged(BROADCAST, mac(2), 99))
    assert sw.received("all") == [tagged(BROADCAST, mac(2), 99)]
    assert sw.dropped("all") == 0


def test_access_port_drops_tagged_frames_but_takes_priority_tags(closing):
    sw = Switch(closing, {"a10": ("guest", ACCESS10), "b10": ("guest", ACCESS10),
                          "trunk": ("guest", {"mode": "trunk"})})
    sw.send("a10", tagged(BROADCAST, mac(1), 10))
    sw.send("a10", tagged(BROADCAST, mac(1), 20))
    assert sw.dropped("a10") == 2
    assert sw.received("b10") == [] and sw.received("trunk") == []
    # VID 0 (priority only): the frame is in VLAN 10; a trunk gets it retagged with its priority kept.
    prio = tagged(BROADCAST, mac(1), 0, pcp=3)
    sw.send("a10", prio)
    assert sw.received("b10") == [untag(prio)]
    assert sw.received("trunk") == [tagged(BROADCAST, mac(1), 10, pcp=3)]
    assert sw.dropped("a10") == 2


@pytest.mark.parametrize("mode", ["native-untagged", "native-tagged"])
def test_native_vlan_modes(closing, mode):
    sw = Switch(closing, {"native": ("guest", {"mode": mode, "tag": 10, "trunks": [20]}),
                          "a10": ("guest", ACCESS10), "a20": ("guest", ACCESS20),
                          "a30": ("guest", {"mode": "access", "tag": 30})})
    sw.send("native", frame(BROADCAST, mac(1)))           # untagged: the native VLAN
    assert sw.received("a10") == [frame(BROADCAST, mac(1))] and sw.received("a20") == []
    sw.send("native", tagged(BROADCAST, mac(1), 20))
    assert sw.received("a20") == [frame(BROADCAST, mac(1), b"y" * 50)] and sw.received("a10") == []
    sw.send("native", tagged(BROADCAST, mac(1), 30))
    assert sw.dropped("native") == 1 and sw.received("a30") == []
    sw.send("a10", frame(BROADCAST, mac(2)))
    sw.send("a20", frame(BROADCAST, mac(3)))
    native = frame(BROADCAST, mac(2)) if mode == "native-untagged" else tagged(BROADCAST, mac(2), 10, payload=b"x" * 50)
    assert sw.received("native") == [native, tagged(BROADCAST, mac(3), 20, payload=b"x" * 50)]


def test_the_same_mac_is_learned_per_vlan_and_unicast_stays_in_its_vlan(closing):
    sw = Switch(closing, {"a10": ("guest", ACCESS10), "a20": ("guest", ACCESS20),
                          "trunk": ("guest", {"mode": "trunk"}), "n10": ("null", ACCESS10), "n20": ("null", ACCESS20)})
    same = mac(7)
    sw.send("a10", frame(BROADCAST, same))
    sw.send("a20", frame(BROADCAST, same))
    entries = {(e.mac, e.vlan): e.port_no for e in sw.pmd.fib.entries()}
    assert entries == {("02:00:00:00:00:07", 10): 0, ("02:00:00:00:00:07", 20): 1}
    sw.received("trunk")
    before = (null_stats(sw.ports["n10"])["tx_packets"], null_stats(sw.ports["n20"])["tx_packets"])
    sw.send("trunk", tagged(same, mac(9), 10))
    sw.send("trunk", tagged(same, mac(9), 20))
    assert sw.received("a10") == [frame(same, mac(9), b"y" * 50)]
    assert sw.received("a20") == [frame(same, mac(9), b"y" * 50)]
    after = (null_stats(sw.ports["n10"])["tx_packets"], null_stats(sw.ports["n20"])["tx_packets"])
    assert after == before, "unicast was flooded"
    assert sw.pmd.pmd.stats.unicast == 2


def test_flooding_stays_inside_the_vlan(closing):
    sw = Switch(closing, {"src": ("null", ACCESS10), "n10": ("null", ACCESS10), "n20": ("null", ACCESS20),
                          "t20": ("null", {"mode": "trunk", "trunks": [20]}),
                          "t10": ("null", {"mode": "trunk", "trunks": [10]}),
                          "plain": ("null", None)})
    for i in range(5):
        sw.send("src", frame(BROADCAST, mac(1), b"z" * (60 + i)))
    sent = {name: null_stats(p)["tx_packets"] for name, p in sw.ports.items()}
    assert sent == {"src": 0, "n10": 5, "n20": 0, "t20": 0, "t10": 5, "plain": 0}
    # Four bytes more on the trunk, per frame: the pushed tag.
    assert null_stats(sw.ports["t10"])["tx_bytes"] == null_stats(sw.ports["n10"])["tx_bytes"] + 5 * 4


def test_ports_without_vlan_settings_carry_tags_untouched(closing):
    sw = Switch(closing, {"a": ("guest", None), "b": ("guest", None)})
    assert sw.pmd.table.n_vlan == 0
    data = tagged(BROADCAST, mac(1), 10)
    sw.send("a", data)
    assert sw.received("b") == [data]
    assert [e.vlan for e in sw.pmd.fib.entries()] == [0]


@pytest.mark.parametrize("segments", [1, 2, 5, 9])
def test_tags_are_pushed_and_popped_on_segmented_frames(closing, segments):
    sw = Switch(closing, {"a10": ("guest", ACCESS10), "trunk": ("guest", {"mode": "trunk"})})
    plain = frame(BROADCAST, mac(1), bytes(range(40)))
    sw.send("a10", plain, segments=segments)
    assert sw.received("trunk") == [plain[:12] + b"\x81\x00\x00\x0a" + plain[12:]]
    data = tagged(BROADCAST, mac(2), 10, pcp=1)
    sw.send("trunk", data, segments=segments)
    assert sw.received("a10") == [untag(data)]


def test_a_frame_with_no_room_for_a_tag_is_dropped_and_counted(closing):
    sw = Switch(closing, {"a10": ("guest", ACCESS10), "trunk": ("guest", {"mode": "trunk"})})
    hdr_len = sw.ports["a10"].tx[0].hdr_len

    def in_segments(n: int) -> bytes:
        """A frame that post_tx cuts into n descriptors of 16 bytes, virtio-net header included."""
        return frame(BROADCAST, mac(1), bytes(16 * n - hdr_len - 14))

    sw.send("a10", in_segments(lib.VS_PKT_MAX_SEGS - 1), segments=lib.VS_PKT_MAX_SEGS - 1)
    assert sw.received("trunk") == [] and sw.dropped("a10") == 1
    data = in_segments(lib.VS_PKT_MAX_SEGS - 2)
    sw.send("a10", data, segments=lib.VS_PKT_MAX_SEGS - 2)
    assert sw.received("trunk") == [data[:12] + b"\x81\x00\x00\x0a" + data[12:]]
    assert sw.dropped("a10") == 1


def test_a_vlan_change_takes_effect_on_the_next_burst(closing):
    sw = Switch(closing, {"a": ("guest", ACCESS10), "b": ("guest", ACCESS20)})
    sw.send("a", frame(BROADCAST, mac(1)))
    assert sw.received("b") == []
    sw.set_vlan(sw.ports["b"], ACCESS10)
    sw.send("a", frame(BROADCAST, mac(1)))
    assert sw.received("b") == [frame(BROADCAST, mac(1))]


# --- Offloads across a tag --------------------------------------------------------

OFFLOADS = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 11)   # CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4


def tso_frame(payload_len: int = 3000) -> bytes:
    return bytes(Ether(dst=mac(2), src=mac(1)) / IP(src="10.0.0.1", dst="10.0.0.2") /
                 TCP(sport=1000, dport=2000, seq=1, flags="PA") / (b"t" * payload_len))


def partial_tcp_csum(data: bytes, l3: int) -> bytes:
    """The frame as Linux leaves it with checksum offload: the TCP checksum holds the pseudo-header sum."""
    ip_hlen = (data[l3] & 0xF) * 4
    tcp_len = len(data) - l3 - ip_hlen
    pseudo = data[l3 + 12:l3 + 20] + b"\x00\x06" + tcp_len.to_bytes(2, "big")
    s = sum(int.from_bytes(pseudo[i:i + 2], "big") for i in range(0, len(pseudo), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    off = l3 + ip_hlen + 16
    return data[:off] + s.to_bytes(2, "big") + data[off + 2:]


@pytest.mark.parametrize("dest_takes_tso", [False, True])
@pytest.mark.parametrize("direction", ["access-to-trunk", "trunk-to-access"])
def test_a_guests_tso_frame_crosses_a_tag_correct(closing, direction, dest_takes_tso):
    """A guest's TSO frame with a partial checksum gets a tag pushed (access to trunk) or popped (trunk
    to access): the header's offsets move with it, and software segmentation, for a destination
    without TSO, finds the IP header past the tag."""
    src = Guest(0, features=F_V1 | OFFLOADS)
    dst = Guest(1, features=F_V1 | (OFFLOADS if dest_takes_tso else 0))
    for g in (src, dst):
        closing(g)
    dst.rx[0].post_rx(64, size=8192)
    access, trunk = vlan_settings.to_c(vlan_settings.check(ACCESS10)), vlan_settings.to_c({"mode": "trunk"})
    src.port.vlan, dst.port.vlan = (access, trunk) if direction == "access-to-trunk" else (trunk, access)
    pmd = Pmd([src.port, dst.port], [(src.port, 0), (dst.port, 0)])
    closing(pmd)
    pmd.table.n_vlan = 2
    untagged = partial_tcp_csum(tso_frame(), 14)
    with_tag = untagged[:12] + b"\x81\x00\x00\x0a" + untagged[12:]
    sent, expected, shift = (untagged, with_tag, 0) if direction == "access-to-trunk" else (with_tag, untagged, 4)
    q = src.tx[0]
    header = struct.pack("<BBHHHH", lib.VS_NET_HDR_F_NEEDS_CSUM, lib.VS_NET_HDR_GSO_TCPV4, 54 + shift, 1000,
                         34 + shift, 16)
    q.post_tx(sent, header=header + bytes(q.hdr_len - len(header)))
    pmd.poll()
    frames = dst.rx[0].read_rx_frames()
    out_shift = 4 - shift
    if dest_takes_tso:
        [got] = frames
        _, gso, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", got.header[:10])
        assert (gso, hdr_len, gso_size, csum_start, csum_offset) == \
            (lib.VS_NET_HDR_GSO_TCPV4, 54 + out_shift, 1000, 34 + out_shift, 16)
        assert got.data == expected
        return
    assert len(frames) == 3
    payload = b""
    for f in frames:
        pkt = Ether(f.data)
        assert (Dot1Q in pkt) == (direction == "access-to-trunk")
        if Dot1Q in pkt:
            assert pkt[Dot1Q].vlan == 10
        ip, tcp = pkt[IP], pkt[TCP]
        assert len(f.data) == 14 + out_shift + ip.len
        # scapy recomputes checksums that are deleted: compare with what the switch wrote.
        want = Ether(bytes(pkt))
        del want[IP].chksum, want[TCP].chksum
        want = Ether(bytes(want))
        assert (ip.chksum, tcp.chksum) == (want[IP].chksum, want[TCP].chksum)
        payload += bytes(tcp.payload)
    assert payload == b"t" * 3000
