"""AF_XDP ports: a veth pair, one end in a test namespace with an address,
the other attached to vswitchd with XDP sockets, next to vhost-user
front-ends (Python ones, a QEMU guest, DPDK testpmd).

Native XDP works on veth (in copy mode: veth has no zero-copy).  The
cases: frames both ways with learning and flooding, what `show` reports;
a partial-checksum and a TSO frame from a guest arriving intact in the
namespace (the PMD completes them in software: the port takes no offload);
two queues; link down and up; deletion; kill -9 and a restart leaving no
stale program; the refusals (libxdp missing, no native XDP, too few
channels, another program in the way); a QEMU guest pinged and iperf3 both
ways; DPDK's net_af_xdp on the other end of the veth exchanging frames with
a net_virtio_user port through the switch.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from tests.conftest import require_tool
from tests.support.daemon import Vswitchd
from tests.support.netns import EventStream, in_ns, link_mac, python_in_ns, sh, unique

pytestmark = pytest.mark.system

NS_IP = "10.250.7.1"
G1 = ("02:00:00:00:07:01", "10.250.7.2")
G2 = ("02:00:00:00:07:02", "10.250.7.3")
_ids = itertools.count()


@pytest.fixture(autouse=True)
def record_dir(tmp_path, monkeypatch):
    """The switch's records of attached interfaces go to the test's own directory."""
    path = tmp_path / "af-xdp"
    monkeypatch.setenv("VSWITCH_AF_XDP_DIR", str(path))
    require_tool("xdp-loader", "xdp-tools")
    return path


def make_veth(netns, queues: int = 1):
    n = next(_ids)
    host, peer = unique("vxa", n), unique("vxb", n)
    extra = ["numrxqueues", str(queues), "numtxqueues", str(queues)] if queues > 1 else []
    sh("ip", "link", "add", host, *extra, "type", "veth", "peer", "name", peer, *extra)
    sh("ip", "link", "set", peer, "netns", netns)
    # No IPv6 chatter (router solicitations, MLD) from either end: counters count only the test's frames.
    sh("sysctl", "-qw", f"net.ipv6.conf.{host}.disable_ipv6=1")
    in_ns(netns, "sysctl", "-qw", f"net.ipv6.conf.{peer}.disable_ipv6=1")
    sh("ip", "link", "set", host, "up")
    in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", peer)
    in_ns(netns, "ip", "link", "set", peer, "up")
    # XDP carries no checksum state: frames the namespace's stack leaves to
    # a checksum offload would reach the switch with only the pseudo-header
    # sum.  So, as for OVS's AF_XDP ports, the namespace end computes them.
    in_ns(netns, "ethtool", "-K", peer, "tx", "off")
    return host, peer


@pytest.fixture
def veth(netns):
    """(host end, namespace end); the namespace end has NS_IP/24."""
    host, peer = make_veth(netns)
    try:
        yield host, peer
    finally:
        sh("ip", "link", "del", host, check=False)


def start_switch(tmp_path, host, netns, **xdp):
    ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
             {"name": "g2", "type": "vhost-user", "path": str(tmp_path / "g2.sock")},
             {"name": "xdp", "type": "af-xdp", "ifname": host, **xdp}]
    d = Vswitchd(tmp_path, ports=ports).start()
    d.host, d.netns = host, netns
    return d


@pytest.fixture
def switch(tmp_path, veth, netns):
    host, peer = veth
    d = start_switch(tmp_path, host, netns)
    try:
        d.peer = peer
        d.fe = dict(zip(("g1", "g2"), d.connect_guests(["g1", "g2"], rx_buffers=128)))
        yield d
    finally:
        for fe in getattr(d, "fe", {}).values():
            fe.close()
        d.stop()


def rx(fe, timeout=0.2):
    frames = fe.receive(0, 1, timeout=timeout)
    if frames:
        fe.post_rx(0, len(frames))
    return [Ether(f.data) for f in frames]


def wait_for(fe, match, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in rx(fe):
            if match(p):
                return p
    raise AssertionError("no matching frame")


def arp_request(mac, ip, target):
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=ip, pdst=target))


def xdp_programs(ifname: str, netns: str | None = None) -> list[str]:
    """The XDP programs `xdp-loader status` lists on an interface: 'name:id' each."""
    cmd = ["xdp-loader", "status", ifname]
    out = (in_ns(netns, *cmd, check=False) if netns else sh(*cmd, check=False)).stdout
    progs = []
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == ifname and len(fields) >= 4 and "<No" not in line:
            # "IF  [prio] NAME MODE ID TAG ..." (a prio column only under the dispatcher)
            m = re.match(rf"{re.escape(ifname)}\s+(?:\d+\s+)?(\S+)\s+(\S+)\s+(\d+)", line)
            if m:
                progs.append(f"{m.group(1)}:{m.group(3)}")
        elif fields and fields[0].startswith("=>"):
            progs.append(f"{fields[2]}:{fields[3]}")
    return progs


def test_frames_both_ways_and_show(switch):
    """g1 and the namespace exchange ARP and ping through the AF_XDP port;
    broadcasts flood; show reports mode, copy mode and per-queue counters."""
    d = switch
    g1, g2 = d.fe["g1"], d.fe["g2"]
    ns_mac = link_mac(d.netns, d.peer)
    g1.send_frame(0, arp_request(G1[0], G1[1], NS_IP))
    reply = wait_for(g1, lambda p: ARP in p and p[ARP].op == 2)
    assert reply[ARP].hwsrc == ns_mac and reply.dst == G1[0]
    assert wait_for(g2, lambda p: ARP in p and p[ARP].op == 1 and p.src == G1[0])
    g1.send_frame(0, bytes(Ether(src=G1[0], dst=ns_mac) / IP(src=G1[1], dst=NS_IP) / ICMP(id=3) / (b"x" * 64)))
    echo = wait_for(g1, lambda p: ICMP in p and p[ICMP].type == 0)
    assert echo[IP].src == NS_IP
    fdb = {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}
    assert fdb[ns_mac] == "xdp" and fdb[G1[0]] == "g1"
    port = d.port("xdp")
    assert port["type"] == "af-xdp" and port["link"] == "up" and port["ifname"] == d.host
    assert port["mode"] == "native", port          # veth has native XDP
    assert port["copy"] == "copy", port            # and no zero-copy
    assert port["xdp_program"]["id"] > 0
    assert f"xsk_def_prog:{port['xdp_program']['id']}" in xdp_programs(d.host)
    (q0,) = port["queue_stats"]
    assert q0["rx_packets"] >= 2 and q0["tx_packets"] >= 2 and q0["tx_kicks"] >= 1
    assert q0["kernel_rx_fill_ring_empty_descs"] == 0 and q0["tx_ring_full"] == 0
    s = port["stats"]
    assert s["rx_packets"] == q0["rx_packets"] and s["rx_errors"] == s["tx_errors"] == 0
    text = d.ctl_raw("show", "xdp", check=True).stdout
    assert "native" in text and "fill" in text, text
    # del-port detaches the program (the last socket closed); add-port attaches again.
    d.ctl("del-port", "xdp")
    assert xdp_programs(d.host) == []
    d.ctl("add-port", "xdp", "--type", "af-xdp", "--ifname", d.host, "--mode", "native", "--zero-copy", "off")
    assert d.port("xdp")["mode"] == "native" and len(xdp_programs(d.host)) == 1


def start_guest(d, path, features):
    from tests.support.frontend import VhostUserFrontend

    fe = VhostUserFrontend(path, features=features).connect()
    fe.handshake()
    fe.post_rx(0, 128)
    return fe


def test_tso_and_partial_checksum_from_a_guest_arrive_intact(tmp_path, veth, netns):
    """A guest that negotiated CSUM and HOST_TSO4 sends a 4000-byte TSO frame
    with a partial checksum: the AF_XDP port takes no offload, so the PMD
    segments it and fills the checksums, and the namespace's TCP stack takes
    every byte (it drops segments with bad checksums).  The namespace's
    answer comes back through the XDP socket with valid checksums."""
    from tests.support.frontend import DRIVER_FEATURES
    from tests.system.test_tap import NS_SERVER, checksums_valid, gso_header, pseudo_partial
    from vswitch.vhost import protocol
    from vswitch.vhost.protocol import bits

    host, peer = veth
    ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
             {"name": "xdp", "type": "af-xdp", "ifname": host}]
    with Vswitchd(tmp_path, ports=ports) as d:
        fe = start_guest(d, tmp_path / "g1.sock",
                         DRIVER_FEATURES | bits(protocol.VIRTIO_NET_F_CSUM, protocol.VIRTIO_NET_F_HOST_TSO4))
        try:
            assert fe.features & bits(protocol.VIRTIO_NET_F_HOST_TSO4)
            payload = bytes((i * 13) & 0xFF for i in range(4000))
            server = python_in_ns(netns, "-c", NS_SERVER, str(len(payload)))
            try:
                assert server.stdout.readline().strip() == "listening"
                fe.send_frame(0, arp_request(G1[0], G1[1], NS_IP))
                ns_mac = wait_for(fe, lambda p: ARP in p and p[ARP].op == 2).src
                eth = Ether(src=G1[0], dst=ns_mac) / IP(src=G1[1], dst=NS_IP)
                fe.send_frame(0, bytes(eth / TCP(sport=40000, dport=5001, flags="S", seq=1000,
                                                 options=[("MSS", 1460)])))
                synack = wait_for(fe, lambda p: TCP in p and p[TCP].flags == "SA")
                ack = synack[TCP].seq + 1
                fe.send_frame(0, bytes(eth / TCP(sport=40000, dport=5001, flags="A", seq=1001, ack=ack)))
                big = eth / TCP(sport=40000, dport=5001, flags="PA", seq=1001, ack=ack, window=65535) / payload
                fe.send_frame(0, pseudo_partial(big), header=gso_header(big, 1448))
                line = server.stdout.readline().split()
                assert line == [str(len(payload)), __import__("hashlib").sha256(payload).hexdigest()], line
                got = b""
                deadline = time.monotonic() + 10
                while len(got) < 10240 and time.monotonic() < deadline:
                    for p in rx(fe):
                        if TCP in p and p[TCP].sport == 5001 and len(p[TCP].payload):
                            assert checksums_valid(p), p.show(dump=True)
                            got += bytes(p[TCP].payload)
                assert got == bytes(range(256)) * 40
            finally:
                server.kill()
                server.communicate()
            s = d.port("xdp")["stats"]
            assert s["tx_errors"] == 0 and s["tx_packets"] >= 5
        finally:
            fe.close()


UDP_FLOWS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20000 + int(sys.argv[2])):
    s.sendto(b"flow", (sys.argv[1], port))
"""


