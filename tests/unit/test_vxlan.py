"""VXLAN tunnel ports (vswitch/ports/vxlan.[ch]): the C encapsulation and
decapsulation, the config keys and their refusals, and a vswitchd whose
tunnel's remote endpoints are UDP sockets of this test on loopback addresses
(127.0.0.2 and 127.0.0.3; the switch is 127.0.0.1)."""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for
from vswitch.config import ConfigError, parse
from vswitch.native import ffi, lib
from vswitch.ports.vxlan import _addr

VNI = 5001


def vxlan_port(remotes=("10.0.0.2", "10.0.0.3"), vni=VNI, vni_map=None):
    vp = ffi.new("struct vs_vxlan_port *")
    vp.local_addr = _addr("10.0.0.1")
    vp.dst_port = 4789
    vp.vni = vni
    vp.n_remotes = len(remotes)
    for i, r in enumerate(remotes):
        vp.remotes[i].addr = _addr(r)
    for i, (vlan, v) in enumerate((vni_map or {}).items()):
        vp.map_vlan[i] = vlan
        vp.map_vni[i] = v
    vp.n_map = len(vni_map or {})
    return vp


def vxlan_header(vni: int, flags: int = 0x08) -> bytes:
    return struct.pack("!B3xI", flags, vni << 8)


def decap(vp, source: str, datagram: bytes):
    buf = ffi.new("uint8_t[]", datagram)
    sub = ffi.new("uint16_t *")
    off = lib.vs_vxlan_decap(vp, _addr(source), buf, len(datagram), sub)
    if off < 0:
        return off, None, None
    return off, sub[0], bytes(ffi.buffer(buf, len(datagram)))[off:]


def test_decap_checks_source_flags_and_vni():
    vp = vxlan_port()
    inner = frame(BROADCAST, mac(1))
    assert decap(vp, "10.0.0.2", vxlan_header(VNI) + inner) == (8, 1, inner)
    assert decap(vp, "10.0.0.3", vxlan_header(VNI) + inner) == (8, 2, inner)
    # Reserved bits are ignored on receipt (RFC 7348 5).
    assert decap(vp, "10.0.0.3", struct.pack("!BBBBI", 0xff, 1, 2, 3, VNI << 8 | 0x7f) + inner)[1] == 2
    assert decap(vp, "10.0.0.9", vxlan_header(VNI) + inner)[0] == lib.VS_VXLAN_UNKNOWN_REMOTE
    assert decap(vp, "10.0.0.2", vxlan_header(VNI + 1) + inner)[0] == lib.VS_VXLAN_WRONG_VNI
    assert decap(vp, "10.0.0.2", vxlan_header(VNI, flags=0) + inner)[0] == lib.VS_VXLAN_MALFORMED
    assert decap(vp, "10.0.0.2", vxlan_header(VNI) + inner[:13])[0] == lib.VS_VXLAN_MALFORMED
    assert decap(vp, "10.0.0.2", b"\x08\x00\x00")[0] == lib.VS_VXLAN_MALFORMED


def test_decap_of_a_mapped_vni_pushes_the_vlan_tag():
    vp = vxlan_port(vni_map={10: 1010, 20: 1020})
    inner = frame(BROADCAST, mac(1))
    off, sub, out = decap(vp, "10.0.0.2", vxlan_header(1020) + inner)
    assert (off, sub) == (4, 1)
    assert out == inner[:12] + struct.pack("!HH", 0x8100, 20) + inner[12:]
    assert decap(vp, "10.0.0.2", vxlan_header(VNI) + inner) == (8, 1, inner)


class Pkt:
    """A struct vs_pkt over bytes, cut into segments of the given sizes."""

    def __init__(self, data: bytes, cuts=()):
        self.buf = ffi.new("uint8_t[]", data)
        self.pkt = ffi.new("struct vs_pkt *")
        self.pkt.len = len(data)
        edges = [0, *cuts, len(data)]
        for i, (a, b) in enumerate(zip(edges, edges[1:])):
            self.pkt.segs[i].addr = self.buf + a
            self.pkt.segs[i].len = b - a
        self.pkt.nsegs = len(edges) - 1


def encap(vp, data: bytes, cuts=()):
    out = ffi.new("uint8_t[16]")
    strip = ffi.new("int *")
    frame_pkt = Pkt(data, cuts)        # kept: its buffer must outlive the call
    lib.vs_vxlan_encap_header(vp, frame_pkt.pkt, out, strip)
    return bytes(out), strip[0]


