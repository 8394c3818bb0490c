"""QEMU guests pinging each other through vswitchd over vhost-user.

Each guest is a real Linux (Debian 12's kernel, busybox initramfs, built and
cached by tools/vmkit.py) with one virtio-net-pci NIC on a vhost-user socket
of the switch. The guests' addresses (10.200.0.0/24) exist only inside their
own virtual network: nothing here sends traffic anywhere else.

* test_kit_against_dpdk_vhost: the same pings through DPDK's own vhost backend
  (testpmd, io forwarding), in server, client and two-queue variants. It
  proves the kit itself, independent of vswitchd.
* test_ping[server|client]: two guests ping each other both ways with no loss,
  with the switch owning the sockets (server) or QEMU owning them (client:
  the switch connects, and must keep retrying until QEMU listens).
* test_guest_restart[server|client]: one guest powers off and a new QEMU
  starts on the same socket; the guests ping again, switch not restarted.
* test_multiqueue_ping: queues=2 guests (-smp 2) ping from each vCPU, so
  both transmit queues carry traffic.

Guests boot under TCG (no KVM, see shared/PEERS.md): ~10-20 s each, so the
timeouts below are generous but bounded.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import Vswitchd
from tests.support.testpmd import TestPmd, vhost_vdev
from tools import vmkit

pytestmark = [pytest.mark.system, pytest.mark.qemu]

BOOT_TIMEOUT = 120.0
LINK_TIMEOUT = 30.0
# Pings that may be lost while ARP resolves and the vrings come up.
PRIME_ATTEMPTS = 10
PING_COUNT = 5

GUESTS = {
    "vm1": {"ip": "10.200.0.1", "mac": "52:54:00:c8:00:01"},
    "vm2": {"ip": "10.200.0.2", "mac": "52:54:00:c8:00:02"},
}


@functools.cache
def _built_kit() -> Path:
    vmkit.build(log=print)
    return vmkit.cache_dir()


@pytest.fixture
def kit() -> Path:
    """The guest kernel + initramfs directory, built once per test session.

    Function-scoped on purpose: conftest's skip checks (root, QEMU present) run
    before it, so a machine without QEMU skips instead of failing the build.
    """
    return _built_kit()


def make_guest(name: str, tmp_path: Path, kit: Path, *, qemu_server: bool, queues: int = 1,
               packed: bool = False) -> vmkit.Guest:
    return vmkit.Guest(
        name, tmp_path / f"{name}.sock", qemu_server=qemu_server, queues=queues,
        log_dir=tmp_path, kit_dir=kit, packed=packed, **GUESTS[name],
    )


def switch_ports(tmp_path: Path, *, client: bool, queues: int = 1) -> list[dict]:
    return [
        {"name": name, "type": "vhost-user", "path": str(tmp_path / f"{name}.sock"),
         "mode": "client" if client else "server", "queues": queues}
        for name in GUESTS
    ]


def boot(guests: list[vmkit.Guest], stack: contextlib.ExitStack) -> None:
    """Starts the guests not yet started (they boot in parallel), then waits for each."""
    for guest in guests:
        if guest.process is None:
            stack.enter_context(guest)
    for guest in guests:
        guest.wait_ready(BOOT_TIMEOUT)


def link_states(switch: Vswitchd) -> dict[str, object]:
    """Each port's link state as `vswitchctl show` reports it."""
    try:
        return {port["name"]: port.get("link") for port in switch.ctl("show")["ports"]}
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"vswitchctl {' '.join(exc.cmd[-2:])} failed ({exc.returncode}): {exc.stderr.strip()}")


def wait_links(switch: Vswitchd, names: list[str], up: bool = True, timeout: float = LINK_TIMEOUT) -> None:
    """Waits until vswitchd reports each named port's link up (or down)."""
    deadline = time.monotonic() + timeout
    while True:
        states = link_states(switch)
        pending = [n for n in names if (states.get(n) in ("up", True)) != up]
        if not pending:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"vswitchd ports {pending} not {'up' if up else 'down'} after {timeout:.0f} s: {states}")
        time.sleep(0.2)


def prime(guest: vmkit.Guest, peer_ip: str) -> None:
    """Pings once until a reply comes: resolves ARP and proves the path is open."""
    for _ in range(PRIME_ATTEMPTS):
        if guest.ping(peer_ip, count=1)[1] == 1:
            return
    pytest.fail(f"{guest.name} got no reply from {peer_ip} in {PRIME_ATTEMPTS} pings")