def test_two_queues_spread_flows(tmp_path, netns):
    """A veth with two queues each way, attached with queues: 2: the
    namespace's flows arrive on both XDP sockets, and the guest gets all."""
    host, peer = make_veth(netns, queues=2)
    try:
        ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
                 {"name": "xdp", "type": "af-xdp", "ifname": host, "queues": 2}]
        with Vswitchd(tmp_path, ports=ports) as d:
            (fe,) = d.connect_guests(["g1"], rx_buffers=256)
            try:
                in_ns(netns, "ip", "neigh", "replace", G1[1], "lladdr", G1[0], "dev", peer)
                flows = 64
                # The send queue follows the sending CPU (XPS): send from each.
                for cpu in (0, 1):
                    in_ns(netns, "taskset", "-c", str(cpu), "python3", "-c", UDP_FLOWS, G1[1], str(flows))
                got = 0
                deadline = time.monotonic() + 5
                while got < 2 * flows and time.monotonic() < deadline:
                    got += len([p for p in rx(fe) if UDP in p and p[UDP].dport >= 20000])
                assert got == 2 * flows
                port = d.port("xdp")
                assert port["queues"] == 2
                per_queue = [q["rx_packets"] for q in port["queue_stats"]]
                assert all(n > 0 for n in per_queue), per_queue
            finally:
                fe.close()
    finally:
        sh("ip", "link", "del", host, check=False)


