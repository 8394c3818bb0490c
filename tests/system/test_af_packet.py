"""AF_PACKET ports: a veth pair, one end in a test namespace with an address,
the other attached to vswitchd next to two vhost-user Python front-ends.

Frames cross both ways, broadcast floods and learning behave as on
vhost-user ports, the interface is promiscuous only while attached, and an
interface that goes down or is deleted under the switch gives a link-down
event while the other ports keep forwarding.  An interface that goes down
and comes back up resumes forwarding at once, with no action on the switch;
one that moves into another namespace is gone for the switch's socket (the
kernel unbinds it), as is a deleted one.

test_namespace_pings_dpdk_virtio_user puts a real DPDK guest on the other
side instead: dpdk-testpmd with one net_virtio_user port on a vhost-user port
of the switch, in icmpecho mode (it answers every ARP request with its port's
MAC and every ICMP echo request by swapping addresses; see DPDK's
app/test-pmd/icmpecho.c). The namespace resolves and pings an address on it.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from tests.support.daemon import Vswitchd
from tests.support.frontend import VhostUserFrontend
from tests.support.netns import (Capture, EventStream, in_ns, kport_open, kport_stats, kport_transmit, link_mac,
                                 marked_frame, namespaces, sh, unique)
from tests.support.testpmd import TestPmd, virtio_user_vdev
from tests.system.test_testpmd import GUEST_ERROR_COUNTERS, SWITCH_ERROR_COUNTERS, settle, switch_stats, wait_links
from vswitch.native import ffi, lib

pytestmark = pytest.mark.system

NS_IP = "10.250.1.1"
G1 = ("02:00:00:00:01:01", "10.250.1.2")
G2 = ("02:00:00:00:01:02", "10.250.1.3")
_ids = itertools.count()


@pytest.fixture
def veth(netns):
    """(host end, namespace end); the namespace end has 10.250.1.1/24."""
    n = next(_ids)
    host, peer = unique("vsa", n), unique("vsb", n)
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
    try:
        sh("ip", "link", "set", peer, "netns", netns)
        sh("ip", "link", "set", host, "up")
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", peer)
        in_ns(netns, "ip", "link", "set", peer, "up")
        yield host, peer
    finally:
        sh("ip", "link", "del", host, check=False)


@pytest.fixture
def switch(tmp_path, veth, netns):
    host, peer = veth
    ports = [{"name": "g1", "type": "vhost-user", "path": str(tmp_path / "g1.sock")},
             {"name": "g2", "type": "vhost-user", "path": str(tmp_path / "g2.sock")},
             {"name": "veth", "type": "af-packet", "ifname": host}]
    with Vswitchd(tmp_path, ports=ports) as d:
        d.host, d.peer, d.netns = host, peer, netns
        d.fe = {}
        for name in ("g1", "g2"):
            fe = VhostUserFrontend(tmp_path / f"{name}.sock")
            fe.connect()
            fe.handshake()
            fe.post_rx(0, 128)
            d.fe[name] = fe
        yield d
        for fe in d.fe.values():
            fe.close()


def rx(fe, timeout=0.2):
    frames = fe.receive(0, 1, timeout=timeout)
    if frames:
        fe.post_rx(0, len(frames))
    return [Ether(f.data) for f in frames]


def drain(fe, seconds=0.3):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rx(fe, 0.05)


def arp_request(mac, ip, target):
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=ip, pdst=target))


def wait_for(fe, match, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in rx(fe):
            if match(p):
                return p
    raise AssertionError("no matching frame")


def promiscuity(ifname: str) -> int:
    out = sh("ip", "-d", "link", "show", ifname).stdout.split()
    return int(out[out.index("promiscuity") + 1])


def test_frames_both_ways_broadcast_and_learning(switch):
    d = switch
    g1, g2 = d.fe["g1"], d.fe["g2"]
    ns_mac = link_mac(d.netns, d.peer)
    # g1 broadcasts an ARP request: g2 and the namespace get it; the namespace answers g1 only.
    g1.send_frame(0, arp_request(G1[0], G1[1], NS_IP))
    reply = wait_for(g1, lambda p: ARP in p and p[ARP].op == 2)
    assert reply[ARP].hwsrc == ns_mac and reply.dst == G1[0]
    assert wait_for(g2, lambda p: ARP in p and p[ARP].op == 1 and p.src == G1[0])
    # The reply was unicast to a learned MAC: g2 must not see it.
    drain(g2)
    # g1 pings the namespace.
    g1.send_frame(0, bytes(Ether(src=G1[0], dst=ns_mac) / IP(src=G1[1], dst=NS_IP) / ICMP(id=3) / (b"x" * 64)))
    echo = wait_for(g1, lambda p: ICMP in p and p[ICMP].type == 0)
    assert echo[IP].src == NS_IP
    assert not [p for p in rx(g2, 0.3) if ICMP in p]
    fdb = {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}
    assert fdb[ns_mac] == "veth" and fdb[G1[0]] == "g1"
    # The namespace's broadcast (an ARP request for g2) reaches both guests.
    sh("ip", "netns", "exec", d.netns, "busybox", "arping", "-I", d.peer, "-c", "1", "-w", "1", G2[1], check=False)
    assert wait_for(g2, lambda p: ARP in p and p.src == ns_mac and p[ARP].pdst == G2[1])
    assert wait_for(g1, lambda p: ARP in p and p.src == ns_mac and p[ARP].pdst == G2[1])
    port = d.port("veth")
    assert port["type"] == "af-packet" and port["link"] == "up" and port["ifname"] == d.host
    s = port["stats"]
    assert s["rx_packets"] >= 2 and s["tx_packets"] >= 2 and s["rx_errors"] == s["tx_errors"] == 0


def test_promiscuous_only_while_attached(switch):
    d = switch
    assert promiscuity(d.host) == 1
    d.ctl("del-port", "veth")
    assert promiscuity(d.host) == 0
    d.ctl("add-port", "veth", "--type", "af-packet", "--ifname", d.host)
    assert promiscuity(d.host) == 1


def wait_link(d, name, state, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.port(name)["link"] == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"port {name} link not {state} after {timeout} s: {d.port(name)}")


def test_interface_down_then_deleted_under_the_switch(switch):
    d = switch
    g1, g2 = d.fe["g1"], d.fe["g2"]
    sh("ip", "link", "set", d.host, "down")
    wait_link(d, "veth", "down")
    sh("ip", "link", "set", d.host, "up")
    wait_link(d, "veth", "up")
    sh("ip", "link", "del", d.host)
    wait_link(d, "veth", "down")
    info = d.port("veth")
    assert "gone" in info.get("link_reason", "")
    # The other ports keep forwarding; frames for the dead port are dropped, counted.
    for _ in range(20):
        g1.send_frame(0, arp_request(G1[0], G1[1], G2[1]))
    got = 0
    deadline = time.monotonic() + 5
    while got < 20 and time.monotonic() < deadline:
        got += len([p for p in rx(g2) if ARP in p and p.src == G1[0]])
    assert got == 20
    assert d.proc.poll() is None
    assert "is gone" in d.log() and "link state=down" in d.log()
    d.ctl("del-port", "veth")


def ping_ns_from(fe, mac, ip, ns_mac, ident, timeout):
    """The front-end sends ICMP echo requests to the namespace until one is answered (True) or
    `timeout` s pass (False), answering the namespace's ARP requests on the way."""
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        fe.send_frame(0, bytes(Ether(src=mac, dst=ns_mac) / IP(src=ip, dst=NS_IP) / ICMP(id=ident, seq=seq)))
        for p in rx(fe, 0.2):
            if ICMP in p and p[ICMP].type == 0 and p[ICMP].id == ident:
                return True
            if ARP in p and p[ARP].op == 1 and p[ARP].pdst == ip:   # the namespace asks where we are
                fe.send_frame(0, bytes(Ether(src=mac, dst=p.src) /
                                       ARP(op=2, hwsrc=mac, psrc=ip, hwdst=p.src, pdst=p[ARP].psrc)))
    return False