def tcp_frame(sport: int, dport: int = 80, src_ip: bytes = b"\x0a\x01\x00\x01") -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, src_ip, b"\x0a\x01\x00\x02")
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x02, 1000, 0, 0)
    return mac(2) + mac(1) + b"\x08\x00" + ip + tcp


def test_encap_header_udp_and_vxlan_fields():
    vp = vxlan_port()
    data = tcp_frame(1234)
    hdr, strip = encap(vp, data)
    sport, dport, length, csum, flags, vni = struct.unpack("!HHHHB3xI", hdr)
    assert (dport, length, csum, flags, vni >> 8, vni & 0xff, strip) == (4789, 16 + len(data), 0, 0x08, VNI, 0, 0)
    assert 49152 <= sport <= 65535
    # The same flow keeps its port however the frame is cut; other flows spread.
    assert encap(vp, data, cuts=(5, 20, 37))[0] == hdr
    ports = {encap(vp, tcp_frame(p))[0][:2] for p in range(1000, 1064)}
    assert len(ports) > 48


def test_encap_of_a_mapped_vlan_strips_the_tag_and_takes_its_vni():
    vp = vxlan_port(vni_map={10: 1010})
    plain = frame(BROADCAST, mac(1))
    tagged = plain[:12] + struct.pack("!HH", 0x8100, 10) + plain[12:]
    hdr, strip = encap(vp, tagged)
    assert strip == 1 and struct.unpack("!I", hdr[12:16])[0] >> 8 == 1010
    assert struct.unpack("!H", hdr[4:6])[0] == 16 + len(plain)
    other = plain[:12] + struct.pack("!HH", 0x8100, 30) + plain[12:]
    hdr, strip = encap(vp, other)
    assert strip == 0 and struct.unpack("!I", hdr[12:16])[0] >> 8 == VNI


# --- the AF_XDP underlay's outer headers (vs_vxlan_outer_header, vs_vxlan_parse_outer) ----

SRC_MAC = bytes.fromhex("020000000a01")
HOP_MAC = bytes.fromhex("020000000b02")


def ip_checksum_ok(header: bytes) -> bool:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return total == 0xffff


def xdp_vxlan_port(**kw):
    vp = vxlan_port(**kw)
    vp.src_mac = list(SRC_MAC)
    for i in range(vp.n_remotes):
        vp.remotes[i].outer_cur = lib.VS_VXLAN_NO_TEMPLATE
    return vp


def outer(vp, remote: int, data: bytes, ip_id: int = 0x1234):
    out = ffi.new("uint8_t[50]")
    strip = ffi.new("int *")
    frame_pkt = Pkt(data)              # kept: its buffer must outlive the call
    rc = lib.vs_vxlan_outer_header(vp, remote, frame_pkt.pkt, ip_id, out, strip)
    return (bytes(out), strip[0]) if rc == 0 else None


def test_outer_header_from_the_remotes_template():
    vp = xdp_vxlan_port()
    data = tcp_frame(1234)
    # No next hop MAC yet: nothing is written, the caller counts tx_no_neighbour.
    assert outer(vp, 0, data) is None
    lib.vs_vxlan_set_next_hop(vp, 0, HOP_MAC)
    hdr, strip = outer(vp, 0, data, ip_id=0xfffe)
    assert strip == 0 and hdr[:14] == HOP_MAC + SRC_MAC + b"\x08\x00"
    ver, tos, total, ident, frag, ttl, proto = struct.unpack("!BBHHHBB", hdr[14:24])
    assert (ver, tos, total, ident, frag, ttl, proto) == (0x45, 0, 20 + 16 + len(data), 0xfffe, 0, 64, 17)
    assert hdr[26:30] == socket.inet_aton("10.0.0.1") and hdr[30:34] == socket.inet_aton("10.0.0.2")
    assert ip_checksum_ok(hdr[14:34])
    # UDP + VXLAN: the socket path's 16 bytes, the same source port hash.
    assert hdr[34:] == encap(vp, data)[0]
    # Every length and id keeps the checksum right (the template's is patched per datagram).
    for ident in (0, 1, 0x8000, 0xffff):
        for size in (14, 60, 1450, 4000):
            assert ip_checksum_ok(outer(vp, 0, frame(BROADCAST, mac(1), payload=b"x" * size), ident)[0][14:34])
    # The other remote has its own template; a lost neighbour takes the template away.
    assert outer(vp, 1, data) is None
    lib.vs_vxlan_set_next_hop(vp, 1, bytes.fromhex("020000000c03"))
    assert outer(vp, 1, data)[0][:6] == bytes.fromhex("020000000c03")
    assert outer(vp, 1, data)[0][30:34] == socket.inet_aton("10.0.0.3")
    lib.vs_vxlan_set_next_hop(vp, 1, ffi.NULL)
    assert outer(vp, 1, data) is None and outer(vp, 0, data) is not None


