"""Memory hotplug with a real QEMU: DIMMs added to and removed from a running
guest while it pings through vswitchd, then used for its network buffers.

vm1 starts with `-m 256M,slots=4,maxmem=1G` and a QMP socket; this test
speaks QMP itself (`object-add` memory-backend-memfd share=on, `device_add
pc-dimm`, `device_del`, `object-del`).  QEMU offers its vhost-user back-end
the new memory with ADD_MEM_REG and takes it back with REM_MEM_REG
(CONFIGURE_MEM_SLOTS), while the rings run.

* The first DIMM is onlined as movable memory in the guest, then offlined
  and removed, while vm2 pings vm1 every 50 ms: no ping is lost, and the
  switch counts one region added and one removed.
* The second DIMM is onlined as kernel memory.  It lies above 4 GiB, in the
  guest's Normal zone, which the guest's kernel allocates from before its
  DMA32 zone (all of the 256 MiB it booted with): the virtio-net receive
  buffers it posts from then on lie in the DIMM.  vm2 pings vm1 with a
  payload pattern; the pattern is found in the DIMM's memory (read through
  QEMU's memfd), the pings all come back, and the switch counts no error.

The guests' addresses (10.200.0.0/24) exist only inside their own virtual network.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import socket
import time
from pathlib import Path

import pytest

from tests.support.daemon import Vswitchd
from tests.system.test_qemu_guests import (BOOT_TIMEOUT, GUESTS, assert_ping_both_ways, diagnostics, kit,  # noqa: F401
                                           switch_ports, wait_links)
from tools import vmkit

pytestmark = [pytest.mark.system, pytest.mark.qemu]

MIB = 1 << 20
BASE_MB = 256
PATTERN = 0x5A                  # ping -p: the payload byte vm2 sends
PAYLOAD = 1200                  # ping -s


class Qmp:
    """A minimal QMP client: one command at a time; events are kept aside."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self.events: list[dict] = []
        greeting = self._read()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def wait_event(self, name: str, timeout: float, **data) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                    self.events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no QMP event {name} {data} within {timeout} s; seen {self.events}")
            self.sock.settimeout(remaining)
            try:
                self.events.append(self._read())
            except socket.timeout:
                pass
            finally:
                self.sock.settimeout(30.0)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class HotplugGuest(vmkit.Guest):
    """A guest with room for DIMMs and a QMP socket."""

    def __init__(self, *args, qmp_path: Path, slots: int = 4, max_memory: str = "1G", **kw):
        super().__init__(*args, **kw)
        self.qmp_path = qmp_path
        self.slots = slots
        self.max_memory = max_memory

    def command_line(self) -> list[str]:
        argv = super().command_line()
        m = argv.index("-m")
        argv[m + 1] += f",slots={self.slots},maxmem={self.max_memory}"
        return argv + ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]


def memory_blocks(guest: vmkit.Guest) -> dict[str, str]:
    """The guest's memory blocks (memoryN) and their state (online / offline)."""
    out = guest.run("for b in /sys/devices/system/memory/memory*; do echo ${b##*/} $(cat $b/state); done")
    return dict(line.split() for line in out.splitlines() if line.startswith("memory"))


def add_dimm(qmp: Qmp, name: str, size_mb: int) -> None:
    qmp.execute("object-add", **{"qom-type": "memory-backend-memfd", "id": f"mem-{name}",
                                 "size": size_mb * MIB, "share": True})
    qmp.execute("device_add", driver="pc-dimm", id=name, memdev=f"mem-{name}")