def g1_to_g2_all_delivered(d, count=20) -> None:
    g1, g2 = d.fe["g1"], d.fe["g2"]
    drain(g2, 0.1)
    for i in range(count):
        g1.send_frame(0, bytes(Ether(src=G1[0], dst=G2[0]) / IP(src=G1[1], dst=G2[1]) / ICMP(id=99, seq=i)))
    got = 0
    deadline = time.monotonic() + 5
    while got < count and time.monotonic() < deadline:
        got += len([p for p in rx(g2) if ICMP in p and p[ICMP].id == 99])
    assert got == count, f"g2 got {got} of {count} frames from g1"


def test_interface_down_up_resumes_forwarding(switch):
    """The host end goes down while g1 pings the namespace: the pings go
    unanswered, the frames are dropped and counted (no fault), the link goes
    down; the host end comes back up and the pings are answered again at
    once, with no action on the switch.  g1 <-> g2 never notice.  Three
    rounds."""
    d = switch
    g1 = d.fe["g1"]
    ns_mac = link_mac(d.netns, d.peer)
    d.fe["g2"].send_frame(0, arp_request(G2[0], G2[1], G1[1]))   # the switch learns where g2 is
    assert ping_ns_from(g1, G1[0], G1[1], ns_mac, 1, 5)
    latencies = []
    with EventStream(d) as events:
        since = 0.0
        for round_ in range(3):
            sh("ip", "link", "set", d.host, "down")
            assert not ping_ns_from(g1, G1[0], G1[1], ns_mac, 10 + round_, 1.0)
            down = events.wait_link("veth", "down", after=since)
            info = wait_link_info(d, "veth", "down")
            assert info["link_reason"] == f"interface {d.host} is down", info
            dropped = info["stats"]["tx_dropped"]
            assert not ping_ns_from(g1, G1[0], G1[1], ns_mac, 20 + round_, 0.5)
            info = d.port("veth")
            assert info["stats"]["tx_dropped"] > dropped, info
            g1_to_g2_all_delivered(d)
            before_up = time.time()
            sh("ip", "link", "set", d.host, "up")
            up = events.wait_link("veth", "up", after=down["time"])
            latencies.append(up["time"] - before_up)
            since = up["time"]
            assert ping_ns_from(g1, G1[0], G1[1], ns_mac, 30 + round_, 5), f"no answer after up: {d.port('veth')}"
            assert "link_reason" not in d.port("veth")
        assert [e["state"] for e in events.links("veth")] == ["down", "up"] * 3, events.links("veth")
        assert not events.links("g1") and not events.links("g2")
    print(f"link up seen {', '.join(f'{s * 1000:.0f}' for s in latencies)} ms after `ip link set up`")
    assert sorted(latencies)[1] < 0.5 and max(latencies) < 2.0, latencies
    assert "is gone" not in d.log()
    assert d.port("veth")["stats"]["tx_errors"] == 0