def test_outer_header_of_a_mapped_vlan():
    vp = xdp_vxlan_port(vni_map={10: 1010})
    lib.vs_vxlan_set_next_hop(vp, 0, HOP_MAC)
    plain = frame(BROADCAST, mac(1))
    tagged = plain[:12] + struct.pack("!HH", 0x8100, 10) + plain[12:]
    hdr, strip = outer(vp, 0, tagged)
    assert strip == 1 and struct.unpack("!H", hdr[16:18])[0] == 20 + 16 + len(plain)
    assert struct.unpack("!I", hdr[46:50])[0] >> 8 == 1010


def parse_outer(vp, frame_bytes: bytes):
    buf = ffi.new("uint8_t[]", frame_bytes)
    sub = ffi.new("uint16_t *")
    inner_len = ffi.new("uint32_t *")
    off = lib.vs_vxlan_parse_outer(vp, buf, len(frame_bytes), sub, inner_len)
    if off < 0:
        return off, None, None
    return off, sub[0], bytes(ffi.buffer(buf, len(frame_bytes)))[off:off + inner_len[0]]


def datagram(inner: bytes, src="10.0.0.2", dst="10.0.0.1", dport=4789, vni=VNI, ihl=5, frag=0,
             total_extra=0, udp_extra=0) -> bytes:
    """An outer Ethernet + IPv4 + UDP + VXLAN frame around inner, as a remote would send it."""
    payload = vxlan_header(vni) + inner
    udp = struct.pack("!HHHH", 50000, dport, 8 + len(payload) + udp_extra, 0) + payload
    options = b"\x00" * (4 * (ihl - 5))
    total = 4 * ihl + len(udp) + total_extra
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 7, frag, 64, 17, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return SRC_MAC + HOP_MAC + b"\x08\x00" + ip + options + udp


def test_parse_outer_takes_the_tunnels_datagrams():
    vp = xdp_vxlan_port()
    inner = frame(BROADCAST, mac(1))
    assert parse_outer(vp, datagram(inner)) == (50, 1, inner)
    assert parse_outer(vp, datagram(inner, src="10.0.0.3")) == (50, 2, inner)
    # Ethernet padding after the datagram is not part of the inner frame.
    assert parse_outer(vp, datagram(inner) + bytes(10)) == (50, 1, inner)
    # What vs_vxlan_outer_header writes, this takes (the two ends of one tunnel).
    lib.vs_vxlan_set_next_hop(vp, 0, HOP_MAC)
    hdr, _ = outer(vp, 0, inner)
    mirror = xdp_vxlan_port(remotes=("10.0.0.1",))
    mirror.local_addr = _addr("10.0.0.2")
    assert parse_outer(mirror, hdr + inner) == (50, 1, inner)


def test_parse_outer_of_a_mapped_vni_pushes_the_vlan_tag():
    vp = xdp_vxlan_port(vni_map={20: 1020})
    inner = frame(BROADCAST, mac(1))
    assert parse_outer(vp, datagram(inner, vni=1020)) == \
        (46, 1, inner[:12] + struct.pack("!HH", 0x8100, 20) + inner[12:])


