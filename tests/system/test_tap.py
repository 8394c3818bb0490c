"""TAP ports: a vswitchd with a TAP port whose interface sits in a network
namespace with an address, and a vhost-user port with a Python front-end.

They exchange ARP, ICMP and TCP both ways; learning and counters behave as
on vhost-user ports; TSO frames and partial checksums cross in both
directions (segmented in software for the front-end, which does not take
GSO); the port is removed and added again under traffic.

The link follows the interface: with three TAP ports, each in its own
namespace, one interface goes down and up, or moves into another namespace
(as container tools do), while the others ping on: the port reports the
link down and up again (events, `show`) and forwards again without any
action on the switch; only a deleted interface is gone.
"""

from __future__ import annotations

import itertools
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether

from tests.support.daemon import Vswitchd
from tests.support.frontend import DRIVER_FEATURES, VhostUserFrontend
from tests.support.netns import (Capture, EventStream, delete_namespace, in_ns, kport_open, kport_stats, kport_transmit,
                                 link_mac, marked_frame, namespaces, ping, ping_until, python_in_ns, sh, unique)
from tests.support.virtio_driver import NET_HDR
from vswitch.native import ffi, lib
from vswitch.vhost import protocol
from vswitch.vhost.protocol import bits

pytestmark = pytest.mark.system

NS_IP, GUEST_IP = "10.250.0.1", "10.250.0.2"
GUEST_MAC = "02:00:00:00:00:42"


@pytest.fixture
def switch(tmp_path, netns):
    """vswitchd with `guest` (vhost-user) and `tap0` (TAP in netns, 10.250.0.1/24)."""
    ifname = f"vst{netns.split('-')[-2][-5:]}{netns.split('-')[-1]}"[:15]
    ports = [{"name": "guest", "type": "vhost-user", "path": str(tmp_path / "guest.sock")},
             {"name": "tap0", "type": "tap", "ifname": ifname, "netns": netns}]
    with Vswitchd(tmp_path, ports=ports) as d:
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        in_ns(netns, "ip", "link", "set", "lo", "up")
        d.ifname, d.netns = ifname, netns
        yield d


def guest(d, features: int = DRIVER_FEATURES) -> VhostUserFrontend:
    fe = VhostUserFrontend(d.dir / "guest.sock", features=features)
    fe.connect()
    fe.handshake()
    fe.post_rx(0, 128)
    return fe


def rx(fe, timeout=0.2):
    """Frames received so far (waiting up to `timeout` for one); their buffers are posted again."""
    frames = fe.receive(0, 1, timeout=timeout)
    if frames:
        fe.post_rx(0, len(frames))
    return frames