def test_interface_moved_to_another_namespace_is_gone(switch):
    """The kernel unbinds a packet socket from an interface that leaves the
    socket's namespace, so for the switch a moved interface is gone (unlike
    a TAP, whose fd follows it): the port says so, and g1 <-> g2 go on."""
    d = switch
    with namespaces(1) as (elsewhere,), EventStream(d) as events:
        sh("ip", "link", "set", d.host, "netns", elsewhere)
        events.wait_link("veth", "down")
        info = wait_link_info(d, "veth", "down")
        assert info["link_reason"] == f"interface {d.host} is gone (deleted or moved to another network namespace)", info
        g1_to_g2_all_delivered(d)
        # Back home it is still gone for this socket: the port must be added again.
        sh("ip", "-n", elsewhere, "link", "set", d.host, "netns", str(os.getpid()))
        time.sleep(0.5)
        assert d.port("veth")["link"] == "down"
    d.ctl("del-port", "veth")
    d.ctl("add-port", "veth", "--type", "af-packet", "--ifname", d.host)
    sh("ip", "link", "set", d.host, "up")
    wait_link(d, "veth", "up")


def wait_link_info(d, name, state, timeout=10.0) -> dict:
    wait_link(d, name, state, timeout)
    return d.port(name)


def test_sends_to_a_down_interface_are_dropped_not_a_fault(veth, netns):
    """The transmit path by itself, as a PMD meets an interface that went
    down before the control plane noticed: the kick fails with ENETDOWN,
    now and (the socket keeps the error pending) once more after the
    interface is up again.  Each time the burst is taken back out of the TX
    ring and counted as dropped, not a fault; then frames go through, and
    none of the dropped ones ever reach the wire late."""
    host, peer = veth
    kp = ffi.new("struct vs_kport *")
    lib.vs_kport_init(kp)
    assert kport_open(lambda fd: lib.vs_kport_open_af_packet(kp, host.encode(), fd, 1)) == 0
    try:
        capture = Capture(netns, peer)
        sh("ip", "link", "set", host, "down")
        kport_transmit(kp, [marked_frame(f"down{i}") for i in range(3)])
        assert kport_stats(kp) == {"tx_packets": 0, "tx_dropped": 3, "tx_errors": 0,
                                   "rx_packets": 0, "rx_errors": 0, "fault": 0}
        sh("ip", "link", "set", host, "up")
        time.sleep(0.2)   # the carrier comes up asynchronously
        kport_transmit(kp, [marked_frame(f"stale{i}") for i in range(3)])   # meets the pending error
        assert kport_stats(kp)["tx_dropped"] == 6 and kp.fault == 0, kport_stats(kp)
        for i in range(3):   # more frames than the TX ring has slots, so it wraps around
            kport_transmit(kp, [marked_frame(f"up{i}.{j}") for j in range(30)])
            time.sleep(0.1)   # the kernel frees the slots once the peer has taken the frames
        kport_transmit(kp, [marked_frame("end")])
        assert capture.result() == [f"up{i}.{j}" for i in range(3) for j in range(30)]
        stats = kport_stats(kp)
        assert stats["tx_packets"] == 91 and stats["tx_dropped"] == 6 and stats["tx_errors"] == 0, stats
        assert lib.vs_kport_link_state(kp) == 1
        sh("ip", "link", "del", host)
        assert lib.vs_kport_link_state(kp) < 0 and kp.fault == lib.VS_KPORT_GONE
    finally:
        lib.vs_kport_close(kp)