@pytest.mark.parametrize("bad, reason", [
    (datagram(frame(BROADCAST, mac(1)))[:41], "MALFORMED"),                        # a runt: no whole UDP header
    (datagram(frame(BROADCAST, mac(1)))[:60], "MALFORMED"),                        # cut: shorter than IPv4 says
    (datagram(b"\x00" * 10), "MALFORMED"),                                         # no room for an inner frame
    (datagram(frame(BROADCAST, mac(1)), udp_extra=4), "MALFORMED"),               # UDP and IPv4 lengths disagree
    (datagram(frame(BROADCAST, mac(1)), ihl=6), "MALFORMED"),                     # IPv4 options
    (datagram(frame(BROADCAST, mac(1)), dport=4790), "MALFORMED"),                # not the tunnel's port
    (datagram(frame(BROADCAST, mac(1)), dst="10.0.0.9"), "MALFORMED"),            # not the tunnel's address
    (datagram(frame(BROADCAST, mac(1)), frag=0x2000), "FRAGMENT"),                # MF: a first fragment
    (datagram(frame(BROADCAST, mac(1)), frag=0x0010), "FRAGMENT"),                # a later fragment
    (datagram(frame(BROADCAST, mac(1)), vni=VNI + 1), "WRONG_VNI"),
    (datagram(frame(BROADCAST, mac(1)), src="10.0.0.9"), "UNKNOWN_REMOTE"),
])
def test_parse_outer_refuses_with_a_reason(bad, reason):
    assert parse_outer(xdp_vxlan_port(), bad)[0] == getattr(lib, f"VS_VXLAN_{reason}")


# --- config and command line ------------------------------------------------------

def vx(**extra) -> dict:
    return {"name": "vx", "type": "vxlan", "local_ip": "10.0.0.1", "remote": ["10.0.0.2"], "vni": 10, **extra}


def test_config_defaults_and_forms():
    [port] = parse({"ports": [vx(remote="10.0.0.2, 10.0.0.3", vni_map={"10": 1010, 20: "1020"})]}).ports
    assert port["remote"] == ["10.0.0.2", "10.0.0.3"] and port["dst_port"] == 4789
    assert port["vni_map"] == {10: 1010, 20: 1020}
    assert "underlay" not in port
    [port] = parse({"ports": [vx(underlay={"type": "af-xdp", "interface": "veth0"})]}).ports
    assert port["underlay"] == {"type": "af-xdp", "interface": "veth0", "mode": "auto"}


def test_underlay_from_the_command_line():
    from vswitch.ports.vxlan import parse_underlay
    assert parse_underlay("socket") == {"type": "socket"}
    assert parse_underlay("af-xdp:veth0") == {"type": "af-xdp", "interface": "veth0", "mode": "auto"}
    assert parse_underlay("af-xdp:veth0,mode=generic")["mode"] == "generic"


@pytest.mark.parametrize("extra, problem", [
    ({"local_ip": "10.0.0.256"}, "local_ip: '10.0.0.256' is not a unicast IPv4 address"),
    ({"local_ip": "224.0.0.1"}, "local_ip: '224.0.0.1' is not a unicast IPv4 address"),
    ({"remote": []}, "remote: [] must be one or more IPv4 addresses"),
    ({"remote": ["10.0.0.2", "10.0.0.2"]}, "names a remote twice"),
    ({"remote": ["fe80::1"]}, "remote: 'fe80::1' is not a unicast IPv4 address"),
    ({"remote": ["10.0.0.1"]}, "remote: 10.0.0.1 is local_ip, not a remote"),
    ({"vni": 1 << 24}, "vni: 16777216 must be a whole number from 0 to 16777215"),
    ({"dst_port": 0}, "dst_port: 0 must be a whole number from 1 to 65535"),
    ({"underlay_mtu": 100}, "underlay_mtu: 100 must be a whole number"),
    ({"vni_map": {4095: 7}}, "VLAN 4095 must be a whole number from 1 to 4094"),
    ({"vni_map": {10: 7, 20: 7}}, "two VLANs map to the same VNI"),
    ({"vni_map": {10: 10}}, "vni_map: VNI 10 is the port's vni already"),
    ({"colour": 1}, "unknown key 'colour' for a vxlan port"),
    ({"underlay": {"type": "dpdk"}}, "underlay: type 'dpdk' must be one of: socket, af-xdp"),
    ({"underlay": {"type": "af-xdp"}}, "underlay: underlay type af-xdp needs interface"),
    ({"underlay": {"type": "af-xdp", "interface": "veth0", "mode": "fast"}}, "mode 'fast' must be one of"),
    ({"underlay": {"type": "af-xdp", "interface": "a b"}}, "underlay: interface: 'a b' is not an interface name"),
    ({"underlay": {"type": "socket", "interface": "veth0"}}, "unknown key 'interface' for underlay type socket"),
])
def test_bad_vxlan_keys_are_one_clear_line(extra, problem):
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [vx(**extra)]}, "x.yaml")
    [line] = exc.value.problems
    assert line.startswith("x.yaml: ports[0] (vx)") and problem in line, line