def test_interface_in_another_namespace(tmp_path, veth, netns):
    """`netns`: the switch's end of the veth lives in a namespace of its own;
    the sockets are made there, the link is followed there, and del-port
    detaches the program there (libxdp does it in the caller's namespace)."""
    from tests.support.netns import namespaces

    host, peer = veth
    with namespaces(1) as (switch_ns,):
        sh("ip", "link", "set", host, "netns", switch_ns)
        in_ns(switch_ns, "ip", "link", "set", host, "up")
        ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
                 {"name": "xdp", "type": "af-xdp", "ifname": host, "netns": switch_ns}]
        with Vswitchd(tmp_path, ports=ports) as d:
            (fe,) = d.connect_guests(["g1"])
            try:
                assert ping_ns(fe, link_mac(netns, peer), 4)
                port = d.port("xdp")
                assert port["netns"] == switch_ns and port["mode"] == "native"
                assert xdp_programs(host, switch_ns) == [f"xsk_def_prog:{port['xdp_program']['id']}"]
                with EventStream(d) as events:
                    t = time.time()
                    in_ns(switch_ns, "ip", "link", "set", host, "down")
                    events.wait_link("xdp", "down", after=t)
                    t = time.time()
                    in_ns(switch_ns, "ip", "link", "set", host, "up")
                    events.wait_link("xdp", "up", after=t)
                assert ping_ns(fe, link_mac(netns, peer), 5)
                d.ctl("del-port", "xdp")
                assert xdp_programs(host, switch_ns) == []
            finally:
                fe.close()
        in_ns(switch_ns, "ip", "link", "del", host, check=False)