def test_missing_and_already_attached_interfaces_are_refused(switch):
    d = switch
    r = d.ctl_raw("add-port", "p2", "--type", "af-packet", "--ifname", "vsnosuchif0")
    assert r.returncode != 0 and r.stderr.strip() == "vswitchctl: port 'p2': interface vsnosuchif0 does not exist"
    r = d.ctl_raw("add-port", "p3", "--type", "af-packet", "--ifname", d.host)
    assert r.returncode != 0 and f"port 'p3': interface {d.host} is already attached by port 'veth'" in r.stderr
    r = d.ctl_raw("add-port", "p4", "--type", "af-packet")
    assert r.returncode != 0 and "port 'p4': ifname: required" in r.stderr
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["g1", "g2", "veth"]


def test_remove_and_readd_under_traffic(switch):
    d = switch
    g1 = d.fe["g1"]
    for _ in range(5):
        for _ in range(30):
            g1.send_frame(0, arp_request(G1[0], G1[1], NS_IP))
        d.ctl("del-port", "veth")
        g1.send_frame(0, arp_request(G1[0], G1[1], NS_IP))
        d.ctl("add-port", "veth", "--type", "af-packet", "--ifname", d.host)
    drain(g1)
    g1.send_frame(0, arp_request(G1[0], G1[1], NS_IP))
    try:
        assert wait_for(g1, lambda p: ARP in p and p[ARP].op == 2 and p[ARP].psrc == NS_IP)
    except AssertionError:
        ring = g1.tx_ring(0)
        raise AssertionError(f"no ARP reply after re-adding the port: g1 tx avail idx in memory "
                             f"{ring.mem.read_u16(ring.avail_gpa + 2)}, driver's {ring.avail_idx}, "
                             f"{d.port('g1')['queue_stats']}\n{d.log()[-3000:]}") from None
    assert d.proc.poll() is None


