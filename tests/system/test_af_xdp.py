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
    sh("ip", "link", "set", host, "up")
    in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", peer)
    in_ns(netns, "ip", "link", "set", peer, "up")
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