def assert_ping_both_ways(a: vmkit.Guest, b: vmkit.Guest, count: int = PING_COUNT) -> None:
    """a and b ping each other with no loss once ARP is resolved."""
    prime(a, b.address)
    prime(b, a.address)
    assert a.ping(b.address, count) == (count, count), f"{a.name} -> {b.name} lost pings"
    assert b.ping(a.address, count) == (count, count), f"{b.name} -> {a.name} lost pings"


def assert_ping_from_each_queue(a: vmkit.Guest, b: vmkit.Guest, queues: int, count: int = PING_COUNT) -> None:
    """Both guests use `queues` TX queues, and pings sent from each vCPU all come back.

    The guest kernel picks a TX queue by CPU (virtio-net sets XPS one queue
    per vCPU), so pinning ping to each vCPU in turn sends on each queue.
    """
    for guest in (a, b):
        used = guest.run("ls -d /sys/class/net/eth0/queues/tx-* | wc -l").strip()
        assert used == str(queues), f"{guest.name} uses {used} TX queues, expected {queues}"
    for cpu in range(queues):
        for src, dst in ((a, b), (b, a)):
            out = src.run(f"taskset {1 << cpu:x} ping -c {count} -i 0.2 -W 2 {dst.address}", timeout=60)
            assert f"{count} packets received" in out, f"{src.name} on vCPU {cpu} lost pings:\n{out}"


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as log:
            return f"--- last lines of {path} ---\n" + "".join(log.readlines()[-lines:])
    except OSError as exc:
        return f"--- {path}: {exc} ---"


@contextlib.contextmanager
def diagnostics(tmp_path: Path):
    """On the way out, prints the logs (pytest shows them only for a failed test) and removes sockets."""
    try:
        yield
    finally:
        for log in sorted(tmp_path.glob("*.log")):
            print(log_tail(log))
        for sock in tmp_path.glob("*.sock"):
            sock.unlink(missing_ok=True)


@contextlib.contextmanager
def switch_and_guests(tmp_path: Path, kit: Path, *, client: bool, queues: int = 1, packed: bool = False):
    """vswitchd with two vhost-user ports and a guest on each, every link up."""
    with diagnostics(tmp_path), contextlib.ExitStack() as stack:
        guests = [make_guest(name, tmp_path, kit, qemu_server=client, queues=queues, packed=packed)
                  for name in GUESTS]
        # Either way the switch starts first: in server mode QEMU needs its
        # socket; in client mode the switch must retry until QEMU listens
        # (QEMU then holds the guest's boot until the switch has connected).
        switch = stack.enter_context(Vswitchd(tmp_path, ports=switch_ports(tmp_path, client=client, queues=queues)))
        boot(guests, stack)
        wait_links(switch, list(GUESTS))
        yield switch, guests


KIT_VARIANTS = {
    "server": {"client": False, "queues": 1},
    "client": {"client": True, "queues": 1},
    "queues=2": {"client": False, "queues": 2},
}


@pytest.mark.dpdk
@pytest.mark.parametrize("variant", KIT_VARIANTS.values(), ids=KIT_VARIANTS.keys())
def test_kit_against_dpdk_vhost(tmp_path, kit, variant):
    """Two guests ping each other through DPDK's vhost PMD: the kit works without vswitchd."""
    client, queues = variant["client"], variant["queues"]
    guests = [make_guest(name, tmp_path, kit, qemu_server=client, queues=queues) for name in GUESTS]
    backend = TestPmd(
        [vhost_vdev(i, guest.socket_path, queues=queues, client=client or None) for i, guest in enumerate(guests)],
        ["--forward-mode=io", "--disable-link-check", f"--rxq={queues}", f"--txq={queues}"],
        main_lcore=0, log_path=tmp_path / "vhost-testpmd.log",
    )
    with diagnostics(tmp_path), contextlib.ExitStack() as stack:
        # testpmd first in both modes: as a vhost client it retries each
        # second until QEMU listens, and its prompt is read before vhost-user
        # messages start interleaving log lines with it.
        stack.enter_context(backend)
        backend.start()
        boot(guests, stack)
        assert_ping_both_ways(*guests)
        if queues > 1:
            assert_ping_from_each_queue(*guests, queues=queues)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_ping(tmp_path, kit, mode):
    """Two guests ping each other both ways with 0% loss through vswitchd."""
    with switch_and_guests(tmp_path, kit, client=mode == "client") as (switch, (vm1, vm2)):
        assert_ping_both_ways(vm1, vm2)
        learned = {e["mac"].lower(): e["port"] for e in switch.ctl("fdb", "show")["entries"]}
        assert learned.get(vm1.mac) == "vm1" and learned.get(vm2.mac) == "vm2", f"fdb: {learned}"


