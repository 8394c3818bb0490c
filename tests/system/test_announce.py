"""A QEMU guest's announcement reaches a namespace behind a TAP port, and moves the FDB.

QMP `announce-self` runs what QEMU runs after a migration's switch-over
(net/announce.c, without the migration): each round it hands its vhost-user
netdev a RARP, which becomes SEND_RARP to the switch unless the guest
negotiated VIRTIO_NET_F_GUEST_ANNOUNCE, and it asks a guest that did to
announce itself (a config interrupt; Linux sends gratuitous ARPs).  So:

* guest_announce on (the switch offers the bit, the guest takes it): the
  namespace sees the guest's own gratuitous ARPs and no RARP;
* `virtio-net-pci,...,guest_announce=off`: the namespace sees one RARP frame
  from the guest's MAC per round, sent by the switch (rarp_sent counts them),
  and no ARP.

Before announcing, the namespace sends a frame with the guest's MAC as source,
so the FDB has the MAC behind the TAP port; after it, `fdb show` has it behind
the guest's port again.  A sniffer (an AF_PACKET socket in the namespace)
prints every ARP and RARP frame from the guest's MAC it receives.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import Vswitchd
from tests.support.netns import in_ns, python_in_ns
from tests.system.test_memory_hotplug import Qmp
from tests.system.test_qemu_guests import BOOT_TIMEOUT, kit, wait_links  # noqa: F401 (kit is a fixture)
from tools import vmkit

pytestmark = [pytest.mark.system, pytest.mark.qemu]

GUEST_IP, NS_IP = "10.200.12.2", "10.200.12.1"
GUEST_MAC = "52:54:00:c8:0c:02"
ROUNDS = 3
SNIFF_SECONDS = 4.0

# Prints "ready", then the hex of every ARP (0x0806) and RARP (0x8035) frame received (not sent)
# from the MAC in argv[2] on interface argv[1], for argv[3] seconds.
SNIFFER = r"""
import socket, sys, time
ifname, mac, seconds = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.1)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        frame, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] != socket.PACKET_OUTGOING and frame[6:12] == mac and frame[12:14] in (b"\x08\x06", b"\x80\x35"):
        print(frame.hex(), flush=True)
"""

# Sends one broadcast frame (local experimental EtherType 0x88b5) with the MAC in argv[2] as source.
PLANT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
s.send(b"\xff" * 6 + bytes.fromhex(sys.argv[2].replace(":", "")) + b"\x88\xb5" + b"\0" * 46)
"""


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def is_rarp(frame: bytes) -> bool:
    """The RARP the switch sends for SEND_RARP (pmd.c rarp_frame, as QEMU's own): broadcast, reverse
    request, the guest's MAC as sender and target hardware address."""
    mac = mac_bytes(GUEST_MAC)
    return (len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x80\x35"
            and frame[14:22] == bytes.fromhex("0001080006040003") and frame[22:28] == mac and frame[32:38] == mac)


def is_garp(frame: bytes) -> bool:
    """A gratuitous ARP from the guest: sender and target protocol address both its own."""
    ip = bytes(int(x) for x in GUEST_IP.split("."))
    return frame[12:14] == b"\x08\x06" and frame[22:28] == mac_bytes(GUEST_MAC) and frame[28:32] == ip == frame[38:42]


def fdb(switch: Vswitchd) -> dict[str, str]:
    return {e["mac"]: e["port"] for e in switch.ctl("fdb", "show")["entries"]}