def ping_ns(fe, ns_mac, ident, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        fe.send_frame(0, bytes(Ether(src=G1[0], dst=ns_mac) / IP(src=G1[1], dst=NS_IP) / ICMP(id=ident, seq=seq)))
        for p in rx(fe, 0.2):
            if ICMP in p and p[ICMP].type == 0 and p[ICMP].id == ident:
                return True
            if ARP in p and p[ARP].op == 1 and p[ARP].pdst == G1[1]:
                fe.send_frame(0, bytes(Ether(src=G1[0], dst=p.src) /
                                       ARP(op=2, hwsrc=G1[0], psrc=G1[1], hwdst=p.src, pdst=p[ARP].psrc)))
    return False


def g1_to_g2_all_delivered(d, count=20) -> None:
    g1, g2 = d.fe["g1"], d.fe["g2"]
    for i in range(count):
        g1.send_frame(0, bytes(Ether(src=G1[0], dst=G2[0]) / IP(src=G1[1], dst=G2[1]) / ICMP(id=99, seq=i)))
    got = 0
    deadline = time.monotonic() + 5
    while got < count and time.monotonic() < deadline:
        got += len([p for p in rx(g2) if ICMP in p and p[ICMP].id == 99])
    assert got == count, f"g2 got {got} of {count} frames from g1"


def test_link_down_up_then_deleted(switch):
    """The interface goes down: a link-down event with the reason, pings go
    unanswered; it comes back up: the link returns and pings are answered
    at once.  Then it is deleted: the port reports it gone.  g1 <-> g2 never
    notice."""
    d = switch
    g1 = d.fe["g1"]
    ns_mac = link_mac(d.netns, d.peer)
    d.fe["g2"].send_frame(0, arp_request(G2[0], G2[1], G1[1]))
    assert ping_ns(g1, ns_mac, 1)
    with EventStream(d) as events:
        for round_ in range(2):
            t = time.time()
            sh("ip", "link", "set", d.host, "down")
            events.wait_link("xdp", "down", after=t)
            assert d.port("xdp")["link_reason"] == f"interface {d.host} is down"
            assert not ping_ns(g1, ns_mac, 10 + round_, timeout=1.0)
            g1_to_g2_all_delivered(d)
            t = time.time()
            sh("ip", "link", "set", d.host, "up")
            events.wait_link("xdp", "up", after=t)
            assert ping_ns(g1, ns_mac, 20 + round_)
        t = time.time()
        sh("ip", "link", "del", d.host)
        events.wait_link("xdp", "down", after=t)
    assert "gone" in d.port("xdp")["link_reason"]
    g1_to_g2_all_delivered(d)
    d.ctl("del-port", "xdp")
    assert d.proc.poll() is None


def test_kill_and_restart_leaves_no_stale_program(tmp_path, veth, netns, record_dir):
    """vswitchd killed with -9 leaves its XDP program on the interface (and
    its record); the restarted switch removes exactly that program, attaches
    its own and forwards; a clean stop leaves nothing."""
    host, peer = veth
    ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
             {"name": "xdp", "type": "af-xdp", "ifname": host}]
    d = Vswitchd(tmp_path, ports=ports)
    try:
        d.start()
        first = d.port("xdp")["xdp_program"]["id"]
        assert xdp_programs(host) == [f"xsk_def_prog:{first}"]
        d.kill()
        assert xdp_programs(host) == [f"xsk_def_prog:{first}"], "killed: the program stays"
        (record,) = list(record_dir.iterdir())
        assert json.loads(record.read_text())["prog_id"] == first
        d.start()
        second = d.port("xdp")["xdp_program"]["id"]
        assert second != first
        assert xdp_programs(host) == [f"xsk_def_prog:{second}"]
        assert f"removed XDP program {first}" in d.log()
        (fe,) = d.connect_guests(["g1"])
        try:
            assert ping_ns(fe, link_mac(netns, peer), 5)
        finally:
            fe.close()
        d.stop()
        assert xdp_programs(host) == [] and list(record_dir.iterdir()) == []
    finally:
        d.stop()


