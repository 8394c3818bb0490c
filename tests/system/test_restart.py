"""vswitchd killed with SIGKILL and started again: the front-ends resume with no action on their side.

A restarted back-end meets rings that are mid-flight: the guest's used index
says how far the dead switch got, while the front-end's SET_VRING_BASE may
say something else (DPDK virtio-user sends 0 on every reconnect).  The
switch resumes each ring from the used index in guest memory, as DPDK's
vhost library does, and counts it.

* test_testpmd_resumes_after_switch_crash: DPDK testpmd with two
  virtio-user ports (server=1), the switch in client mode.  The loop of
  frames survives the crash: a frame the dead switch had taken but not
  returned is still in the guest's TX ring and is taken again, so nothing
  needs re-seeding (a frame may be duplicated, none lost).
* test_testpmd_packed_reconnects_after_switch_crash: the same with packed
  rings (packed_vq=1).  virtio-user resets its packed rings when it
  reconnects (DPDK has no way to resume them without inflight tracking), so
  the frames in flight are gone: the switch must start the rings fresh, and
  a loop seeded again is exact.
* test_qemu_guests_resume_after_switch_crash: two QEMU guests (chardev
  server=on) ping each other; vm1 keeps pinging across the restart.

Both print the time from the restart to the first forwarded frame (goal:
under 2 s) and assert a generous bound, since this machine is shared.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.system.test_testpmd import (MIN_RX, TX_FIRST, Setup, check_guest, check_switch, print_logs,
                                       run_loop, settle, switch_stats)
from vswitch.control.cli import ControlError, call

pytestmark = [pytest.mark.system]

# The goal is 2 s; the bound is generous because two cores are shared by many processes.
RESTART_GOAL = 2.0
RESTART_BOUND = 20.0
# vm1 pings every 0.1 s across the QEMU restart: well past RESTART_BOUND.
PINGS_ACROSS = 250


def port_stats(switch: Vswitchd) -> dict[str, dict]:
    """Counters per port, straight from the control socket (no vswitchctl process per poll)."""
    return {p["name"]: p for p in call(switch.control_socket, "port/show")["ports"]}


def wait_first_forwarded(switch: Vswitchd, started: float, names: list[str],
                         timeout: float = RESTART_BOUND + 10) -> float:
    """Seconds from `started` until the switch has delivered a frame to each named port."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            ports = port_stats(switch)
        except ControlError:
            ports = {}
        if ports and all(ports[n]["stats"]["tx_packets"] > 0 for n in names):
            return time.monotonic() - started
        time.sleep(0.01)
    pytest.fail(f"no frame forwarded to {names} within {timeout:.0f} s of the restart: "
                f"{ {n: p['stats'] for n, p in port_stats(switch).items()} }\n{switch.log()[-3000:]}")


def assert_rings_healthy(switch: Vswitchd, names: list[str]) -> None:
    """No ring stopped and no chain refused since the restart."""
    for name, port in port_stats(switch).items():
        if name not in names:
            continue
        for q in port["queue_stats"]:
            assert not q["broken"] and q["errors"] == 0, f"port {name} vring {q['vring']}: {q}"
        stats = port["stats"]
        assert stats["rx_errors"] == 0 and stats["tx_errors"] == 0, f"port {name}: {stats}"


def resumed_rings(switch: Vswitchd, name: str) -> int:
    """How many ring starts of the port took their indexes from the used ring."""
    return sum(r["resumed_from_used"] for r in port_stats(switch)[name]["vhost"]["rings"])


def report(what: str, seconds: float) -> None:
    verdict = "within" if seconds < RESTART_GOAL else "OVER"
    print(f"\n{what}: restart to first forwarded frame {seconds:.2f} s ({verdict} the {RESTART_GOAL:.0f} s goal)")


@pytest.mark.dpdk
def test_testpmd_resumes_after_switch_crash(tmp_path):
    """kill -9 of the switch (client mode) while testpmd (server=1) forwards; a new switch resumes
    the rings where they stopped, and the next loop is exact."""
    setup = Setup(tmp_path, {"server": True})
    guest = setup.guest()
    switch = Vswitchd(tmp_path, ports=setup.ports)
    try:
        start_forwarding(guest, switch)

        # Mid-flight: frames in the rings, used entries being written.  No frame is lost with
        # the switch: one it had taken but not returned is still in the guest's TX ring, and the
        # new switch takes it again from the used index.  So the loop goes on by itself.
        switch.kill()
        started = time.monotonic()
        switch.start()
        seconds = wait_first_forwarded(switch, started, ["vm1", "vm2"])
        report("testpmd (virtio-user server=1)", seconds)
        assert seconds < RESTART_BOUND

        # Traffic keeps flowing, and no ring was stopped as hostile.
        time.sleep(2)
        resumed = switch_stats(switch)
        assert all(resumed[n]["tx_packets"] > MIN_RX for n in ("vm1", "vm2")), resumed
        assert_rings_healthy(switch, ["vm1", "vm2"])
        assert resumed_rings(switch, "vm1") > 0 and resumed_rings(switch, "vm2") > 0
        assert "resuming from the used index" in switch.log()

        # Counters consistent: a fresh loop through the restarted switch loses nothing.
        guest.stop()
        exact_loop(setup, guest, switch)
    finally:
        setup.close()
        switch.stop()
        print_logs(setup, switch)