def wait_for(fe, match, timeout=5.0):
    """Receives frames until one satisfies `match`; returns it (parsed)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for f in rx(fe):
            p = Ether(f.data)
            seen.append(p.summary())
            if match(p):
                return p, f
    raise AssertionError(f"no matching frame in {timeout} s; saw: {seen[-10:]}")


def arp_resolve(fe) -> str:
    fe.send_frame(0, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                           ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst=NS_IP)))
    p, _ = wait_for(fe, lambda p: ARP in p and p[ARP].op == 2 and p[ARP].psrc == NS_IP)
    return p[ARP].hwsrc


def checksums_valid(p) -> bool:
    q = Ether(bytes(p))
    for layer in (IP, TCP, ICMP):
        if layer in q:
            del q[layer].chksum
    return bytes(Ether(bytes(q))) == bytes(p)


def test_arp_and_ping_both_ways_learning_and_counters(switch):
    d = switch
    fe = guest(d)
    ns_mac = arp_resolve(fe)
    assert ns_mac == link_mac(d.netns, d.ifname)
    # Guest -> namespace: ICMP echo.
    fe.send_frame(0, bytes(Ether(src=GUEST_MAC, dst=ns_mac) / IP(src=GUEST_IP, dst=NS_IP) /
                           ICMP(id=7, seq=1) / b"hello"))
    p, _ = wait_for(fe, lambda p: ICMP in p and p[ICMP].type == 0 and p[ICMP].id == 7)
    assert checksums_valid(p)
    # Namespace -> guest: the kernel pings; the front-end answers.
    proc = python_in_ns(d.netns, "-c", "import subprocess,sys;sys.exit(subprocess.call("
                        f"['busybox','ping','-c','3','-W','2','{GUEST_IP}']))")
    answered = 0
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        for f in rx(fe, 0.1):
            q = Ether(f.data)
            if ARP in q and q[ARP].op == 1 and q[ARP].pdst == GUEST_IP:
                fe.send_frame(0, bytes(Ether(src=GUEST_MAC, dst=q.src) /
                                       ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST_IP, hwdst=q.src, pdst=q[ARP].psrc)))
            elif ICMP in q and q[ICMP].type == 8:
                assert checksums_valid(q)
                reply = Ether(src=GUEST_MAC, dst=q.src) / IP(src=GUEST_IP, dst=q[IP].src) / \
                    ICMP(type=0, id=q[ICMP].id, seq=q[ICMP].seq) / bytes(q[ICMP].payload)
                fe.send_frame(0, bytes(reply))
                answered += 1
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, f"ping from the namespace failed: {out} {err}"
    assert answered >= 3
    fdb = {e["mac"]: e["port"] for e in d.ctl("fdb", "show")["entries"]}
    assert fdb[GUEST_MAC] == "guest" and fdb[ns_mac] == "tap0"
    tap = d.port("tap0")
    assert tap["type"] == "tap" and tap["link"] == "up" and tap["ifname"] == d.ifname
    s = tap["stats"]
    assert s["rx_packets"] >= 5 and s["tx_packets"] >= 5 and s["rx_bytes"] > 0 and s["tx_bytes"] > 0
    assert s["rx_errors"] == s["tx_errors"] == 0
    human = d.ctl_raw("show").stdout
    assert "tap0" in human and "tap" in human
    fe.close()


def gso_header(frame_pkt, mss: int) -> bytes:
    """A virtio-net header (12 bytes) for a TCP/IPv4 frame with TSO and a partial checksum."""
    l4 = len(frame_pkt) - len(frame_pkt[TCP])
    hdr_len = l4 + len(frame_pkt[TCP]) - len(frame_pkt[TCP].payload)
    return NET_HDR.pack(1, 1, hdr_len, mss, l4, 16) + b"\0\0"


def pseudo_partial(p) -> bytes:
    """The frame with the TCP checksum field holding only the pseudo-header sum."""
    raw = bytearray(bytes(p))
    ip = p[IP]
    tcp_len = len(p[TCP])
    words = bytes(ip)[12:20] + bytes([0, 6]) + tcp_len.to_bytes(2, "big")
    s = sum(int.from_bytes(words[i:i + 2], "big") for i in range(0, len(words), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    off = len(raw) - tcp_len + 16
    raw[off:off + 2] = s.to_bytes(2, "big")
    return bytes(raw)


NS_SERVER = r"""
import hashlib, socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 5001)); ls.listen(1); ls.settimeout(20)
print("listening", flush=True)
c, _ = ls.accept(); c.settimeout(20)
data = b""
while len(data) < int(sys.argv[1]):
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
c.sendall(bytes(range(256)) * 40)   # 10240 bytes: TSO frames from the kernel
c.recv(1)
"""


def test_tso_both_ways_between_guest_and_tap(switch):
    """The guest sends a 4000-byte TSO frame with a partial checksum: the
    namespace's TCP stack takes it (so its checksums are right).  The
    namespace answers with 10240 bytes, which its kernel hands the TAP as
    TSO frames: the front-end, which did not negotiate GUEST_TSO4, gets them
    cut into MSS-sized frames with valid checksums."""
    d = switch
    features = DRIVER_FEATURES | bits(protocol.VIRTIO_NET_F_CSUM, protocol.VIRTIO_NET_F_HOST_TSO4)
    fe = guest(d, features)
    assert fe.features & bits(protocol.VIRTIO_NET_F_HOST_TSO4)
    payload = bytes((i * 13) & 0xFF for i in range(4000))
    server = python_in_ns(d.netns, "-c", NS_SERVER, str(len(payload)))
    try:
        assert server.stdout.readline().strip() == "listening"
        ns_mac = arp_resolve(fe)
        eth = Ether(src=GUEST_MAC, dst=ns_mac) / IP(src=GUEST_IP, dst=NS_IP)
        fe.send_frame(0, bytes(eth / TCP(sport=40000, dport=5001, flags="S", seq=1000,
                                         options=[("MSS", 1460)])))
        synack, _ = wait_for(fe, lambda p: TCP in p and p[TCP].flags == "SA")
        ack = synack[TCP].seq + 1
        fe.send_frame(0, bytes(eth / TCP(sport=40000, dport=5001, flags="A", seq=1001, ack=ack)))
        big = eth / TCP(sport=40000, dport=5001, flags="PA", seq=1001, ack=ack, window=65535) / payload
        fe.send_frame(0, pseudo_partial(big), header=gso_header(big, 1448))
        line = server.stdout.readline().split()
        assert line == [str(len(payload)), __import__("hashlib").sha256(payload).hexdigest()], \
            f"namespace got {line}; stderr: {server.stderr.read() if server.poll() is not None else ''}"
        # The answer: 10240 bytes in MSS-sized, checksum-valid frames.
        got, frames = b"", 0
        deadline = time.monotonic() + 10
        while len(got) < 10240 and time.monotonic() < deadline:
            for f in rx(fe):
                p = Ether(f.data)
                if TCP in p and p[TCP].sport == 5001 and len(p[TCP].payload):
                    assert len(f.data) <= 1514, f"a {len(f.data)}-byte frame reached a guest without TSO"
                    assert f.header[:2] == b"\0\0", "a GSO/checksum header for a guest that did not negotiate it"
                    assert checksums_valid(p)
                    got += bytes(p[TCP].payload)
                    frames += 1
        assert got == bytes(range(256)) * 40
        assert frames >= 8
    finally:
        server.kill()
        server.communicate()
        fe.close()


def test_remove_and_readd_tap_under_traffic(switch):
    """The TAP port goes away (its interface with it) and comes back while the
    guest keeps sending broadcasts; nothing crashes, the interface returns."""
    d = switch
    fe = guest(d)
    ifname, netns = d.ifname, d.netns
    counter = itertools.count()
    for round_ in range(3):
        for _ in range(50):
            fe.send_frame(0, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                                   ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst=f"10.250.0.{100 + next(counter) % 50}")))
        d.ctl("del-port", "tap0")
        assert sh("ip", "-n", netns, "link", "show", ifname, check=False).returncode != 0, "interface not deleted"
        fe.send_frame(0, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=NS_IP)))
        d.ctl("add-port", "tap0", "--type", "tap", "--ifname", ifname, "--netns", netns)
        assert sh("ip", "-n", netns, "link", "show", ifname).returncode == 0
    in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
    assert arp_resolve(fe) == link_mac(netns, ifname)
    assert d.proc.poll() is None
    fe.close()


def test_bad_tap_requests_are_one_line_errors(switch):
    d = switch
    r = d.ctl_raw("add-port", "t2", "--type", "tap", "--netns", "no-such-ns-xyz")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "no network namespace named 'no-such-ns-xyz'" in r.stderr
    r = d.ctl_raw("add-port", "t3", "--type", "tap", "--ifname", "bad name!")
    assert r.returncode != 0 and "port 't3': ifname" in r.stderr
    r = d.ctl_raw("add-port", "t4", "--type", "tap", "--ifname", d.ifname, "--netns", d.netns)
    assert r.returncode != 0 and f"interface {d.ifname} is already attached by port 'tap0'" in r.stderr
    assert [p["name"] for p in d.ctl("list-ports")["ports"]] == ["guest", "tap0"]


def test_idle_with_a_tap_port_sleeps_and_wakes_on_a_frame(switch):
    """The PMD sleeps on the TAP's fd too: an idle switch costs under 2% of a core."""
    import psutil
    fe = guest(switch)
    proc = psutil.Process(switch.proc.pid)
    time.sleep(1)
    proc.cpu_percent(None)
    time.sleep(10)
    cpu = proc.cpu_percent(None)
    print(f"vswitchd idle with a TAP and a vhost-user port: {cpu:.2f}% of one core")
    assert cpu < 2.0
    sleeps = switch.ctl("pmd-stats")["pmds"][0]["sleeps"]
    # A frame from the kernel side wakes it: the namespace asks for the guest's address.
    in_ns(switch.netns, "busybox", "arping", "-c", "1", "-w", "1", "-I", switch.ifname, GUEST_IP, check=False)
    frame, _ = wait_for(fe, lambda p: p.haslayer(ARP) and p[ARP].pdst == GUEST_IP, timeout=2)
    assert switch.ctl("pmd-stats")["pmds"][0]["sleeps"] > sleeps
    fe.close()