def add_port_error(d, *args) -> str:
    r = d.ctl_raw("add-port", "x", "--type", "af-xdp", *args)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_refusals_are_one_line_and_disturb_nothing(tmp_path, veth, netns, monkeypatch):
    """No libxdp; native mode on an interface without native XDP (a bridge);
    more queues than channels; an interface attached already: each refused
    with one line, and the running port keeps forwarding."""
    host, peer = veth
    dummy = unique("vxd", next(_ids))
    sh("ip", "link", "add", dummy, "type", "bridge")   # a bridge has no native XDP
    try:
        sh("ip", "link", "set", dummy, "up")
        d = start_switch(tmp_path, host, netns)
        try:
            d.fe = dict(zip(("g1", "g2"), d.connect_guests(["g1", "g2"])))
            ns_mac = link_mac(netns, peer)
            line = add_port_error(d, "--ifname", dummy, "--mode", "native")
            assert f"interface {dummy} has no native XDP support" in line and "mode: generic" in line, line
            line = add_port_error(d, "--ifname", host)
            assert f"interface {host} is already attached by port 'xdp'" in line, line
            # Another vswitchd finds the interface's record held.
            (tmp_path / "second").mkdir()
            with Vswitchd(tmp_path / "second", ports=[]) as other:
                line = add_port_error(other, "--ifname", host)
                assert f"interface {host} is already attached by an af-xdp port (vswitchd pid {d.proc.pid})" \
                    in line, line
            line = add_port_error(d, "--ifname", "nosuchif0")
            assert "interface nosuchif0 does not exist" in line, line
            d.ctl("del-port", "xdp")
            line = add_port_error(d, "--ifname", host, "--zero-copy", "on")
            assert f"interface {host} does not offer AF_XDP zero-copy" in line, line
            line = add_port_error(d, "--ifname", host, "--queues", "2")
            assert f"interface {host} has 1 channel(s), fewer than queues: 2" in line, line
            # auto on the bridge falls back to generic XDP.
            d.ctl("add-port", "dummy", "--type", "af-xdp", "--ifname", dummy)
            assert d.port("dummy")["mode"] == "generic"
            d.ctl("del-port", "dummy")
            d.ctl("add-port", "xdp", "--type", "af-xdp", "--ifname", host, "--mode", "auto")
            assert ping_ns(d.fe["g1"], ns_mac, 7)
            g1_to_g2_all_delivered(d)
        finally:
            for fe in getattr(d, "fe", {}).values():
                fe.close()
            d.stop()
        # Without libxdp the switch runs; only the AF_XDP port is refused.
        monkeypatch.setenv("VSWITCH_LIBXDP", "/nonexistent.so")
        ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
                 {"name": "g2", "type": "vhost-user", "path": str(tmp_path / "g2.sock")}]
        with Vswitchd(tmp_path, ports=ports) as d:
            d.fe = dict(zip(("g1", "g2"), d.connect_guests(["g1", "g2"])))
            try:
                line = add_port_error(d, "--ifname", host)
                assert "af-xdp ports need libxdp" in line and "/nonexistent.so" in line, line
                g1_to_g2_all_delivered(d)
                assert [p["name"] for p in d.ctl("show")["ports"]] == ["g1", "g2"]
            finally:
                for fe in d.fe.values():
                    fe.close()
        assert xdp_programs(host) == []
    finally:
        sh("ip", "link", "del", dummy, check=False)