@pytest.mark.dpdk
def test_testpmd_packed_reconnects_after_switch_crash(tmp_path):
    """kill -9 of the switch (client mode) while testpmd (server=1, packed_vq=1) forwards; the new
    switch starts the reset packed rings, and a loop seeded again is exact on both sides."""
    setup = Setup(tmp_path, {"server": True, "packed_vq": True})
    guest = setup.guest()
    switch = Vswitchd(tmp_path, ports=setup.ports)
    try:
        start_forwarding(guest, switch)

        switch.kill()
        switch.start()
        wait_links_up(switch, ["vm1", "vm2"])
        guest.stop()
        exact_loop(setup, guest, switch)
    finally:
        setup.close()
        switch.stop()
        print_logs(setup, switch)


def start_forwarding(guest, switch: Vswitchd) -> None:
    """Starts the guest (virtio-user blocks in accept() until the switch connects) and the switch,
    and lets the guest's loop run until both ports have forwarded plenty."""
    guest.spawn()
    switch.start()
    guest.wait_ready()
    wait_links_up(switch, ["vm1", "vm2"])
    guest.start(tx_first=TX_FIRST)
    time.sleep(2)
    before_crash = switch_stats(switch)
    assert all(before_crash[n]["tx_packets"] > MIN_RX for n in ("vm1", "vm2")), before_crash


def exact_loop(setup, guest, switch: Vswitchd) -> None:
    """Drops what is left in the guest's receive rings (rxonly for a moment) so that a fresh loop
    starts empty, runs it, and checks both sides' counters are exact."""
    guest.cmd("set fwd rxonly")
    guest.start()
    time.sleep(0.5)
    guest.stop()
    guest.cmd("set fwd mac")
    before = settle(lambda: switch_stats(switch))
    guest.clear_port_stats()
    fwd, nic = run_loop(guest)
    check_guest(fwd, nic)
    check_switch(setup, switch, nic, before)
    assert_rings_healthy(switch, ["vm1", "vm2"])
    assert guest.quit() == 0


def wait_links_up(switch: Vswitchd, names: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ports = port_stats(switch)
        except ControlError:
            ports = {}
        if ports and all(ports[n]["link"] in ("up", True) for n in names):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"links {names} not up within {timeout:.0f} s\n{switch.log()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.qemu
def test_qemu_guests_resume_after_switch_crash(tmp_path):
    """kill -9 of the switch (client mode) while two QEMU guests (server=on) ping; a new switch
    connects, the guests' rings resume, and they ping both ways with no loss."""
    from tests.system import test_qemu_guests as q

    kit = q._built_kit()
    with q.diagnostics(tmp_path), contextlib.ExitStack() as stack:
        vm1, vm2 = (q.make_guest(name, tmp_path, kit, qemu_server=True) for name in q.GUESTS)
        switch = Vswitchd(tmp_path, ports=q.switch_ports(tmp_path, client=True))
        stack.callback(switch.stop)
        switch.start()
        q.boot([vm1, vm2], stack)
        q.wait_links(switch, list(q.GUESTS))
        q.assert_ping_both_ways(vm1, vm2)

        # Frames keep coming across the restart: vm1 pings on (in the foreground of its console,
        # from a thread here) for longer than the restart may take.
        pings: list[tuple[int, int]] = []
        pinger = threading.Thread(target=lambda: pings.append(vm1.ping(vm2.address, count=PINGS_ACROSS, interval=0.1)))
        pinger.start()
        time.sleep(1)
        switch.kill()
        # A moment without a back-end: QEMU sees the socket close and stops its vhost device.
        time.sleep(1)

        started = time.monotonic()
        switch.start()
        seconds = wait_first_forwarded(switch, started, ["vm1", "vm2"])
        report("QEMU (chardev server=on)", seconds)
        assert seconds < RESTART_BOUND
        pinger.join()
        sent, received = pings[0]
        print(f"pings across the restart: {received} of {sent} answered")
        assert received > 0

        q.wait_links(switch, list(q.GUESTS))
        q.assert_ping_both_ways(vm1, vm2)
        assert_rings_healthy(switch, ["vm1", "vm2"])
        learned = {e["mac"].lower(): e["port"] for e in switch.ctl("fdb", "show")["entries"]}
        assert learned.get(vm1.mac) == "vm1" and learned.get(vm2.mac) == "vm2", f"fdb: {learned}"
