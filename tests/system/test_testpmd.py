"""DPDK testpmd as a VM-less guest: two virtio-user ports looped through a vhost-user backend.

The guest is one dpdk-testpmd with two `net_virtio_user` ports in MAC
forwarding mode: a frame received on port 0 is sent out of port 1 addressed to
port 0's MAC, and the other way round (`--eth-peer`). Seeded with
`start tx_first`, a fixed number of frames loops forever through the backend,
which learns both source MACs and forwards by destination MAC. The number of
frames in flight is fixed, so a correct backend never drops one, and after
`stop` every frame the guest sent has been received by the backend.

* test_fixture_against_dpdk_vhost: the backend is a second testpmd with DPDK's
  own vhost PMD. It proves the fixture and the counter checks, independent of
  vswitchd.
* test_vswitchd_loop: the backend is vswitchd, once per interesting set of
  virtio-user devargs.
"""

from __future__ import annotations

import time

import pytest

from tests.support.testpmd import TestPmd, vhost_vdev, virtio_user_vdev

pytestmark = [pytest.mark.system, pytest.mark.dpdk]

MAC0 = "02:00:00:00:00:01"
MAC1 = "02:00:00:00:00:02"
# Bursts per stream for `start tx_first`: 2 x 32 frames per queue stays well
# below a 256-entry ring, so no ring can ever overflow in a correct loop.
TX_FIRST = 2
RUN_SECONDS = 3
# virtio-user's default queue_size.
QUEUE_SIZE = 256
# A loop through a working backend on this machine forwards millions of frames
# a second; this only proves frames kept flowing, not performance.
MIN_RX = 1000
GUEST_ERROR_COUNTERS = ("rx_missed", "rx_errors", "rx_nombuf", "tx_errors")
SWITCH_ERROR_COUNTERS = ("rx_dropped", "tx_dropped", "rx_errors", "tx_errors")


def guest_args(queues: int) -> list[str]:
    """testpmd arguments for the looping guest."""
    args = ["--forward-mode=mac", f"--eth-peer=0,{MAC1}", f"--eth-peer=1,{MAC0}"]
    if queues > 1:
        args += [f"--rxq={queues}", f"--txq={queues}"]
    return args


def settle(read, timeout: float = 5.0, interval: float = 0.3):
    """Read counters until two reads in a row agree (the backend drained its queues)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    return last


def run_loop(guest: TestPmd) -> tuple[dict, dict]:
    """Seed the loop, let it run, stop it; returns (forward stats, NIC stats) of the guest."""
    guest.start(tx_first=TX_FIRST)
    time.sleep(RUN_SECONDS)
    fwd = guest.stop()
    nic = guest.port_stats()
    return fwd, nic


def check_guest(fwd: dict, nic: dict) -> None:
    """Frames kept looping on both ports and the guest lost none."""
    assert set(fwd) == {0, 1} and set(nic) == {0, 1}, f"testpmd stats for ports {sorted(fwd)} / {sorted(nic)}"
    for port in (0, 1):
        assert fwd[port]["rx_packets"] > MIN_RX, f"port {port} received only {fwd[port]['rx_packets']} frames"
        assert fwd[port]["rx_dropped"] == 0, f"testpmd port {port} rx-dropped: {fwd[port]}"
        assert fwd[port]["tx_dropped"] == 0, f"testpmd port {port} tx-dropped: {fwd[port]}"
        for counter in GUEST_ERROR_COUNTERS:
            assert nic[port].get(counter, 0) == 0, f"testpmd port {port} {counter}: {nic[port]}"


def check_backend_counters(nic: dict, backend: dict, ring: int) -> None:
    """The backend's counters agree with the guest's.

    `backend` maps the guest's port number to the backend's rx/tx packet
    counts on the port it is attached to. Every frame the guest sent was taken
    by the backend (exact), and the backend delivered at least what the guest
    read, at most a ring's worth more: those frames sit in the guest's RX ring
    because the guest stopped reading.
    """
    for port in (0, 1):
        sent, taken = nic[port]["tx_packets"], backend[port]["rx_packets"]
        assert taken == sent, f"port {port}: the guest sent {sent} frames, the backend received {taken}"
        read, delivered = nic[port]["rx_packets"], backend[port]["tx_packets"]
        assert read <= delivered <= read + ring, \
            f"port {port}: the backend delivered {delivered} frames, the guest read {read} (ring {ring})"


def test_fixture_against_dpdk_vhost(tmp_path):
    """The TestPmd fixture loops frames through DPDK's own vhost backend with consistent counters."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    # The backend runs its forwarding lcore on core 1, the guest on core 0.
    backend = TestPmd([vhost_vdev(0, a), vhost_vdev(1, b)],
                      ["--forward-mode=io", "--disable-link-check"],
                      main_lcore=0, log_path=tmp_path / "vhost-testpmd.log")
    guest = TestPmd([virtio_user_vdev(0, a, mac=MAC0), virtio_user_vdev(1, b, mac=MAC1)],
                    guest_args(1), main_lcore=1, log_path=tmp_path / "guest-testpmd.log")
    with backend:
        backend.start()
        with guest:
            fwd, nic = run_loop(guest)
            check_guest(fwd, nic)
            stats = settle(backend.port_stats)
            check_backend_counters(nic, stats, QUEUE_SIZE)
            assert guest.quit() == 0
        backend.stop()
        assert backend.quit() == 0