def test_missing_keys_are_named():
    with pytest.raises(ConfigError) as exc:
        parse({"ports": [{"name": "vx", "type": "vxlan"}]}, "x.yaml")
    assert [p.split(": ")[1].split(".")[-1] for p in exc.value.problems] == ["local_ip", "remote", "vni"]


# --- a vswitchd with a tunnel to sockets of this test -------------------------------

def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Remote:
    """A remote VTEP: a UDP socket on a loopback address, the tunnel's port."""

    def __init__(self, addr: str, port: int):
        self.addr, self.port = addr, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.sock.settimeout(2)

    def send(self, inner: bytes, vni: int = VNI, flags: int = 0x08) -> None:
        self.sock.sendto(vxlan_header(vni, flags) + inner, ("127.0.0.1", self.port))

    def receive(self, timeout: float = 2.0):
        """(source port, VNI, inner frame), or None."""
        self.sock.settimeout(timeout)
        try:
            data, (source, sport) = self.sock.recvfrom(70000)
        except socket.timeout:
            return None
        assert source == "127.0.0.1" and data[0] == 0x08
        return sport, struct.unpack("!I", data[4:8])[0] >> 8, data[8:]

    def close(self):
        self.sock.close()


@pytest.fixture
def tunnel(tmp_path):
    port = free_udp_port()
    remotes = [Remote("127.0.0.2", port), Remote("127.0.0.3", port)]
    ports = [{"name": "vm0", "type": "vhost-user", "path": str(tmp_path / "vm0.sock")},
             {"name": "vx", "type": "vxlan", "local_ip": "127.0.0.1", "remote": ["127.0.0.2", "127.0.0.3"],
              "vni": VNI, "dst_port": port, "underlay_mtu": 1000}]
    try:
        with Vswitchd(tmp_path, ports=ports) as d:
            [vm0] = d.connect_guests(["vm0"], rx_buffers=64)
            yield d, vm0, remotes
            vm0.close()
    finally:
        for r in remotes:
            r.close()


def fdb(d) -> set:
    return {(e["mac"], e["port"], e.get("remote")) for e in d.ctl("fdb", "show")["entries"]}


def test_learning_per_remote_head_end_replication_and_drops(tunnel):
    d, vm0, (r2, r3) = tunnel
    # A broadcast from behind 127.0.0.2 reaches the guest; its MAC is learned behind that remote.
    hello = frame(BROADCAST, mac(5))
    r2.send(hello)
    assert [f.data for f in vm0.receive(0, 1, timeout=2)] == [hello]
    assert fdb(d) == {("02:00:00:00:00:05", "vx", "127.0.0.2")}
    assert "127.0.0.2" in d.ctl_raw("fdb", "show").stdout.splitlines()[1]

    # The guest's broadcast goes to both remotes (head-end replication) ...
    vm0.send_frame(0, frame(BROADCAST, mac(1)))
    got2, got3 = r2.receive(), r3.receive()
    assert got2[1:] == got3[1:] == (VNI, frame(BROADCAST, mac(1)))
    assert 49152 <= got2[0] <= 65535
    # ... and its unicast to mac 5 only to the remote that MAC is behind.
    vm0.send_frame(0, frame(mac(5), mac(1)))
    assert r2.receive()[2] == frame(mac(5), mac(1))
    assert r3.receive(timeout=0.3) is None

    # The MAC moves behind 127.0.0.3: the table follows, so does the unicast.
    r3.send(frame(BROADCAST, mac(5)))
    vm0.receive(0, 1, timeout=2)
    wait_for(lambda: ("02:00:00:00:00:05", "vx", "127.0.0.3") in fdb(d), what="the move")
    vm0.send_frame(0, frame(mac(5), mac(1)))
    assert r3.receive()[2] == frame(mac(5), mac(1))
    assert r2.receive(timeout=0.3) is None

    # Hostile datagrams: dropped and counted, nothing reaches the guest.
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.4", 0))
    stranger.sendto(vxlan_header(VNI) + frame(BROADCAST, mac(9)), ("127.0.0.1", r2.port))
    stranger.close()
    r2.send(frame(BROADCAST, mac(9)), vni=VNI + 1)
    r2.send(frame(BROADCAST, mac(9)), flags=0)
    r2.sock.sendto(b"\x08\x00\x00\x00", ("127.0.0.1", r2.port))
    wait_for(lambda: d.port("vx")["stats"]["rx_malformed"] == 2, what="the malformed count")
    stats = d.port("vx")["stats"]
    assert (stats["rx_unknown_remote"], stats["rx_wrong_vni"], stats["rx_malformed"]) == (1, 1, 2)
    assert vm0.receive(0, 4, timeout=0.3) == []
    assert "02:00:00:00:00:09" not in {e[0] for e in fdb(d)}
    text = d.ctl_raw("show").stdout
    assert "rx_unknown_remote 1 (datagrams from an address that is not a remote)" in text
    assert f"vni {VNI} from 127.0.0.1:{r2.port} to 127.0.0.2 (rx 1, tx 2), 127.0.0.3 (rx 1, tx 2)" in text

    # Longer than underlay_mtu (1000) - 36 allows: dropped and counted, never cut.
    vm0.send_frame(0, frame(mac(5), mac(1), payload=b"z" * (1000 - 36 - 14 + 1)))
    vm0.send_frame(0, frame(mac(5), mac(1), payload=b"z" * (1000 - 36 - 14)))
    assert len(r3.receive()[2]) == 1000 - 36
    wait_for(lambda: d.port("vx")["stats"]["tx_dropped_mtu"] == 1, what="the MTU drop")
    info = d.port("vx")
    assert info["mtu"] == 1000 - 50 and [r["remote"] for r in info["remotes"]] == ["127.0.0.2", "127.0.0.3"]