XDP_PASS_PROG = "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o"


def test_another_xdp_program_loaded_first(switch):
    """xdp-loader's program on the interface first.  Where libxdp's
    dispatcher works, xdp-loader puts its program under it and both
    programs then run side by side; where it cannot load (on this machine
    the kernel refuses its freplace program), xdp-loader attaches its
    program alone, and the port is refused with one line that says why,
    leaving the other program as it was."""
    d = switch
    d.ctl("del-port", "xdp")
    sh("xdp-loader", "load", "-m", "native", d.host, XDP_PASS_PROG)
    try:
        before = xdp_programs(d.host)
        names = [p.split(":")[0] for p in before]
        assert "xdpfilt_alw_all" in names, before
        if "xdp_dispatcher" in names:
            d.ctl("add-port", "xdp", "--type", "af-xdp", "--ifname", d.host)
            names = [p.split(":")[0] for p in xdp_programs(d.host)]
            assert "xdpfilt_alw_all" in names and "xsk_def_prog" in names, names
            assert d.port("xdp")["xdp_program"]["dispatcher"] is True
            assert ping_ns(d.fe["g1"], link_mac(d.netns, d.peer), 8)
            d.ctl("del-port", "xdp")
            names = [p.split(":")[0] for p in xdp_programs(d.host)]
            assert "xdpfilt_alw_all" in names and "xsk_def_prog" not in names, names
        else:
            line = add_port_error(d, "--ifname", d.host)
            assert f"interface {d.host} already runs XDP program 'xdpfilt_alw_all' outside libxdp's dispatcher" \
                in line, line
            assert xdp_programs(d.host) == before
        g1_to_g2_all_delivered(d)
    finally:
        sh("xdp-loader", "unload", d.host, "--all", check=False)


@pytest.fixture
def xdp_host_and_vm(tmp_path, kit, netns):  # noqa: F811 (kit is a fixture)
    """A QEMU guest on a vhost-user port and the namespace behind an AF_XDP
    port named "host", with the addresses test_host_to_vm's cases use."""
    from tests.system import test_host_to_vm as h2v
    from tests.system.test_qemu_guests import BOOT_TIMEOUT, wait_links
    from tools import vmkit

    host, peer = make_veth(netns)
    try:
        in_ns(netns, "ip", "addr", "flush", "dev", peer)
        in_ns(netns, "ip", "addr", "add", f"{h2v.NS_IP}/24", "dev", peer)
        ports = [{"name": "vm", "type": "vhost-user", "path": str(tmp_path / "vm.sock")},
                 {"name": "host", "type": "af-xdp", "ifname": host}]
        with Vswitchd(tmp_path, ports=ports) as switch:
            guest = vmkit.Guest("vm", tmp_path / "vm.sock", ip=f"{h2v.GUEST_IP}/24", mac="52:54:00:c8:07:02",
                                log_dir=tmp_path, kit_dir=kit)
            with guest:
                guest.wait_ready(BOOT_TIMEOUT)
                wait_links(switch, ["vm", "host"])
                yield switch, guest, netns
    finally:
        sh("ip", "link", "del", host, check=False)


from tests.system.test_qemu_guests import kit  # noqa: E402,F401 (a fixture)