# testpmd answers for any address; this one is in the namespace's subnet.
TESTPMD_MAC, TESTPMD_IP = "02:00:00:00:01:09", "10.250.1.9"
PINGS = 5


def ping_ns(netns: str, ip: str, count: int) -> str:
    """busybox ping from the namespace (iputils ping is not installed everywhere); its output."""
    return in_ns(netns, "busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "2", ip, check=False).stdout


@pytest.mark.dpdk
def test_namespace_pings_dpdk_virtio_user(tmp_path, veth, netns):
    host, peer = veth
    ns_mac = link_mac(netns, peer)
    # No IPv6 chatter (router solicitations, MLD) in the namespace: the counters below count ARP and ICMP only.
    in_ns(netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    ports = [{"name": "dpdk", "type": "vhost-user", "path": str(tmp_path / "dpdk.sock")},
             {"name": "veth", "type": "af-packet", "ifname": host}]
    with Vswitchd(tmp_path, ports=ports) as d:
        guest = TestPmd([virtio_user_vdev(0, tmp_path / "dpdk.sock", mac=TESTPMD_MAC)],
                        ["--forward-mode=icmpecho", "--port-topology=loop"],
                        main_lcore=1, log_path=tmp_path / "testpmd.log")
        with guest:
            wait_links(d, ["dpdk", "veth"])
            guest.start()
            guest.clear_port_stats()
            before = switch_stats(d)

            # Broadcast: the namespace's ARP request floods to the DPDK port, whose reply comes back unicast.
            in_ns(netns, "ip", "neigh", "flush", "dev", peer)
            arping = in_ns(netns, "busybox", "arping", "-I", peer, "-c", "1", "-w", "3", TESTPMD_IP, check=False)
            assert arping.returncode == 0 and TESTPMD_MAC.upper() in arping.stdout.upper(), arping.stdout
            # ICMP both ways: every echo request answered.
            out = ping_ns(netns, TESTPMD_IP, PINGS)
            assert f"{PINGS} packets transmitted, {PINGS} packets received, 0% packet loss" in out, out

            # Learning: each MAC on the port it came from.
            fdb = {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}
            assert fdb.get(ns_mac) == "veth" and fdb.get(TESTPMD_MAC) == "dpdk", fdb

            after = settle(lambda: switch_stats(d))
            nic = settle(guest.port_stats)[0]
            sw = {name: {k: v - before[name].get(k, 0) for k, v in counters.items()}
                  for name, counters in after.items()}
            print(f"switch deltas: {sw}\ntestpmd port 0: {nic}")
            for name in ("veth", "dpdk"):
                for counter in SWITCH_ERROR_COUNTERS:
                    assert sw[name][counter] == 0, f"vswitchd port {name} {counter}: {sw[name]}"
            for counter in GUEST_ERROR_COUNTERS:
                assert nic.get(counter, 0) == 0, f"testpmd {counter}: {nic}"
            # At least the ARP request and the echo requests came in from the namespace
            # (the kernel may add a unicast ARP probe or two), and all of it reached testpmd.
            assert PINGS + 1 <= sw["veth"]["rx_packets"] <= PINGS + 5, sw
            assert sw["veth"]["rx_packets"] == sw["dpdk"]["tx_packets"] == nic["rx_packets"], (sw, nic)
            # Everything testpmd answered went back to the namespace.
            assert nic["tx_packets"] >= PINGS + 1, nic
            assert nic["tx_packets"] == sw["dpdk"]["rx_packets"] == sw["veth"]["tx_packets"], (sw, nic)
            assert guest.quit() == 0
