"""VLANs with real peers: two network namespaces on access ports in VLANs 10 and 20,
and a Linux with 802.1Q VLAN devices on a trunk port.

* `a10`: a TAP port in namespace A, access VLAN 10 (10.201.10.1).
* `b20`: an AF_PACKET port on a veth whose peer sits in namespace B, access VLAN 20
  (10.201.20.1, and 10.201.10.3 so that it tries to reach VLAN 10's subnet directly).
* `trunk`: a vhost-user port with a QEMU guest (tools/vmkit.py), trunk [10, 20]; the
  guest has eth0.10 (10.201.10.2) and eth0.20 (10.201.20.2).  A QEMU guest and not a
  third namespace because this machine's kernel has no 802.1Q support (no 8021q
  module, no VLAN-filtering bridge); the guest's Debian kernel does.

VLAN 10's pair pings both ways, tagged on the trunk; so does VLAN 20's; namespace B
cannot reach VLAN 10's addresses.  Addresses exist only in the namespaces and the guest.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import REPO, Vswitchd
from tests.support.frames import BROADCAST, frame, mac
from tests.support.frontend import VhostUserFrontend
from tests.support.netns import in_ns, link_mac, namespaces, ping, ping_until, sh, unique
from tests.system.test_qemu_guests import BOOT_TIMEOUT, wait_links
from tools import vmkit

pytestmark = pytest.mark.system

A_IP, B_IP, B_IP_IN_10 = "10.201.10.1", "10.201.20.1", "10.201.10.3"
GUEST_IP_10, GUEST_IP_20 = "10.201.10.2", "10.201.20.2"
GUEST_MAC = "52:54:00:c8:0a:02"


@functools.cache
def _vlan_kit() -> Path:
    # Its own directory: the shared kit (without 802.1Q modules) stays as the other tests expect it.
    directory = Path(f"{vmkit.cache_dir()}-vlan")
    vmkit.build(directory, log=print, extra_modules=tuple(vmkit.VLAN_MODULES))
    return directory


@pytest.fixture
def vlan_kit() -> Path:
    return _vlan_kit()


@pytest.fixture
def vlans(tmp_path: Path, vlan_kit: Path):
    tap, veth, peer = unique("vlt", 0), unique("vlv", 0), unique("vlp", 0)
    with contextlib.ExitStack() as stack:
        ns_a, ns_b = stack.enter_context(namespaces(2))
        # Namespace B: a veth pair; the switch attaches to one end, the addresses are on the other.
        sh("ip", "-n", ns_b, "link", "add", veth, "type", "veth", "peer", "name", peer)
        for ifname in (veth, peer):
            sh("ip", "-n", ns_b, "link", "set", ifname, "up")
        in_ns(ns_b, "ip", "addr", "add", f"{B_IP}/24", "dev", veth)
        in_ns(ns_b, "ip", "addr", "add", f"{B_IP_IN_10}/24", "dev", veth)
        ports = [
            {"name": "a10", "type": "tap", "ifname": tap, "netns": ns_a, "vlan": {"mode": "access", "tag": 10}},
            {"name": "b20", "type": "af-packet", "ifname": peer, "netns": ns_b,
             "vlan": {"mode": "access", "tag": 20}},
            {"name": "trunk", "type": "vhost-user", "path": str(tmp_path / "trunk.sock"),
             "vlan": {"mode": "trunk", "trunks": [10, 20]}},
        ]
        switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        in_ns(ns_a, "ip", "addr", "add", f"{A_IP}/24", "dev", tap)
        # eth0 itself is untagged (VLAN 0), which this trunk does not carry.
        guest = vmkit.Guest("trunk", tmp_path / "trunk.sock", ip="10.201.99.2/24", mac=GUEST_MAC,
                            log_dir=tmp_path, kit_dir=vlan_kit)
        stack.enter_context(guest)
        guest.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["a10", "b20", "trunk"])
        for module in vmkit.VLAN_MODULES:
            guest.run(f"insmod /lib/modules/{module}.ko")
        for vid, ip in ((10, GUEST_IP_10), (20, GUEST_IP_20)):
            guest.run(f"ip link add link eth0 name eth0.{vid} type vlan id {vid} && "
                      f"ip addr add {ip}/24 dev eth0.{vid} && ip link set eth0.{vid} up")
        yield switch, guest, ns_a, ns_b, tap, veth


@pytest.mark.qemu
def test_access_namespaces_reach_a_linux_vlan_device_on_a_trunk_only_in_their_vlan(vlans):
    switch, guest, ns_a, ns_b, tap, veth = vlans
    ping_until(ns_a, GUEST_IP_10, timeout=30)
    assert ping(ns_a, GUEST_IP_10, count=3, wait=2)
    assert guest.ping(A_IP, count=3) == (3, 3)
    ping_until(ns_b, GUEST_IP_20, timeout=30)
    assert guest.ping(B_IP, count=3) == (3, 3)

    # VLAN 20's namespace has an address in VLAN 10's subnet, but its ARP requests stay in VLAN 20.
    assert not ping(ns_b, GUEST_IP_10, count=3, wait=1)
    assert not ping(ns_b, A_IP, count=3, wait=1)
    assert guest.ping(B_IP_IN_10, count=3)[1] == 0

    # One MAC, learned twice on the trunk: once per VLAN.
    entries = {(e["mac"], e["vlan"], e["port"]) for e in switch.ctl("fdb", "show")["entries"]}
    assert {(GUEST_MAC, 10, "trunk"), (GUEST_MAC, 20, "trunk")} <= entries
    assert (link_mac(ns_a, tap), 10, "a10") in entries and (link_mac(ns_b, veth), 20, "b20") in entries
    assert not any(e[2] == "b20" and e[1] == 10 for e in entries)
    trunk = switch.port("trunk")
    assert trunk["vlan"] == {"mode": "trunk", "trunks": [10, 20]}


# Sends the frames (hex, one per argument) from a raw packet socket on an interface.
_SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for f in sys.argv[2:]:
    s.send(bytes.fromhex(f))
"""