@pytest.mark.parametrize("guest_announce", [True, False], ids=["guest_announce", "guest_announce_off"])
def test_announce_self_reaches_the_namespace_and_moves_the_fdb(tmp_path: Path, kit: Path, netns,  # noqa: F811
                                                                guest_announce, request, require_tool):
    require_tool("ping", "iputils-ping")
    ifname = f"vsa{netns.split('-')[-1]}{netns.split('-')[-2][-4:]}"[:15]
    ports = [{"name": "vm", "type": "vhost-user", "path": str(tmp_path / "vm.sock")},
             {"name": "host", "type": "tap", "ifname": ifname, "netns": netns}]
    qmp_path = tmp_path / "vm.qmp"
    with contextlib.ExitStack() as stack:
        switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        # No IPv6: its router solicitations and MLD reports in the guest's first seconds would move
        # the MAC back before the announcement does.
        guest = vmkit.Guest("vm", tmp_path / "vm.sock", ip=f"{GUEST_IP}/24", mac=GUEST_MAC, log_dir=tmp_path,
                            kit_dir=kit, device_options="" if guest_announce else "guest_announce=off",
                            extra_cmdline="ipv6.disable=1",
                            qemu_args=("-qmp", f"unix:{qmp_path},server=on,wait=off"))
        stack.enter_context(guest)
        guest.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["vm", "host"])
        qmp = Qmp(qmp_path)
        stack.callback(qmp.close)
        negotiated = switch.port("vm")["vhost"]["negotiated_feature_names"]
        assert ("guest_announce" in negotiated) == guest_announce, negotiated

        # The MAC behind the TAP port, as if the guest had moved there.
        in_ns(netns, sys.executable, "-c", PLANT, ifname, GUEST_MAC)
        deadline = time.monotonic() + 10
        while fdb(switch).get(GUEST_MAC) != "host":
            assert time.monotonic() < deadline, f"the planted frame was not learned: {fdb(switch)}"
            time.sleep(0.05)

        sniffer = python_in_ns(netns, "-c", SNIFFER, ifname, GUEST_MAC, str(SNIFF_SECONDS))
        stack.callback(lambda: sniffer.poll() is None and sniffer.kill())
        assert sniffer.stdout.readline().strip() == "ready", sniffer.stderr.read()
        started = time.monotonic()
        # QEMU's migration defaults but for the rounds (5) and steps (100 ms): a shorter test.
        qmp.execute("announce-self", initial=50, max=550, rounds=ROUNDS, step=50)
        moved_ms, looks = None, 0
        while time.monotonic() < started + SNIFF_SECONDS:
            looks += 1               # each look is a vswitchctl run: tens to hundreds of ms here
            if fdb(switch).get(GUEST_MAC) == "vm":
                moved_ms = round((time.monotonic() - started) * 1000)
                break
            time.sleep(0.01)
        out, err = sniffer.communicate(timeout=SNIFF_SECONDS + 10)
        assert sniffer.returncode == 0, err
        frames = [bytes.fromhex(line) for line in out.split()]
        rarps = [f for f in frames if f[12:14] == b"\x80\x35"]
        arps = [f for f in frames if f[12:14] == b"\x08\x06"]
        rarp_sent = switch.port("vm")["stats"]["rarp_sent"]
        figures = {"guest_announce": guest_announce, "rarps_seen": len(rarps), "arps_seen": len(arps),
                   "rarp_sent": rarp_sent, "fdb_moved_ms": moved_ms, "fdb_looks": looks}
        print("announce:", json.dumps(figures))
        for key, value in figures.items():
            request.node.user_properties.append((key, value))

        if guest_announce:
            assert arps and all(is_garp(f) for f in arps), frames
            assert rarps == [] and rarp_sent == 0, frames
        else:
            # One SEND_RARP per round, one frame per SEND_RARP, all through the TAP port.
            assert len(rarps) == ROUNDS and all(is_rarp(f) for f in rarps), frames
            assert rarp_sent == ROUNDS
            assert arps == [], frames
        assert moved_ms is not None, f"the FDB did not move back to 'vm': {fdb(switch)}"
        assert fdb(switch).get(GUEST_MAC) == "vm"
        # The guest still answers through the switch.
        assert in_ns(netns, "ping", "-c", "1", "-W", "2", GUEST_IP, check=False).returncode == 0