def test_add_port_from_vswitchctl(tmp_path):
    port = free_udp_port()
    with Vswitchd(tmp_path, ports=[]) as d:
        out = d.ctl_raw("add-port", "vx", "--type", "vxlan", "--local-ip", "127.0.0.1", "--remote",
                        "127.0.0.2,127.0.0.3", "--vni", "7", "--dst-port", str(port), "--vni-map", "10=1010")
        assert out.returncode == 0, out.stderr
        info = d.port("vx")
        assert (info["vni"], info["dst_port"], info["vni_map"]) == (7, port, {"10": 1010})
        # The idle port's receive backs off; show says how often it called recvmmsg.
        wait_for(lambda: d.port("vx")["stats"]["rx_polls_skipped"] > 0, what="an idle poll skipped")
        stats = d.port("vx")["stats"]
        assert 0 < stats["rx_polls"] == stats["rx_empty_polls"]
        assert "recvmmsg calls" in d.ctl_raw("show").stdout
        for args, error in [
            (("--local-ip", "127.0.0.1", "--remote", "127.0.0.2", "--vni", "99999999"),
             "port 'vy': vni: 99999999 must be a whole number from 0 to 16777215"),
            (("--remote", "127.0.0.2", "--vni", "1"), "port 'vy': local_ip: required"),
            # The same local_ip:dst_port as vx: the bind fails, one line.
            (("--local-ip", "127.0.0.1", "--remote", "127.0.0.2", "--vni", "1", "--dst-port", str(port)),
             "Address already in use"),
        ]:
            out = d.ctl_raw("add-port", "vy", "--type", "vxlan", *args)
            assert out.returncode != 0 and out.stderr.count("\n") == 1, out
            assert error in out.stderr, out.stderr
        # A flag vswitchctl itself can check: a usage error, before the daemon is asked.
        out = d.ctl_raw("add-port", "vy", "--type", "vxlan", "--local-ip", "127.0.0.1", "--remote", "bogus",
                        "--vni", "1")
        assert out.returncode == 2 and "argument --remote: 'bogus' is not a unicast IPv4 address" in out.stderr
        assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["vx"]
        assert "--remote" in d.ctl_raw("add-port", "--help").stdout


