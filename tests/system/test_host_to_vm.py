"""Host-to-VM bridging with a real QEMU guest (tools/vmkit.py): the guest on a
vhost-user port, a TAP port whose interface sits in a test namespace with an
address.  Ping both ways, then a TCP bulk transfer each way with its
throughput recorded (printed and in the test's user properties).

The guest negotiates checksum and TSO offloads (the test checks), so its
64 KiB TCP frames reach the namespace's stack as they are, and the
namespace's TSO frames reach the guest whole: the offload path end to end.

The guest's initramfs has busybox only (no iperf3), so the transfer is
busybox `nc` on the guest side and tests/support/tcpxfer.py in the
namespace, with the data checked by SHA-256 on both ends.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import pytest

from tests.support.daemon import Vswitchd
from tests.support.netns import in_ns, python_in_ns
from tests.system.test_qemu_guests import BOOT_TIMEOUT, diagnostics, kit, wait_links  # noqa: F401 (fixtures)
from tools import vmkit
from vswitch.vhost import protocol

pytestmark = [pytest.mark.system, pytest.mark.qemu]

GUEST_IP, NS_IP = "10.200.1.2", "10.200.1.1"
TRANSFER_BYTES = 16 << 20


@pytest.fixture
def host_and_vm(tmp_path: Path, kit: Path, netns):  # noqa: F811
    ifname = f"vsh{netns.split('-')[-1]}{netns.split('-')[-2][-4:]}"[:15]
    ports = [{"name": "vm", "type": "vhost-user", "path": str(tmp_path / "vm.sock")},
             {"name": "host", "type": "tap", "ifname": ifname, "netns": netns}]
    with contextlib.ExitStack() as stack:
        switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        guest = vmkit.Guest("vm", tmp_path / "vm.sock", ip=f"{GUEST_IP}/24", mac="52:54:00:c8:01:02",
                            log_dir=tmp_path, kit_dir=kit)
        stack.enter_context(guest)
        guest.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["vm", "host"])
        yield switch, guest, netns


def record(request, name: str, nbytes: int, seconds: float) -> None:
    mbit = nbytes * 8 / seconds / 1e6
    line = f"{name}: {nbytes} bytes in {seconds:.2f} s = {mbit:.1f} Mbit/s"
    print(line)
    request.node.user_properties.append((name, f"{mbit:.1f} Mbit/s"))


def test_ping_and_tcp_both_ways(host_and_vm, request):
    switch, guest, netns = host_and_vm
    # Ping both ways (the first pings resolve ARP).
    for _ in range(10):
        if guest.ping(NS_IP, count=1)[1] == 1:
            break
    assert guest.ping(NS_IP, count=5) == (5, 5)
    out = in_ns(netns, "busybox", "ping", "-c", "5", "-i", "0.2", "-W", "2", GUEST_IP, check=False).stdout
    assert "5 packets received" in out, out

    features = int(switch.port("vm")["vhost"]["features"], 16)
    for bit in (protocol.VIRTIO_NET_F_CSUM, protocol.VIRTIO_NET_F_HOST_TSO4,
                protocol.VIRTIO_NET_F_GUEST_CSUM, protocol.VIRTIO_NET_F_GUEST_TSO4):
        assert features & (1 << bit), f"the guest did not negotiate feature bit {bit}: {features:#x}"

    # Namespace -> guest.
    guest.run("nc -l -p 5001 < /dev/null > /tmp/in & sleep 0")
    time.sleep(1)
    sender = python_in_ns(netns, "-m", "tests.support.tcpxfer", "send", GUEST_IP, "5001", str(TRANSFER_BYTES))
    out, err = sender.communicate(timeout=300)
    assert sender.returncode == 0, err
    sent, digest, seconds = out.split()
    record(request, "namespace->guest", int(sent), float(seconds))
    text = guest.run("sleep 1; wc -c < /tmp/in; sha256sum /tmp/in; rm /tmp/in", timeout=60)
    assert str(TRANSFER_BYTES) in text and digest in text, f"guest got: {text}"

    # Guest -> namespace.
    receiver = python_in_ns(netns, "-m", "tests.support.tcpxfer", "serve", "5002")
    try:
        assert receiver.stdout.readline().strip() == "listening"
        text = guest.run(f"dd if=/dev/urandom of=/tmp/out bs=65536 count={TRANSFER_BYTES // 65536} 2>/dev/null; "
                         "sha256sum /tmp/out", timeout=120)
        digest = re.search(r"([0-9a-f]{64})", text).group(1)
        guest.run(f"nc {NS_IP} 5002 < /tmp/out; rm /tmp/out", timeout=300)
        got, got_digest, seconds = receiver.stdout.readline().split()
    finally:
        receiver.kill()
        receiver.communicate()
    assert (int(got), got_digest) == (TRANSFER_BYTES, digest)
    record(request, "guest->namespace", int(got), float(seconds))

    stats = switch.port("host")["stats"]
    assert stats["rx_errors"] == stats["tx_errors"] == 0