# Three TAP ports, a, b and c, each in its own namespace with one address.
TAP_IPS = {"a": "10.250.3.1", "b": "10.250.3.2", "c": "10.250.3.3"}
_tap_ids = itertools.count()


@pytest.fixture
def three_taps(tmp_path, netns):
    """vswitchd with TAP ports a, b, c; d.ns[name] is the namespace, d.ifname[name] the interface."""
    with namespaces(2) as (ns_b, ns_c):
        n = next(_tap_ids)
        ns = {"a": netns, "b": ns_b, "c": ns_c}
        ifname = {name: unique(f"vt{name}", n) for name in ns}
        ports = [{"name": name, "type": "tap", "ifname": ifname[name], "netns": ns[name]} for name in ns]
        with Vswitchd(tmp_path, ports=ports) as d:
            for name in ns:
                in_ns(ns[name], "ip", "addr", "add", f"{TAP_IPS[name]}/24", "dev", ifname[name])
            d.ns, d.ifname = ns, ifname
            # Every namespace reaches every other through the switch.
            ping_until(ns["b"], TAP_IPS["a"])
            ping_until(ns["b"], TAP_IPS["c"])
            yield d


def wait_port(d, name, match, timeout=10.0) -> dict:
    """`show NAME` once it satisfies `match`; raises with the last one after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        info = d.port(name)
        if match(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"port {name} never matched in {timeout} s: {info}")
        time.sleep(0.05)


def test_tap_down_up_resumes_forwarding(three_taps):
    """`ip link set a down; ... up`: pings to a fail while it is down and are
    dropped and counted (not a fault); the link goes down and comes back up
    (events, show); pings succeed again without any action on the switch,
    and b <-> c never notice.  Three rounds, to see it is no one-off."""
    d = three_taps
    ns, ifname = d.ns, d.ifname
    latencies = []
    with EventStream(d) as events:
        since = 0.0
        for round_ in range(3):
            sh("ip", "-n", ns["a"], "link", "set", ifname["a"], "down")
            down = events.wait_link("a", "down", after=since)
            info = wait_port(d, "a", lambda p: p["link"] == "down")
            assert info["link_reason"] == f"interface {ifname['a']} is down", info
            dropped = info["stats"]["tx_dropped"]
            assert not ping(ns["b"], TAP_IPS["a"], count=2), "a answered while its interface was down"
            assert ping(ns["b"], TAP_IPS["c"]), "b could not reach c while a was down"
            info = d.port("a")
            assert info["link"] == "down" and info["stats"]["tx_dropped"] > dropped, info
            assert info["stats"]["tx_errors"] == 0, info
            before_up = time.time()
            sh("ip", "-n", ns["a"], "link", "set", ifname["a"], "up")
            up = events.wait_link("a", "up", after=down["time"])
            latencies.append(up["time"] - before_up)
            since = up["time"]
            assert "link_reason" not in d.port("a")
            ping_until(ns["b"], TAP_IPS["a"])
            assert ping(ns["c"], TAP_IPS["a"])
        states = [e["state"] for e in events.links("a")]
        assert states == ["down", "up"] * 3, events.links("a")
        assert not events.links("b") and not events.links("c"), events.events
    print(f"link up seen {', '.join(f'{s * 1000:.0f}' for s in latencies)} ms after `ip link set up`")
    assert sorted(latencies)[1] < 0.5 and max(latencies) < 2.0, latencies
    assert "is gone" not in d.log()
    assert all(d.port(name)["link"] == "up" for name in ("a", "b", "c"))


def test_tap_moved_into_another_namespace_keeps_working(three_taps):
    """A container tool's sequence: the TAP moves into the container's
    namespace (going down on the way) and is brought up there with an
    address.  The port follows it: link down, then up; the container's
    namespace pings b through the switch; down and up inside that namespace
    are seen too, and so is a second move, from there into a namespace the
    switch hears no link notifications from; when that namespace is deleted
    (and the TAP with it) the port reports the interface gone.  b <-> c
    never notice."""
    d = three_taps
    ns, ifname = d.ns, d.ifname
    with namespaces(2) as (container, elsewhere), EventStream(d) as events:
        sh("ip", "-n", ns["a"], "link", "set", ifname["a"], "netns", container)
        down = events.wait_link("a", "down")
        # Frames for a meet an interface that is down, in a namespace the switch never opened.
        assert not ping(ns["b"], TAP_IPS["a"], count=2)
        in_ns(container, "ip", "addr", "add", f"{TAP_IPS['a']}/24", "dev", ifname["a"])
        before_up = time.time()
        in_ns(container, "ip", "link", "set", ifname["a"], "up")
        up = events.wait_link("a", "up", after=down["time"])
        print(f"link up seen {(up['time'] - before_up) * 1000:.0f} ms after `ip link set up` in the new namespace")
        ping_until(container, TAP_IPS["b"])
        assert ping(ns["b"], TAP_IPS["a"]) and ping(ns["c"], TAP_IPS["a"])
        assert d.port("a")["link"] == "up"

        # Down and up where the interface lives now.
        in_ns(container, "ip", "link", "set", ifname["a"], "down")
        down = events.wait_link("a", "down", after=up["time"])
        assert wait_port(d, "a", lambda p: p["link"] == "down")["link_reason"] == f"interface {ifname['a']} is down"
        assert not ping(container, TAP_IPS["b"], count=2)
        in_ns(container, "ip", "link", "set", ifname["a"], "up")
        up = events.wait_link("a", "up", after=down["time"])
        ping_until(container, TAP_IPS["b"])
        assert ping(ns["b"], TAP_IPS["c"])

        # Moved on from the container, and renamed as container tools do: the kernel gives
        # `elsewhere` an id in the container's namespace, not in the switch's, so only the
        # TAP's fd tells when it comes up there.
        in_ns(container, "ip", "link", "set", ifname["a"], "netns", elsewhere, "name", "eth0")
        down = events.wait_link("a", "down", after=up["time"])
        in_ns(elsewhere, "ip", "addr", "add", f"{TAP_IPS['a']}/24", "dev", "eth0")
        before_up = time.time()
        in_ns(elsewhere, "ip", "link", "set", "eth0", "up")
        up = events.wait_link("a", "up", after=down["time"])
        latency = up["time"] - before_up
        print(f"link up seen {latency * 1000:.0f} ms after `ip link set up` after a second move")
        assert latency < 0.5, "not woken by the TAP's fd: waited for housekeeping?"
        ping_until(elsewhere, TAP_IPS["b"])

        # Its namespace goes away, and the TAP with it: now the interface is gone.
        delete_namespace(elsewhere)
        events.wait_link("a", "down", after=up["time"], timeout=20)
        info = wait_port(d, "a", lambda p: "gone" in p.get("link_reason", ""))
        assert info["link_reason"].startswith(f"interface {ifname['a']} is gone"), info
        assert ping(ns["b"], TAP_IPS["c"])
        assert [e["state"] for e in events.links("a")] == ["down", "up"] * 3 + ["down"], events.links("a")
        assert not events.links("b") and not events.links("c"), events.events
    assert "is gone" in d.log()
    assert d.proc.poll() is None


def test_writes_to_a_down_tap_are_dropped_not_a_fault(netns):
    """The transmit path by itself, as a PMD meets an interface that went
    down before the control plane noticed: the tun driver refuses the write
    with EIO; the frames are dropped and counted, the port is not marked
    gone, and once the TAP is up the next frames go through.  Only a
    deleted TAP is gone."""
    ifname = unique("vtw", next(_tap_ids))
    kp = ffi.new("struct vs_kport *")
    lib.vs_kport_init(kp)
    assert kport_open(lambda fd: lib.vs_kport_open_tap(kp, ifname.encode(), 1, fd, 1), netns) == 0
    try:
        sh("ip", "-n", netns, "link", "set", ifname, "down")
        assert lib.vs_kport_link_state(kp) == 0
        kport_transmit(kp, [marked_frame(f"down{i}") for i in range(3)])
        assert kport_stats(kp) == {"tx_packets": 0, "tx_dropped": 3, "tx_errors": 0,
                                   "rx_packets": 0, "rx_errors": 0, "fault": 0}
        sh("ip", "-n", netns, "link", "set", ifname, "up")
        assert lib.vs_kport_link_state(kp) == 1
        capture = Capture(netns, ifname)
        kport_transmit(kp, [marked_frame(f"up{i}") for i in range(3)] + [marked_frame("end")])
        assert capture.result() == ["up0", "up1", "up2"]
        stats = kport_stats(kp)
        assert stats["tx_packets"] == 4 and stats["tx_dropped"] == 3 and stats["fault"] == 0, stats
        sh("ip", "-n", netns, "link", "del", ifname)
        kport_transmit(kp, [marked_frame("gone")])
        assert kp.fault == lib.VS_KPORT_GONE and lib.vs_kport_link_state(kp) < 0
    finally:
        lib.vs_kport_close(kp)