def test_per_vlan_vnis(tmp_path):
    """vni_map on a trunk: VLAN 10 travels untagged in VNI 1010, VLAN 0 in the port's vni."""
    port = free_udp_port()
    r2 = Remote("127.0.0.2", port)
    ports = [{"name": "vm10", "type": "vhost-user", "path": str(tmp_path / "vm10.sock"),
              "vlan": {"mode": "access", "tag": 10}},
             {"name": "vm0", "type": "vhost-user", "path": str(tmp_path / "vm0.sock")},
             {"name": "vx", "type": "vxlan", "local_ip": "127.0.0.1", "remote": ["127.0.0.2"], "vni": VNI,
              "dst_port": port, "vlan": {"mode": "trunk"}, "vni_map": {10: 1010}}]
    try:
        with Vswitchd(tmp_path, ports=ports) as d:
            vm10, vm0 = d.connect_guests(["vm10", "vm0"], rx_buffers=64)
            vm10.send_frame(0, frame(BROADCAST, mac(1)))
            assert r2.receive()[1:] == (1010, frame(BROADCAST, mac(1)))
            vm0.send_frame(0, frame(BROADCAST, mac(2)))
            assert r2.receive()[1:] == (VNI, frame(BROADCAST, mac(2)))
            # From the remote: VNI 1010 is VLAN 10 (vm10 only), the port's vni is VLAN 0 (vm0 only).
            r2.send(frame(BROADCAST, mac(5)), vni=1010)
            assert [f.data for f in vm10.receive(0, 1, timeout=2)] == [frame(BROADCAST, mac(5))]
            r2.send(frame(BROADCAST, mac(6)), vni=VNI)
            assert [f.data for f in vm0.receive(0, 1, timeout=2)] == [frame(BROADCAST, mac(6))]
            assert vm10.receive(0, 1, timeout=0.3) == [] and vm0.receive(0, 1, timeout=0.1) == []
            rows = {(e["mac"], e["vlan"], e["port"], e.get("remote")) for e in d.ctl("fdb", "show")["entries"]}
            assert ("02:00:00:00:00:05", 10, "vx", "127.0.0.2") in rows
            assert ("02:00:00:00:00:06", 0, "vx", "127.0.0.2") in rows
            r2.send(frame(BROADCAST, mac(7)), vni=2020)
            wait_for(lambda: d.port("vx")["stats"]["rx_wrong_vni"] == 1, what="the wrong VNI count")
            vm10.close()
            vm0.close()
    finally:
        r2.close()


def test_random_datagrams_are_taken_or_refused_with_a_reason():
    """Hostile datagrams from a remote: decap never reads or writes outside the datagram's
    bytes it was given, and an accepted one leaves a whole Ethernet header."""
    import random
    rng = random.Random(7)
    vp = vxlan_port(vni_map={10: 1010})
    reasons = set()
    for _ in range(5000):
        n = rng.choice([0, 1, 7, 8, 21, 22, 23, rng.randrange(0, 200)])
        data = bytes(rng.randrange(256) for _ in range(n))
        if n >= 8 and rng.random() < 0.5:
            data = vxlan_header(rng.choice([VNI, 1010, 77]), rng.choice([0x08, 0x00, 0xff])) + data[8:]
        guard = b"\xa5" * 16
        buf = ffi.new("uint8_t[]", guard + data + guard)
        sub = ffi.new("uint16_t *")
        off = lib.vs_vxlan_decap(vp, _addr("10.0.0.2"), buf + 16, len(data), sub)
        after = bytes(ffi.buffer(buf, len(data) + 32))
        assert after[:16] == guard and after[-16:] == guard
        if off < 0:
            reasons.add(off)
            assert after[16:-16] == data
        else:
            assert off in (4, 8) and len(data) - off >= 14 and sub[0] == 1
            reasons.add(off)
    assert reasons == {lib.VS_VXLAN_MALFORMED, lib.VS_VXLAN_WRONG_VNI, 4, 8}


class OpenPort:
    """A vxlan port's C side opened on 127.0.0.1 (one remote, 127.0.0.2), its
    receive called as a PMD would, without a switch around it."""

    def __init__(self):
        self.dst_port = free_udp_port()
        self.vp = vxlan_port(remotes=("127.0.0.2",))
        self.vp.local_addr = _addr("127.0.0.1")
        self.vp.dst_port = self.dst_port
        assert lib.vs_vxlan_port_init(self.vp) == 0
        assert lib.vs_vxlan_port_open(self.vp, -1) == 0, ffi.string(self.vp.error)
        self.port = ffi.new("struct vs_port *")
        self.port.priv = self.vp
        self.ops = lib.vs_vxlan_port_ops()
        self.pkts = ffi.new("struct vs_pkt[]", lib.VS_BURST)
        self.remote = Remote("127.0.0.2", self.dst_port)

    def rx(self) -> int:
        return self.ops.rx_burst(self.port, 0, self.pkts, lib.VS_BURST)

    def readable(self) -> bool:
        return bool(select.select([self.vp.rx_fd], [], [], 2)[0])

    def close(self):
        self.remote.close()
        lib.vs_vxlan_port_fini(self.vp)