def wait_new_blocks(guest: vmkit.Guest, before: dict[str, str], count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        new = sorted(set(memory_blocks(guest)) - set(before), key=lambda b: int(b[6:]))
        if len(new) >= count:
            return new
        if time.monotonic() > deadline:
            pytest.fail(f"{guest.name}: {count} new memory blocks expected, got {new}")
        time.sleep(0.5)


def vhost_info(switch: Vswitchd, port: str) -> dict:
    return switch.port(port)["vhost"]


def wait_vhost(switch: Vswitchd, port: str, predicate, what: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = vhost_info(switch, port)
        if predicate(info):
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen within {timeout} s: {info}")
        time.sleep(0.2)


def start_background_ping(guest: vmkit.Guest, ip: str, count: int, interval: float, log: str,
                          extra: str = "") -> None:
    # setsid forks it into a session of its own: the console's shell (the guest's init) keeps no job.
    guest.run(f"setsid ping -c {count} -i {interval} -W 2 {extra} {ip} > {log} 2>&1 < /dev/null")


def background_ping_result(guest: vmkit.Guest, log: str, timeout: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        out = guest.run(f"cat {log}", check=False)
        match = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
        if match:
            return int(match.group(1)), int(match.group(2))
        if time.monotonic() > deadline:
            pytest.fail(f"{guest.name}: ping did not finish:\n{out[-2000:]}")
        time.sleep(1)


def qemu_memfds(pid: int) -> dict[int, str]:
    """QEMU's memory-backend memfds by size (each DIMM here has its own size): size -> /proc path."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:memory-backend-memfd"):
                found[os.stat(path).st_size] = path
        except OSError:
            continue
    return found


def pattern_runs(path: str, run: int = 1024) -> int:
    """How many times a run of the ping payload byte occurs in a memfd (read, not mapped by QEMU's side)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return m[:].count(bytes([PATTERN]) * run)


def test_dimms_added_and_removed_while_pinging(tmp_path, kit):  # noqa: F811
    with diagnostics(tmp_path), contextlib.ExitStack() as stack:
        switch = stack.enter_context(Vswitchd(tmp_path, ports=switch_ports(tmp_path, client=False)))
        qmp_path = tmp_path / "vm1.qmp"
        vm1 = HotplugGuest("vm1", tmp_path / "vm1.sock", qmp_path=qmp_path, log_dir=tmp_path, kit_dir=kit,
                           memory_mb=BASE_MB, extra_cmdline="memhp_default_state=offline", **GUESTS["vm1"])
        vm2 = vmkit.Guest("vm2", tmp_path / "vm2.sock", log_dir=tmp_path, kit_dir=kit, **GUESTS["vm2"])
        for guest in (vm1, vm2):
            stack.enter_context(guest)
        for guest in (vm1, vm2):
            guest.wait_ready(BOOT_TIMEOUT)
        wait_links(switch, ["vm1", "vm2"])
        qmp = Qmp(qmp_path)
        stack.callback(qmp.close)
        assert_ping_both_ways(vm1, vm2)

        start = vhost_info(switch, "vm1")
        # QEMU negotiated memory slots: it sent its memory as ADD_MEM_REG, not SET_MEM_TABLE.
        assert int(start["protocol_features"], 16) & (1 << 15), start["protocol_features"]
        assert start["mem_regs_added"] == start["memory_regions"] >= 1, start

        # --- a DIMM comes and goes while vm2 pings vm1 every 50 ms
        blocks = memory_blocks(vm1)
        start_background_ping(vm2, vm1.address, 400, 0.05, "/tmp/ping1")
        add_dimm(qmp, "dimm1", 128)
        added = wait_vhost(switch, "vm1", lambda i: i["mem_regs_added"] == start["mem_regs_added"] + 1,
                           "ADD_MEM_REG for dimm1")
        assert added["memory_regions"] == start["memory_regions"] + 1
        assert f"memory: {added['memory_regions']} regions" in switch.ctl_raw("show", "vm1").stdout
        [block] = wait_new_blocks(vm1, blocks, 1)
        vm1.run(f"echo online_movable > /sys/devices/system/memory/{block}/state")
        assert memory_blocks(vm1)[block] == "online"
        # The guest lets go of the memory first (ACPI eject would try too).
        vm1.run(f"echo offline > /sys/devices/system/memory/{block}/state")
        qmp.execute("device_del", id="dimm1")
        qmp.wait_event("DEVICE_DELETED", 60, device="dimm1")
        qmp.execute("object-del", id="mem-dimm1")
        removed = wait_vhost(switch, "vm1", lambda i: i["mem_regs_removed"] == start["mem_regs_removed"] + 1,
                             "REM_MEM_REG for dimm1")
        assert removed["memory_regions"] == start["memory_regions"]
        sent, received = background_ping_result(vm2, "/tmp/ping1", timeout=120)
        print(f"pings while dimm1 came and went: {received}/{sent}")
        assert sent == 400 and received == sent, f"{sent - received} of {sent} pings lost"

        # --- a DIMM the guest's kernel allocates from: its network buffers land there
        add_dimm(qmp, "dimm2", 384)
        wait_vhost(switch, "vm1", lambda i: i["mem_regs_added"] == start["mem_regs_added"] + 2,
                   "ADD_MEM_REG for dimm2")
        new_blocks = wait_new_blocks(vm1, blocks, 3)   # dimm1's block went with it
        for block in new_blocks:
            vm1.run(f"echo online_kernel > /sys/devices/system/memory/{block}/state")
        memfds = qemu_memfds(vm1.process.pid)
        assert 384 * MIB in memfds and BASE_MB * MIB in memfds, memfds
        before = pattern_runs(memfds[384 * MIB])
        out = vm2.run(f"ping -c 600 -i 0.02 -W 2 -s {PAYLOAD} -p {PATTERN:02x} {vm1.address}", timeout=300,
                      check=False)
        match = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
        assert match, out
        sent, received = int(match.group(1)), int(match.group(2))
        assert received == sent == 600, out
        in_dimm = pattern_runs(memfds[384 * MIB]) - before
        print(f"ping payloads found in the hot-added DIMM: {in_dimm}")
        assert in_dimm > 0, "no network buffer of vm1 landed in the hot-added memory"
        for name in ("vm1", "vm2"):
            port = switch.port(name)
            assert port["stats"]["rx_errors"] == port["stats"]["tx_errors"] == 0, port["stats"]
            assert port["vhost"]["mem_faults"] == 0 and port["vhost"]["mem_reg_refused"] == 0
        assert_ping_both_ways(vm1, vm2)
        assert switch.proc.poll() is None