# ---------------------------------------------------------------------------
# vswitchd

VARIANTS = {
    "default": {},
    "mrg_rxbuf=0": {"mrg_rxbuf": False},
    "in_order=0": {"in_order": False},
    "queues=2": {"queues": 2},
    "server=1": {"server": True},
}


def switch_ports(tmp_path, queues: int, client: bool) -> list[dict]:
    return [{"name": name, "type": "vhost-user", "path": str(tmp_path / f"{name}.sock"),
             "mode": "client" if client else "server", "queues": queues}
            for name in ("vm1", "vm2")]


def switch_stats(switch) -> dict[str, dict]:
    return {port["name"]: port["stats"] for port in switch.ctl("show")["ports"]}


def wait_links_up(switch, names, timeout: float = 15.0) -> None:
    """Wait until vswitchd reports every named port's link up."""
    deadline = time.monotonic() + timeout
    while True:
        ports = {p["name"]: p for p in switch.ctl("show")["ports"]}
        down = [n for n in names if n not in ports or ports[n].get("link") not in ("up", True)]
        if not down:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"vswitchd ports {down} not up after {timeout}s: {ports}")
        time.sleep(0.2)


def log_tail(path, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as log:
            return f"--- last lines of {path} ---\n" + "".join(log.readlines()[-lines:])
    except OSError as exc:
        return f"--- {path}: {exc} ---"


@pytest.mark.parametrize("devargs", VARIANTS.values(), ids=VARIANTS.keys())
def test_vswitchd_loop(tmp_path, devargs):
    """Frames loop guest -> vswitchd -> guest without loss, counters agree, and both MACs are learned."""
    from tests.support.daemon import Vswitchd

    queues = devargs.get("queues", 1)
    server = devargs.get("server", False)
    ports = switch_ports(tmp_path, queues, client=server)
    guest = TestPmd([virtio_user_vdev(i, port["path"], mac=mac, **devargs)
                     for i, (port, mac) in enumerate(zip(ports, (MAC0, MAC1)))],
                    guest_args(queues), main_lcore=1, log_path=tmp_path / "guest-testpmd.log")
    switch = None
    try:
        if server:
            # virtio-user owns the sockets and blocks in accept() until the switch connects.
            guest.spawn()
        with Vswitchd(tmp_path, ports=ports) as switch:
            if server:
                guest.wait_ready()
            else:
                guest.spawn().wait_ready()
            wait_links_up(switch, ["vm1", "vm2"])

            fwd, nic = run_loop(guest)
            check_guest(fwd, nic)

            stats = settle(lambda: switch_stats(switch))
            for name, counters in stats.items():
                for counter in SWITCH_ERROR_COUNTERS:
                    assert counters[counter] == 0, f"vswitchd port {name} {counter}: {counters}"
            check_backend_counters(nic, {0: stats["vm1"], 1: stats["vm2"]}, QUEUE_SIZE * queues)

            learned = {e["mac"].lower(): e["port"] for e in switch.ctl("fdb", "show")["entries"]}
            assert learned.get(MAC0) == "vm1", f"{MAC0} should be learned on vm1: {learned}"
            assert learned.get(MAC1) == "vm2", f"{MAC1} should be learned on vm2: {learned}"

            assert guest.quit() == 0
    finally:
        guest.close()
        # Shown by pytest only when the test fails.
        print(log_tail(guest.log_path))
        if switch is not None:
            print(log_tail(switch.log_path))
