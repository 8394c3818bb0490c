"""A libvirt domain with `<interface type='vhostuser'>` boots and pings through the switch.

Debian's libvirtd (tests/support/libvirtd.py: a private instance, in a mount
namespace of its own) runs the vmkit guest as a `qemu` (TCG) domain, as its
user libvirt-qemu. The peer is a network namespace behind a TAP port of the
same vswitchd. Both of libvirt's modes:

* `mode='client'`: QEMU connects; the switch's port listens on a socket it
  gives to libvirt-qemu's group (`socket_group`, `socket_mode: "0660"`).
  Without those keys libvirt-qemu could not connect (the nobody tests in
  tests/unit/test_socket_access.py show the refusal).
* `mode='server'`: QEMU (as libvirt-qemu) creates the socket in a directory
  that group may write to; the switch's port is in client mode and connects.

The domain, the daemon, the namespace and every file are removed afterwards,
even when the test fails.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.conftest import require_tool
from tests.support.daemon import Vswitchd
from tests.support.libvirtd import QEMU_GROUP, QEMU_USER, LibvirtGuest, PrivateLibvirtd
from tests.support.netns import in_ns
from tests.system.test_qemu_guests import BOOT_TIMEOUT, diagnostics, kit, prime, wait_links  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.system, pytest.mark.qemu]

GUEST_IP, NS_IP = "10.200.3.2", "10.200.3.1"
GUEST_MAC = "52:54:00:c8:03:02"
PING_COUNT = 5


@pytest.fixture
def shared_dir():
    """A directory libvirt-qemu may enter and write to (its group's, 0770): sockets, kernel, console.

    Under /tmp, as pytest's tmp_path is root's alone (0700).
    """
    require_tool("libvirtd", "libvirt-daemon-system")
    require_tool("virsh", "libvirt-clients")
    try:
        gid = grp.getgrnam(QEMU_GROUP).gr_gid
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"no user/group {QEMU_USER} (Debian package libvirt-daemon-system creates them); "
                    "run tools/setup-test-env.sh as root to install it")
    path = Path(tempfile.mkdtemp(prefix="vs-libvirt-", dir="/tmp"))
    try:
        os.chown(path, 0, gid)
        os.chmod(path, 0o770)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("libvirt_mode", ["client", "server"])
def test_libvirt_domain_pings_through_the_switch(tmp_path, kit, netns, shared_dir, libvirt_mode):  # noqa: F811
    sock = shared_dir / "vm.sock"
    if libvirt_mode == "client":
        # QEMU connects: the switch listens on a socket libvirt-qemu's group may use.
        vm_port = {"name": "vm", "type": "vhost-user", "path": str(sock), "mode": "server",
                   "socket_group": QEMU_GROUP, "socket_mode": "0660"}
    else:
        vm_port = {"name": "vm", "type": "vhost-user", "path": str(sock), "mode": "client"}
    ifname = f"vsl{netns.split('-')[-1]}{netns.split('-')[-2][-4:]}"[:15]
    ports = [vm_port, {"name": "host", "type": "tap", "ifname": ifname, "netns": netns}]
    with diagnostics(tmp_path), contextlib.ExitStack() as stack:
        libvirtd = stack.enter_context(PrivateLibvirtd(shared_dir / "libvirt"))
        stack.callback(lambda: print(f"--- {libvirtd.log_path} ---\n{libvirtd.log()}"))
        switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
        in_ns(netns, "ip", "addr", "add", f"{NS_IP}/24", "dev", ifname)
        guest = LibvirtGuest("vs-libvirt-vm", sock, libvirtd, shared_dir, ip=f"{GUEST_IP}/24", mac=GUEST_MAC,
                             qemu_server=libvirt_mode == "server", log_dir=tmp_path, kit_dir=kit)
        stack.callback(lambda: _print_qemu_log(libvirtd, guest.name))
        stack.enter_context(guest)
        guest.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["vm", "host"])

        # libvirt runs QEMU as its own user, not as root: that is why the socket keys exist.
        pid = guest.qemu_pid()
        assert pid and psutil.Process(pid).uids().effective == pwd.getpwnam(QEMU_USER).pw_uid

        prime(guest, NS_IP)
        assert guest.ping(NS_IP, count=PING_COUNT) == (PING_COUNT, PING_COUNT)
        out = in_ns(netns, "busybox", "ping", "-c", str(PING_COUNT), "-i", "0.2", "-W", "2", GUEST_IP,
                    check=False).stdout
        assert f"{PING_COUNT} packets received" in out, out


def _print_qemu_log(libvirtd: PrivateLibvirtd, name: str) -> None:
    log = libvirtd.root / "log" / "qemu" / f"{name}.log"
    if log.exists():
        print(f"--- {log} ---\n{log.read_text(errors='replace')[-4000:]}")