@pytest.fixture
def open_port():
    p = OpenPort()
    yield p
    p.close()


def test_empty_receives_back_off_instead_of_a_system_call_each(open_port):
    """Polls of an empty socket are mostly skipped: few recvmmsg calls per
    thousands of empty bursts, all of them counted."""
    p = open_port
    # A cap of 1 ms, so that the Python loop's own pace cannot decide the outcome.
    p.vp.rx_backoff_max_cycles = lib.vs_tsc_hz() // 1000
    n = 5000
    start = time.monotonic()
    assert sum(p.rx() for _ in range(n)) == 0
    elapsed = time.monotonic() - start
    s = p.vp.stats
    assert s.rx_polls + s.rx_polls_skipped == n
    assert s.rx_empty_polls == s.rx_polls
    # Doubling from 1/8 us reaches 1 ms in 13 steps; then one call a millisecond.
    assert s.rx_polls <= 14 + elapsed * 1000 * 1.1, (s.rx_polls, elapsed)
    assert s.rx_polls < n // 10


def test_a_datagram_after_a_long_idle_is_taken_by_the_next_burst(open_port):
    """The backoff is a time, not a number of passes: once its cap has gone by,
    the next burst calls recvmmsg, however long the socket was idle."""
    p = open_port
    for _ in range(2000):
        p.rx()
    assert p.vp.stats.rx_polls_skipped > 0
    assert p.vp.rx_backoff_cycles == p.vp.rx_backoff_max_cycles
    assert p.vp.rx_backoff_max_cycles * 1e9 // lib.vs_tsc_hz() <= lib.VS_VXLAN_RX_BACKOFF_MAX_NS
    time.sleep(0.05)
    inner = frame(BROADCAST, mac(1))
    p.remote.send(inner)
    assert p.readable()
    polls = p.vp.stats.rx_polls
    assert p.rx() == 1
    assert p.vp.stats.rx_polls == polls + 1
    assert bytes(ffi.buffer(p.pkts[0].segs[0].addr, p.pkts[0].len)) == inner
    # A datagram resets the backoff: the next empty burst polls again.
    assert p.vp.rx_backoff_cycles == 0
    assert p.rx() == 0 and p.vp.stats.rx_polls == polls + 2


def test_a_datagram_during_the_backoff_waits_at_most_its_cap(open_port):
    """Polled back to back while backing off at its cap, a datagram is taken
    within the cap of becoming readable (measured on the TSC around the loop)."""
    p = open_port
    hz = lib.vs_tsc_hz()
    waits = []
    inner = frame(BROADCAST, mac(1))
    for _ in range(20):
        for _ in range(500):
            p.rx()
        assert p.vp.rx_backoff_cycles == p.vp.rx_backoff_max_cycles
        p.remote.send(inner)
        # The datagram is in the socket once select says so; from there the
        # wait is the rest of the backoff (the loop's own calls add little).
        assert p.readable()
        t0 = time.perf_counter()
        calls = 0
        while not p.rx():
            calls += 1
            assert calls < 10_000_000
        waits.append(time.perf_counter() - t0)
    cap = p.vp.rx_backoff_max_cycles / hz
    # The median, since a preemption of this process can stretch any one wait.
    waits.sort()
    assert waits[len(waits) // 2] <= cap + 50e-6, (waits, cap)


def test_a_sleep_ends_the_backoff(open_port):
    """After the PMD's sleep (idle_disarm), the first burst polls the socket."""
    p = open_port
    for _ in range(200):
        p.rx()
    assert p.vp.rx_backoff_cycles > 0
    assert p.ops.idle_arm(p.port, 0) == p.vp.rx_fd
    p.ops.idle_disarm(p.port, 0, 0)
    polls = p.vp.stats.rx_polls
    p.rx()
    assert p.vp.stats.rx_polls == polls + 1