@pytest.mark.qemu
def test_qemu_guest_ping_and_tcp_both_ways(xdp_host_and_vm, request):
    """test_host_to_vm's ping and 16 MiB SHA-256-checked transfers each way,
    with the AF_XDP port in place of the TAP: the guest's TSO frames are
    segmented and checksummed in software on their way to the UMEM."""
    from tests.system import test_host_to_vm as h2v

    h2v.test_ping_and_tcp_both_ways(xdp_host_and_vm, request)
    port = xdp_host_and_vm[0].port("host")
    assert port["mode"] == "native"
    assert port["stats"]["rx_packets"] > 1000 and port["stats"]["tx_packets"] > 1000


@pytest.mark.qemu
def test_qemu_guest_iperf3_both_ways(xdp_host_and_vm, request, tmp_path, require_tool):
    from tests.system import test_host_to_vm as h2v

    h2v.test_iperf3_both_ways(xdp_host_and_vm, request, tmp_path, require_tool)


DPDK_MAC = "02:00:00:00:07:09"


@pytest.mark.dpdk
def test_dpdk_af_xdp_peer_loops_frames_with_a_virtio_user_port(tmp_path, veth, netns):
    """DPDK's own AF_XDP PMD (net_af_xdp, linked to libxdp) on the namespace
    end of the veth, and a DPDK virtio-user guest on a vhost-user port: both
    forward in mac mode to each other, seeded with tx_first, so frames loop
    testpmd(af_xdp) -> veth -> AF_XDP port -> vhost-user port -> testpmd
    (virtio-user) and back.  Every frame each side sent was taken by the
    switch; the switch delivered at least what each side read, at most a
    ring's worth more (frames left in a ring when the loop stopped)."""
    from tests.support.testpmd import TestPmd, virtio_user_vdev
    from tests.system.test_testpmd import GUEST_ERROR_COUNTERS, settle, switch_stats, wait_links

    host, peer = veth
    peer_mac = link_mac(netns, peer)
    ports = [{"name": "dpdk", "type": "vhost-user", "path": str(tmp_path / "dpdk.sock")},
             {"name": "xdp", "type": "af-xdp", "ifname": host}]
    with Vswitchd(tmp_path, ports=ports) as d:
        guest = TestPmd([virtio_user_vdev(0, tmp_path / "dpdk.sock", mac=DPDK_MAC)],
                        ["--forward-mode=mac", f"--eth-peer=0,{peer_mac}"],
                        main_lcore=1, log_path=tmp_path / "virtio-testpmd.log")
        nic = TestPmd([f"net_af_xdp0,iface={peer},start_queue=0,queue_count=1"],
                      ["--forward-mode=mac", f"--eth-peer=0,{DPDK_MAC}"],
                      main_lcore=0, log_path=tmp_path / "af-xdp-testpmd.log", eal_args=["--file-prefix=vsxdp"])
        # The AF_XDP PMD attaches to the namespace's end of the veth: it runs there.
        nic.argv = ["ip", "netns", "exec", netns, *nic.argv]
        with guest, nic:
            wait_links(d, ["dpdk", "xdp"])
            nic.start()
            guest.start(tx_first=2)
            time.sleep(3)
            guest.stop()
            nic.stop()
            sw = settle(lambda: switch_stats(d))
            g = settle(guest.port_stats)[0]
            n = settle(nic.port_stats)[0]
            print(f"switch: {sw}\nvirtio-user: {g}\naf_xdp: {n}\nAF_XDP queues: {d.port('xdp')['queue_stats']}")
            assert g["rx_packets"] > 1000 and n["rx_packets"] > 1000, (g, n)
            for counter in GUEST_ERROR_COUNTERS:
                assert g.get(counter, 0) == 0 and n.get(counter, 0) == 0, (counter, g, n)
            assert sw["dpdk"]["rx_packets"] == g["tx_packets"]
            assert sw["xdp"]["rx_packets"] == n["tx_packets"]
            assert g["rx_packets"] <= sw["dpdk"]["tx_packets"] <= g["rx_packets"] + 256
            assert n["rx_packets"] <= sw["xdp"]["tx_packets"] <= n["rx_packets"] + 2048
            for name in ("dpdk", "xdp"):
                assert sw[name]["rx_errors"] == sw[name]["tx_errors"] == 0, sw
            assert guest.quit() == 0 and nic.quit() == 0
