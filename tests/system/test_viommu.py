"""A QEMU guest behind an emulated Intel vIOMMU on a vhost-user port with
`iommu: true`, and a TAP port whose interface sits in a test namespace.

The guest (tools/vmkit.py, Debian's kernel with its built-in intel-iommu
driver, `intel_iommu=on`) runs on a q35 machine with `-device
intel-iommu,intremap=on,device-iotlb=on` and its NIC as `virtio-net-pci,
iommu_platform=on,ats=on`: its driver hands the device IOVAs from the DMA
API, QEMU forwards IOTLB updates and invalidations to the switch, and the
switch asks for what it lacks with IOTLB misses.  The test checks that
ACCESS_PLATFORM was negotiated and the IOTLB used (updates, misses sent),
then pings both ways and moves a TCP stream each way, checked by SHA-256.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.support.daemon import Vswitchd
from tests.support import tcpxfer
from tests.support.netns import in_ns
from tests.system.test_qemu_guests import BOOT_TIMEOUT, diagnostics, kit, wait_links  # noqa: F401 (fixtures)
from tools import vmkit
from vswitch.vhost import protocol

pytestmark = [pytest.mark.system, pytest.mark.qemu]

GUEST_IP, NS_IP = "10.200.7.2", "10.200.7.1"
# Small: under TCG, each receive buffer the guest maps costs a MISS round trip, and a
# frame that meets a miss is dropped (TCP resends it), so the namespace->guest
# direction runs at tens of KB/s; the socket timeout allows for it.
TRANSFER_BYTES = 1 << 20
SEND_TIMEOUT = 300

# The NIC sits behind a PCIe root port: on the root bus it would be a plain PCI
# device without the ATS capability, and the guest would then never send the
# device-IOTLB invalidations that QEMU forwards as IOTLB INVALIDATE.
VIOMMU_QEMU_ARGS = ("-machine", "q35,kernel-irqchip=split",
                    "-device", "intel-iommu,intremap=on,device-iotlb=on",
                    "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1")
VIOMMU_NIC = "bus=rp1,disable-legacy=on,iommu_platform=on,ats=on"


@pytest.fixture
def viommu_guest(tmp_path: Path, kit: Path, netns):  # noqa: F811
    ifname = f"vsi{netns.split('-')[-1]}{netns.split('-')[-2][-4:]}"[:15]
    tap = {"name": "host", "type": "tap", "ifname": ifname, "netns": netns}
    ports = [{"name": "vm", "type": "vhost-user", "path": str(tmp_path / "vm.sock"), "iommu": True}, tap]
    with diagnostics(tmp_path), contextlib.ExitStack() as stack:
        switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        guest = vmkit.Guest("vm", tmp_path / "vm.sock", ip=f"{GUEST_IP}/24", mac="52:54:00:c8:07:02",
                            log_dir=tmp_path, kit_dir=kit, device_options=VIOMMU_NIC,
                            extra_cmdline="intel_iommu=on iommu.strict=1", qemu_args=VIOMMU_QEMU_ARGS)
        stack.enter_context(guest)
        guest.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["vm", "host"])
        yield switch, guest, netns


def test_guest_behind_a_viommu_pings_and_moves_tcp(viommu_guest):
    switch, guest, netns = viommu_guest
    dmesg = guest.run("dmesg | grep -i -e DMAR -e iommu | head -5", check=False)
    print(dmesg)
    for _ in range(10):
        if guest.ping(NS_IP, count=1)[1] == 1:
            break
    assert guest.ping(NS_IP, count=5) == (5, 5)
    for _ in range(10):
        if "1 packets received" in in_ns(netns, "busybox", "ping", "-c", "1", "-W", "2", GUEST_IP, check=False).stdout:
            break
    out = in_ns(netns, "busybox", "ping", "-c", "5", "-i", "0.2", "-W", "2", GUEST_IP, check=False).stdout
    assert "5 packets received" in out, out

    vhost = switch.port("vm")["vhost"]
    features = int(vhost["features"], 16)
    assert features & (1 << protocol.VIRTIO_F_ACCESS_PLATFORM), f"ACCESS_PLATFORM not negotiated: {features:#x}"
    iotlb = vhost["iotlb"]
    print(f"IOTLB after the pings: {iotlb}")
    assert iotlb["updates"] > 0 and iotlb["misses_sent"] > 0

    sent, seconds = tcpxfer.namespace_to_guest(guest, netns, GUEST_IP, TRANSFER_BYTES, timeout=SEND_TIMEOUT)
    print(f"namespace->guest: {sent} bytes in {seconds} s")
    got, seconds = tcpxfer.guest_to_namespace(guest, netns, NS_IP, TRANSFER_BYTES)
    print(f"guest->namespace: {got} bytes in {seconds} s")

    iotlb = switch.port("vm")["vhost"]["iotlb"]
    print(f"IOTLB after the transfers: {iotlb}")
    assert sum(iotlb["refused"].values()) == 0 and iotlb["perm_denied"] == 0
    stats = switch.port("host")["stats"]
    assert stats["rx_errors"] == stats["tx_errors"] == 0
