"""Jumbo frames end to end, and frames too long for where they go.

A port's MTU (the `mtu` key, the front-end's VHOST_USER_NET_SET_MTU, a
kernel interface's own) bounds the frames it is sent: MTU + 18 bytes (the
Ethernet header and one VLAN tag).  A longer frame is dropped and counted
(`tx_dropped_mtu`), never truncated; so is a frame larger than a guest's
receive buffers (`tx_dropped_too_big`: one buffer without mergeable
buffers).

Real peers: DPDK testpmd on net_virtio_user (a 9014-byte frame needs
`--mbuf-size=10240 --max-pkt-len=9018` on the guest: one mbuf holds a whole
frame, so mrg_rxbuf=0 works too), and a namespace pinging testpmd's
icmpecho mode with busybox `ping -s 8972` (a 9000-byte IP packet) across a
TAP or an AF_PACKET port with MTU 9000.  The refusals are shown with
in-process front-ends (tests/support/frontend.py), which send any frame.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.frontend import RequestFailed, VhostUserFrontend
from tests.support.netns import in_ns, sh, unique
from tests.support.testpmd import TestPmd, virtio_user_vdev
from tests.system.test_testpmd import (GUEST_ERROR_COUNTERS, MAC0, MAC1, QUEUE_SIZE, SWITCH_ERROR_COUNTERS,
                                       check_backend_counters, check_guest, guest_args, run_loop, settle,
                                       switch_stats, wait_links)
from vswitch.vhost import protocol
from vswitch.vhost.protocol import Request, bits

pytestmark = pytest.mark.system

JUMBO_MTU = 9000
JUMBO_FRAME = JUMBO_MTU + 14            # Ethernet header + a 9000-byte IP packet
# testpmd: mbufs that hold a whole jumbo frame, and a port MTU that admits it.
JUMBO_ARGS = ["--mbuf-size=10240", f"--max-pkt-len={JUMBO_MTU + 18}"]
# A jumbo frame in default-sized (2 KiB) mbufs: tx_first then sends 5-segment frames.
JUMBO_SEGMENTS = "2000,2000,2000,2000,1014"
NS_IP, TESTPMD_IP = "10.250.9.1", "10.250.9.9"
TESTPMD_MAC = "02:00:00:00:09:09"
PINGS = 3
_ids = itertools.count()


def ports_for(tmp_path, **keys) -> list[dict]:
    return [{"name": name, "type": "vhost-user", "path": str(tmp_path / f"{name}.sock"), **keys}
            for name in ("vm1", "vm2")]


def loop_guest(tmp_path, mrg_rxbuf: bool, args=()) -> TestPmd:
    vdevs = [virtio_user_vdev(i, tmp_path / f"{name}.sock", mac=mac, mrg_rxbuf=mrg_rxbuf)
             for i, (name, mac) in enumerate((("vm1", MAC0), ("vm2", MAC1)))]
    return TestPmd(vdevs, [*guest_args(1), *args], main_lcore=1, log_path=tmp_path / "guest-testpmd.log")


# --------------------------------------------------------------------------- two testpmd guests

@pytest.mark.dpdk
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg_rxbuf=1", "mrg_rxbuf=0"])
def test_jumbo_frames_loop_between_testpmd_guests(tmp_path, mrg_rxbuf):
    """9014-byte frames loop through two MTU-9000 ports, none lost or cut, counters exact."""
    with Vswitchd(tmp_path, ports=ports_for(tmp_path, mtu=JUMBO_MTU)) as switch, \
            loop_guest(tmp_path, mrg_rxbuf, JUMBO_ARGS) as guest:
        wait_links(switch, ["vm1", "vm2"])
        guest.cmd(f"set txpkts {JUMBO_FRAME}")
        fwd, nic = run_loop(guest)
        check_guest(fwd, nic)
        stats = settle(lambda: switch_stats(switch))
        for name, counters in stats.items():
            for counter in SWITCH_ERROR_COUNTERS:
                assert counters[counter] == 0, f"vswitchd port {name} {counter}: {counters}"
        check_backend_counters(nic, {0: stats["vm1"], 1: stats["vm2"]}, QUEUE_SIZE)
        for port in (0, 1):
            assert nic[port]["rx_bytes"] == nic[port]["rx_packets"] * JUMBO_FRAME, nic[port]
        for name in ("vm1", "vm2"):
            assert stats[name]["tx_bytes"] == stats[name]["tx_packets"] * JUMBO_FRAME, stats[name]
            features = int(switch.port(name)["vhost"]["features"], 16)
            assert bool(features >> protocol.VIRTIO_NET_F_MRG_RXBUF & 1) == mrg_rxbuf
        assert guest.quit() == 0


@pytest.mark.dpdk
@pytest.mark.parametrize("case", ["over-mtu", "guest-buffers-too-small"])
def test_jumbo_frames_a_testpmd_guest_cannot_take_are_dropped_and_counted(tmp_path, case):
    """The guest sends 9014-byte frames (in 2 KiB segments) to a port that cannot take them:
    with the default MTU (1500), or with MTU 9000 but mrg_rxbuf=0 and 2 KiB receive buffers.
    Every frame is dropped and counted under its reason; the guest receives nothing."""
    mtu, mrg_rxbuf, counter = {"over-mtu": (None, True, "tx_dropped_mtu"),
                               "guest-buffers-too-small": (JUMBO_MTU, False, "tx_dropped_too_big")}[case]
    keys = {"mtu": mtu} if mtu else {}
    with Vswitchd(tmp_path, ports=ports_for(tmp_path, **keys)) as switch, \
            loop_guest(tmp_path, mrg_rxbuf) as guest:
        wait_links(switch, ["vm1", "vm2"])
        guest.cmd(f"set txpkts {JUMBO_SEGMENTS}")
        fwd, nic = run_loop(guest)
        stats = settle(lambda: switch_stats(switch))
        sent = {0: nic[0]["tx_packets"], 1: nic[1]["tx_packets"]}
        assert sent[0] > 0 and sent[1] > 0, nic
        for port, (name, other) in enumerate((("vm1", "vm2"), ("vm2", "vm1"))):
            assert nic[port]["rx_packets"] == 0, f"testpmd port {port} received frames: {nic[port]}"
            assert stats[name]["rx_packets"] == sent[port], stats
            # What vm1 sent was meant for vm2 (and flooded there until vm2's MAC was learned).
            assert stats[other][counter] == sent[port], stats
            assert stats[other]["tx_dropped"] == sent[port] and stats[other]["tx_packets"] == 0, stats
        text = switch.ctl_raw("show").stdout
        assert f"{counter} {sent[0]}" in text, text
        assert guest.quit() == 0


# --------------------------------------------------------------------------- in-process front-ends

MAC_A, MAC_B, MAC_C = (bytes.fromhex(f"0200000000a{i}") for i in (1, 2, 3))
BROADCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, length: int) -> bytes:
    return dst + src + b"\x88\xb5" + bytes(i & 0xFF for i in range(length - 14))


def wait_counter(switch, port: str, counter: str, value: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = switch.port(port)["stats"]
        if stats[counter] >= value or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_frames_longer_than_the_mtu_are_dropped_not_truncated(tmp_path):
    """vm2 has the default MTU 1500: 1518-byte frames (1500 + Ethernet header + VLAN tag) reach it,
    1519-byte ones are dropped and counted.  vm3's front-end says MTU 9000 (NET_SET_MTU): 9018 bytes
    reach it whole.  An MTU out of range is refused and counted."""
    ports = [{"name": n, "type": "vhost-user", "path": str(tmp_path / f"{n}.sock")} for n in ("vm1", "vm2", "vm3")]
    with Vswitchd(tmp_path, ports=ports) as switch:
        a = VhostUserFrontend(tmp_path / "vm1.sock").connect()
        b = VhostUserFrontend(tmp_path / "vm2.sock").connect()
        c = VhostUserFrontend(tmp_path / "vm3.sock", mtu=JUMBO_MTU).connect()
        try:
            for fe in (a, b, c):
                fe.handshake()
                fe.post_rx(0, 16, size=16384)
            # Teach the switch where B and C are.
            b.send_frame(0, frame(MAC_A, MAC_B, 60))
            c.send_frame(0, frame(MAC_A, MAC_C, 60))
            assert len(a.receive(0, 2)) == 2
            # MAC_A was unknown: each of those flooded to the other front-end too.
            assert len(b.receive(0)) == 1 and len(c.receive(0)) == 1
            assert switch.port("vm2")["mtu"] == 1500 and switch.port("vm3")["mtu"] == JUMBO_MTU

            a.send_frame(0, frame(MAC_B, MAC_A, 1518))
            assert [len(f.data) for f in b.receive(0)] == [1518]
            delivered = switch.port("vm2")["stats"]["tx_packets"]
            a.send_frame(0, frame(MAC_B, MAC_A, 1519))
            stats = wait_counter(switch, "vm2", "tx_dropped_mtu", 1)
            assert stats["tx_dropped_mtu"] == 1 and stats["tx_dropped"] == 1, stats
            assert stats["tx_packets"] == delivered, stats
            assert b.receive(0, timeout=0.3) == []

            big = frame(MAC_C, MAC_A, JUMBO_MTU + 18)
            a.send_frame(0, big)
            assert [f.data for f in c.receive(0)] == [big]
            a.send_frame(0, frame(MAC_C, MAC_A, JUMBO_MTU + 19))
            assert wait_counter(switch, "vm3", "tx_dropped_mtu", 1)["tx_dropped_mtu"] == 1

            # NET_SET_MTU out of range: refused, counted, the front-end's MTU stays.
            with pytest.raises(RequestFailed):
                c.set_u64(Request.NET_SET_MTU, 65536, need_reply=True)
            port = switch.port("vm3")
            assert port["stats"]["mtu_refused"] == 1 and port["mtu"] == JUMBO_MTU, port
            assert "NET_SET_MTU: MTU 65536 is outside 68..65535" in switch.log()
            assert "mtu_refused 1" in switch.ctl_raw("show", "vm3").stdout
            # Its session gone, the port is back to its configured MTU.
            c.close()
            deadline = time.monotonic() + 5
            while switch.port("vm3")["mtu"] != 1500 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert switch.port("vm3")["mtu"] == 1500
        finally:
            for fe in (a, b, c):
                fe.close()


def test_a_frame_larger_than_the_guest_rx_buffer_is_dropped_not_truncated(tmp_path):
    """Without mergeable buffers a frame must fit one receive chain: a 9014-byte frame facing a
    2 KiB buffer is dropped and counted, the buffer stays for the next frame that fits, and the
    frame crosses whole once the guest posts a large enough buffer."""
    ports = ports_for(tmp_path, mtu=JUMBO_MTU)
    with Vswitchd(tmp_path, ports=ports) as switch:
        a = VhostUserFrontend(tmp_path / "vm1.sock").connect()
        b = VhostUserFrontend(tmp_path / "vm2.sock", disable_features=bits(protocol.VIRTIO_NET_F_MRG_RXBUF)).connect()
        try:
            a.handshake()
            b.handshake()
            a.post_rx(0, 4)
            b.post_rx(0, 1, size=2048)
            b.send_frame(0, frame(MAC_A, MAC_B, 60))
            assert len(a.receive(0)) == 1

            big = frame(MAC_B, MAC_A, JUMBO_FRAME)
            a.send_frame(0, big)
            stats = wait_counter(switch, "vm2", "tx_dropped_too_big", 1)
            assert stats["tx_dropped_too_big"] == 1 and stats["tx_dropped"] == 1, stats
            assert b.receive(0, timeout=0.3) == []
            # The small buffer is still there for a frame that fits.
            a.send_frame(0, frame(MAC_B, MAC_A, 1000))
            assert [len(f.data) for f in b.receive(0)] == [1000]
            b.post_rx(0, 1, size=10240)
            a.send_frame(0, big)
            got = b.receive(0)
            assert [f.data for f in got] == [big] and got[0].num_buffers == 1
            assert "tx_dropped_too_big 1" in switch.ctl_raw("show").stdout
        finally:
            a.close()
            b.close()


# --------------------------------------------------------------------------- kernel ports

@pytest.fixture
def veth(netns):
    """(host end, namespace end), both MTU 9000; the namespace end has NS_IP/24 and no IPv6."""
    n = next(_ids)
    host, peer = unique("vsj", n), unique("vsk", n)
    sh("ip", "link", "add", host, "mtu", str(JUMBO_MTU), "type", "veth", "peer", "name", peer, "mtu", str(JUMBO_MTU))
    try:
        sh("ip", "link", "set", peer, "netns", netns)
        sh("ip", "link", "set", host, "up")
        # No IPv6 chatter: the tests count frames (a TAP made later takes the default).
        in_ns(netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", peer)
        in_ns(netns, "ip", "link", "set", peer, "up")
        yield host, peer
    finally:
        sh("ip", "link", "del", host, check=False)


def ping_jumbo(netns: str, count: int = PINGS, size: int = JUMBO_MTU - 28) -> str:
    """busybox ping with `size` bytes of ICMP payload (8972: a 9000-byte IP packet)."""
    return in_ns(netns, "busybox", "ping", "-c", str(count), "-s", str(size), "-i", "0.2", "-W", "3",
                 TESTPMD_IP, check=False).stdout


def icmpecho_guest(tmp_path) -> TestPmd:
    """testpmd answering ARP and ICMP echo requests, with room for jumbo frames."""
    return TestPmd([virtio_user_vdev(0, tmp_path / "dpdk.sock", mac=TESTPMD_MAC)],
                   ["--forward-mode=icmpecho", "--port-topology=loop", *JUMBO_ARGS],
                   main_lcore=1, log_path=tmp_path / "testpmd.log")


def check_jumbo_pings(d, guest: TestPmd, netns: str, kernel_port: str) -> None:
    guest.start()
    guest.clear_port_stats()
    before = settle(lambda: switch_stats(d))
    out = ping_jumbo(netns)
    assert f"{PINGS} packets transmitted, {PINGS} packets received, 0% packet loss" in out, out
    assert f"{JUMBO_MTU - 20} bytes from {TESTPMD_IP}" in out, out
    after = settle(lambda: switch_stats(d))
    nic = settle(guest.port_stats)[0]
    sw = {name: {k: v - before[name].get(k, 0) for k, v in counters.items()} for name, counters in after.items()}
    print(f"switch deltas: {sw}\ntestpmd port 0: {nic}")
    for name in (kernel_port, "dpdk"):
        for counter in SWITCH_ERROR_COUNTERS:
            assert sw[name][counter] == 0, f"vswitchd port {name} {counter}: {sw[name]}"
    for counter in GUEST_ERROR_COUNTERS:
        assert nic.get(counter, 0) == 0, f"testpmd {counter}: {nic}"
    # Every jumbo echo request reached testpmd whole, and every answer the namespace.
    assert sw[kernel_port]["rx_packets"] == sw["dpdk"]["tx_packets"] == nic["rx_packets"], (sw, nic)
    assert nic["tx_packets"] == sw["dpdk"]["rx_packets"] == sw[kernel_port]["tx_packets"], (sw, nic)
    assert nic["rx_bytes"] >= PINGS * JUMBO_FRAME and sw[kernel_port]["tx_bytes"] >= PINGS * JUMBO_FRAME, (sw, nic)


@pytest.mark.dpdk
def test_jumbo_pings_between_a_namespace_and_a_guest_through_af_packet(tmp_path, veth, netns):
    host, peer = veth
    ports = [{"name": "dpdk", "type": "vhost-user", "path": str(tmp_path / "dpdk.sock"), "mtu": JUMBO_MTU},
             {"name": "veth", "type": "af-packet", "ifname": host}]
    with Vswitchd(tmp_path, ports=ports) as d, icmpecho_guest(tmp_path) as guest:
        wait_links(d, ["dpdk", "veth"])
        assert d.port("veth")["mtu"] == JUMBO_MTU   # followed from the interface
        check_jumbo_pings(d, guest, netns, "veth")
        assert guest.quit() == 0


@pytest.mark.dpdk
def test_jumbo_pings_between_a_namespace_and_a_guest_through_tap(tmp_path, netns):
    ifname = unique("vsjt", next(_ids))
    in_ns(netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    ports = [{"name": "dpdk", "type": "vhost-user", "path": str(tmp_path / "dpdk.sock"), "mtu": JUMBO_MTU},
             {"name": "tap", "type": "tap", "ifname": ifname, "netns": netns, "mtu": JUMBO_MTU}]
    with Vswitchd(tmp_path, ports=ports) as d, icmpecho_guest(tmp_path) as guest:
        wait_links(d, ["dpdk", "tap"])
        # The switch created the TAP with the port's MTU.
        assert f"mtu {JUMBO_MTU} " in in_ns(netns, "ip", "link", "show", ifname).stdout
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        assert d.port("tap")["mtu"] == JUMBO_MTU
        check_jumbo_pings(d, guest, netns, "tap")
        assert guest.quit() == 0


def test_frames_longer_than_a_kernel_interface_mtu_are_dropped_and_counted(tmp_path, veth, netns):
    """The AF_PACKET port follows its interface's MTU as it changes, and the TAP port has the MTU
    it was created with: a frame longer than it is dropped and counted, not handed to the kernel
    (which would send it on over a packet socket with a virtio-net header, or into the stack from
    a TAP, whatever the interface's MTU)."""
    host, _ = veth
    tap = unique("vsjt", next(_ids))
    ports = [{"name": "vm1", "type": "vhost-user", "path": str(tmp_path / "vm1.sock"), "mtu": JUMBO_MTU},
             {"name": "veth", "type": "af-packet", "ifname": host},
             {"name": "tap", "type": "tap", "ifname": tap, "netns": netns}]
    with Vswitchd(tmp_path, ports=ports) as d:
        fe = VhostUserFrontend(tmp_path / "vm1.sock").connect()
        try:
            fe.handshake()
            fe.post_rx(0, 64, size=16384)
            wait_links(d, ["vm1", "veth", "tap"])
            assert d.port("veth")["mtu"] == JUMBO_MTU and d.port("tap")["mtu"] == 1500

            # The interface's MTU goes down under the switch: the port follows.
            sh("ip", "link", "set", host, "mtu", "1500")
            deadline = time.monotonic() + 5
            while d.port("veth")["mtu"] != 1500 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert d.port("veth")["mtu"] == 1500
            # A broadcast goes to both kernel ports.
            before = switch_stats(d)
            fe.send_frame(0, frame(BROADCAST, MAC_A, 1519))
            for name in ("veth", "tap"):
                stats = wait_counter(d, name, "tx_dropped_mtu", 1)
                assert stats["tx_dropped_mtu"] == 1 and stats["tx_errors"] == 0, stats
                assert stats["tx_packets"] == before[name]["tx_packets"], stats
            # 1518 bytes still fit both.
            fe.send_frame(0, frame(BROADCAST, MAC_A, 1518))
            for name in ("veth", "tap"):
                stats = wait_counter(d, name, "tx_packets", before[name]["tx_packets"] + 1)
                assert stats["tx_packets"] == before[name]["tx_packets"] + 1, stats
                assert stats["tx_dropped_mtu"] == 1 and stats["tx_errors"] == 0, stats
            text = d.ctl_raw("show").stdout
            assert "port veth: mtu 1500, tx_dropped_mtu 1" in text and "port tap: mtu 1500, tx_dropped_mtu 1" in text
        finally:
            fe.close()