# Prints the VLAN tag (the kernel keeps it beside the frame: PACKET_AUXDATA) of the
# first frame from source MAC argv[2] that arrives on interface argv[1].
_RECEIVE_TAG = """
import socket, struct, sys
SOL_PACKET, PACKET_AUXDATA, TP_STATUS_VLAN_VALID = 263, 8, 0x10
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
s.settimeout(10)
print("ready", flush=True)
while True:
    data, anc, _, _ = s.recvmsg(4096, 256)
    if data[6:12] != bytes.fromhex(sys.argv[2]):
        continue
    tci = None
    for level, kind, value in anc:
        if level == SOL_PACKET and kind == PACKET_AUXDATA:
            status, _, _, _, _, vlan_tci, _ = struct.unpack("IIIHHHH", value[:20])
            tci = vlan_tci if status & TP_STATUS_VLAN_VALID else None
    if tci is None and data[12:14] == b"\\x81\\x00":
        tci = int.from_bytes(data[14:16], "big")
    print(tci, data[12:14].hex(), flush=True)
    break
"""


def test_an_af_packet_trunk_carries_tags_both_ways(tmp_path):
    """The kernel takes the tag out of a frame an AF_PACKET socket receives (tp_vlan_tci): the port
    puts it back, so the switch sees the VLAN; on the way out the tag is in the frame."""
    veth, peer = unique("vlc", 0), unique("vlq", 0)
    with contextlib.ExitStack() as stack:
        [ns] = stack.enter_context(namespaces(1))
        # No IPv6: its untagged neighbour discovery would count as drops on the trunk too.
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", ns, "link", "add", veth, "type", "veth", "peer", "name", peer)
        for ifname in (veth, peer):
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        ports = [{"name": "up", "type": "af-packet", "ifname": peer, "netns": ns,
                  "vlan": {"mode": "trunk", "trunks": [10]}},
                 {"name": "vm", "type": "vhost-user", "path": str(tmp_path / "vm.sock"),
                  "vlan": {"mode": "access", "tag": 10}}]
        d = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        vm = VhostUserFrontend(tmp_path / "vm.sock").connect()
        stack.callback(vm.close)
        vm.handshake()
        vm.post_rx(0, 64)
        wait_links(d, ["up", "vm"])

        ten = frame(BROADCAST, mac(5), b"ten".ljust(46, b"\0"))
        tag = lambda f, vid: f[:12] + struct.pack("!HH", 0x8100, vid) + f[12:]  # noqa: E731
        in_ns(ns, sys.executable, "-c", _SEND, veth, tag(ten, 10).hex(), tag(ten, 20).hex())
        got = vm.receive(0, 2, timeout=3)
        assert [f.data for f in got] == [ten]
        assert d.port("up")["stats"]["vlan_dropped"] == 1

        listener = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _RECEIVE_TAG, veth,
                                     mac(6).hex()], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        try:
            assert listener.stdout.readline().strip() == "ready"
            vm.send_frame(0, frame(BROADCAST, mac(6)))
            out, err = listener.communicate(timeout=15)
        finally:
            listener.kill()
            listener.communicate()
        assert out.split() == ["10", "0800"], (out, err)