@pytest.mark.parametrize("mode", ["server", "client"])
def test_guest_restart(tmp_path, kit, mode):
    """A guest replaced by a new QEMU on the same socket pings again; the switch keeps running."""
    with switch_and_guests(tmp_path, kit, client=mode == "client") as (switch, (vm1, vm2)):
        assert_ping_both_ways(vm1, vm2)
        switch_pid = switch.proc.pid

        vm2.stop()
        wait_links(switch, ["vm2"], up=False)
        # The same Guest object starts a fresh QEMU process on the same socket.
        vm2.start()
        vm2.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["vm1", "vm2"])

        assert_ping_both_ways(vm1, vm2)
        assert switch.proc.poll() is None and switch.proc.pid == switch_pid, "vswitchd did not survive"


def test_packed_ring_ping(tmp_path, kit):
    """Guests with packed=on: the Linux driver's packed rings, both directions, through vswitchd."""
    with switch_and_guests(tmp_path, kit, client=False, packed=True) as (switch, (vm1, vm2)):
        assert_ping_both_ways(vm1, vm2)
        for port in switch.ctl("show")["ports"]:
            layouts = {ring["layout"] for ring in port["vhost"]["rings"] if ring["enabled"]}
            assert layouts == {"packed"}, f"vswitchd port {port['name']} rings {layouts}"


def test_multiqueue_ping(tmp_path, kit):
    """queues=2 guests with two vCPUs ping from each vCPU, so both TX queues carry frames."""
    with switch_and_guests(tmp_path, kit, client=False, queues=2) as (switch, (vm1, vm2)):
        assert_ping_both_ways(vm1, vm2)
        assert_ping_from_each_queue(vm1, vm2, queues=2)



def tx_rings_used(switch: Vswitchd, port: str) -> dict[int, int]:
    """Descriptors the switch has taken from each of a guest's TX rings (odd ring indexes)."""
    info = next(p for p in switch.ctl("show")["ports"] if p["name"] == port)
    return {r["index"] // 2: r["last_avail_idx"] for r in info["vhost"]["rings"] if r["index"] % 2}


def test_four_queues_spread_flows(tmp_path, kit):
    """mq=on with 4 queue pairs and 4 vCPUs: the guest sends on every TX queue, the switch takes from each.

    virtio-net sets XPS one TX queue per vCPU, so pings pinned to each vCPU
    in turn leave on each queue; every one comes back (the switch answers on
    the matching RX queues), and the switch's TX ring indexes show it took
    frames from all four.
    """
    queues = 4
    with switch_and_guests(tmp_path, kit, client=False, queues=queues) as (switch, (vm1, vm2)):
        assert_ping_both_ways(vm1, vm2)
        before = {name: tx_rings_used(switch, name) for name in GUESTS}
        assert_ping_from_each_queue(vm1, vm2, queues=queues)
        for name in GUESTS:
            after = tx_rings_used(switch, name)
            used = {q: (after[q] - before[name][q]) & 0xFFFF for q in after}
            assert len(used) == queues and all(n >= PING_COUNT for n in used.values()), \
                f"{name}'s TX queues and the descriptors the switch took from each: {used}"


def test_a_qemu_running_as_an_unprivileged_user_connects(tmp_path, kit):
    """QEMU as `nobody` (as libvirt runs it as its own user) on a socket the switch gave to that
    user (socket_owner), in a directory it may enter: it connects, boots, and pings a guest
    whose QEMU runs as root."""
    open_dir = Path(tempfile.mkdtemp(prefix="vs-qemu-user-", dir="/tmp"))
    os.chmod(open_dir, 0o755)
    try:
        ports = [{"name": "vm1", "type": "vhost-user", "path": str(open_dir / "vm1.sock"), "socket_owner": "nobody",
                  "socket_mode": "0600"},
                 {"name": "vm2", "type": "vhost-user", "path": str(tmp_path / "vm2.sock")}]
        with diagnostics(tmp_path), contextlib.ExitStack() as stack:
            switch = stack.enter_context(Vswitchd(tmp_path, ports=ports))
            vm1 = vmkit.Guest("vm1", open_dir / "vm1.sock", log_dir=tmp_path, kit_dir=kit, run_as="nobody",
                              **GUESTS["vm1"])
            vm2 = make_guest("vm2", tmp_path, kit, qemu_server=False)
            boot([vm1, vm2], stack)
            wait_links(switch, list(GUESTS))
            assert psutil.Process(vm1.process.pid).uids().effective == pwd.getpwnam("nobody").pw_uid
            assert_ping_both_ways(vm1, vm2)
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
