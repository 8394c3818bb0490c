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

import os
import time

import pytest

from tests.support.testpmd import TestPmd, vhost_vdev, virtio_user_vdev
from vswitch.vhost.protocol import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED

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

# virtio-user devargs per variant; "frame" is not a devarg but the length of
# the frames tx_first seeds the loop with (default 64).
VARIANTS = {
    "default": {},
    "mrg_rxbuf=0": {"mrg_rxbuf": False},
    "in_order=0": {"in_order": False},
    "queues=2": {"queues": 2},
    "server=1": {"server": True},
    "queue_size=1024": {"queue_size": 1024},
    # Packed rings, on every path of virtio-user's packed ring.
    "packed_vq=1": {"packed_vq": True},
    "packed_vq=1,in_order=0": {"packed_vq": True, "in_order": False},
    "packed_vq=1,mrg_rxbuf=0": {"packed_vq": True, "mrg_rxbuf": False},
    "packed_vq=1,in_order=0,mrg_rxbuf=0": {"packed_vq": True, "in_order": False, "mrg_rxbuf": False},
    "packed_vq=1,queues=2": {"packed_vq": True, "queues": 2},
    "packed_vq=1,server=1": {"packed_vq": True, "server": True},
    "packed_vq=1,frame=1514": {"packed_vq": True, "frame": 1514},
    "frame=1514": {"frame": 1514},
}


class Setup:
    """The switch ports and the guest for one variant."""

    def __init__(self, tmp_path, variant: dict, port_features: dict | None = None):
        self.tmp_path = tmp_path
        # The ports' `features:` key: what the switch does not offer.
        self.port_features = port_features or {}
        self.devargs = {k: v for k, v in variant.items() if k != "frame"}
        self.frame = variant.get("frame")
        self.queues = self.devargs.get("queues", 1)
        # With server=1 virtio-user owns the sockets and the switch connects as a client.
        self.guest_is_server = bool(self.devargs.get("server"))
        self.ring = self.devargs.get("queue_size", QUEUE_SIZE) * self.queues
        self.ports = [{"name": name, "type": "vhost-user", "path": str(tmp_path / f"{name}.sock"),
                       "mode": "client" if self.guest_is_server else "server", "queues": self.queues,
                       **({"features": self.port_features} if self.port_features else {})}
                      for name in ("vm1", "vm2")]
        self.guests: list[TestPmd] = []

    def guest(self) -> TestPmd:
        """A new (not yet spawned) guest testpmd; closed by close()."""
        log = self.tmp_path / f"guest-testpmd-{len(self.guests)}.log"
        vdevs = [virtio_user_vdev(i, port["path"], mac=mac, **self.devargs)
                 for i, (port, mac) in enumerate(zip(self.ports, (MAC0, MAC1)))]
        self.guests.append(TestPmd(vdevs, guest_args(self.queues), main_lcore=1, log_path=log))
        return self.guests[-1]

    def configure(self, guest: TestPmd) -> None:
        if self.frame:
            # tx_first builds its frames like txonly mode: 14-byte header + payload.
            guest.cmd(f"set txpkts {self.frame}")

    def close(self) -> None:
        for guest in self.guests:
            guest.close()


def switch_stats(switch) -> dict[str, dict]:
    return {port["name"]: port["stats"] for port in switch.ctl("show")["ports"]}


def wait_links(switch, names, up: bool = True, timeout: float = 15.0) -> None:
    """Wait until vswitchd reports every named port's link up (or down)."""
    deadline = time.monotonic() + timeout
    while True:
        ports = {p["name"]: p for p in switch.ctl("show")["ports"]}
        pending = [n for n in names if n not in ports or (ports[n].get("link") in ("up", True)) != up]
        if not pending:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"vswitchd ports {pending} not {'up' if up else 'down'} after {timeout}s: "
                        f"{ {n: p.get('link') for n, p in ports.items()} }")
        time.sleep(0.2)


def connect_guest(setup: Setup, switch, guest: TestPmd) -> None:
    """Start a guest against a running switch and wait until both sides see the link."""
    if not guest.alive():
        guest.spawn()
    guest.wait_ready()
    setup.configure(guest)
    wait_links(switch, ["vm1", "vm2"])


def delta(after: dict, before: dict) -> dict:
    return {name: {k: v - before.get(name, {}).get(k, 0) for k, v in counters.items()}
            for name, counters in after.items()}


def check_switch(setup: Setup, switch, nic: dict, before: dict | None = None) -> None:
    """vswitchd lost nothing, its counters match the guest's, and it learned both MACs."""
    stats = settle(lambda: switch_stats(switch))
    if before is not None:
        stats = delta(stats, before)
    for name, counters in stats.items():
        for counter in SWITCH_ERROR_COUNTERS:
            assert counters[counter] == 0, f"vswitchd port {name} {counter}: {counters}"
    check_backend_counters(nic, {0: stats["vm1"], 1: stats["vm2"]}, setup.ring)
    if setup.frame:
        for port in (0, 1):
            assert nic[port]["rx_bytes"] == nic[port]["rx_packets"] * setup.frame, \
                f"port {port} should have received only {setup.frame}-byte frames: {nic[port]}"
    # virtio-user asks for IN_ORDER unless in_order=0, and the switch offers it unless told not to.
    want_in_order = setup.devargs.get("in_order", True) and setup.port_features.get("in_order", True)
    want_packed = setup.devargs.get("packed_vq", False) and setup.port_features.get("packed", True)
    for port in switch.ctl("show")["ports"]:
        features = int(port["vhost"]["features"], 16)
        assert bool(features >> VIRTIO_F_IN_ORDER & 1) == want_in_order, \
            f"vswitchd port {port['name']} features {features:#x}: IN_ORDER should be {want_in_order}"
        assert bool(features >> VIRTIO_F_RING_PACKED & 1) == want_packed, \
            f"vswitchd port {port['name']} features {features:#x}: RING_PACKED should be {want_packed}"
        layouts = {ring["layout"] for ring in port["vhost"]["rings"] if ring["enabled"]}
        assert layouts == {"packed" if want_packed else "split"}, f"vswitchd port {port['name']} rings {layouts}"
    learned = {e["mac"].lower(): e["port"] for e in switch.ctl("fdb", "show")["entries"]}
    assert learned.get(MAC0) == "vm1", f"{MAC0} should be learned on vm1: {learned}"
    assert learned.get(MAC1) == "vm2", f"{MAC1} should be learned on vm2: {learned}"


def print_logs(setup: Setup, switch) -> None:
    """Shown by pytest only when the test fails."""
    for guest in setup.guests:
        print(log_tail(guest.log_path))
    if switch is not None:
        print(log_tail(switch.log_path, 100))


def log_tail(path, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as log:
            return f"--- last lines of {path} ---\n" + "".join(log.readlines()[-lines:])
    except OSError as exc:
        return f"--- {path}: {exc} ---"


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_vswitchd_loop(tmp_path, variant):
    """Frames loop guest -> vswitchd -> guest without loss, counters agree, and both MACs are learned."""
    from tests.support.daemon import Vswitchd

    setup = Setup(tmp_path, variant)
    guest = setup.guest()
    switch = None
    try:
        if setup.guest_is_server:
            # virtio-user blocks in accept() until the switch connects.
            guest.spawn()
        with Vswitchd(tmp_path, ports=setup.ports) as switch:
            connect_guest(setup, switch, guest)
            fwd, nic = run_loop(guest)
            check_guest(fwd, nic)
            check_switch(setup, switch, nic)
            assert guest.quit() == 0
    finally:
        setup.close()
        print_logs(setup, switch)


@pytest.mark.parametrize("variant", [VARIANTS["default"], VARIANTS["server=1"], VARIANTS["packed_vq=1"],
                                     VARIANTS["packed_vq=1,in_order=0,mrg_rxbuf=0"], VARIANTS["packed_vq=1,server=1"]],
                         ids=["switch-server", "switch-client", "packed-switch-server", "packed-in_order=0-mrg_rxbuf=0",
                              "packed-switch-client"])
def test_vswitchd_guest_restart(tmp_path, variant):
    """A guest killed without warning comes back: the switch accepts (or reconnects to) a new one.

    The switch keeps its ports, takes the new guest's memory and rings, and the
    second loop is as clean as the first; counters keep counting across the
    reconnect (checked as differences).
    """
    from tests.support.daemon import Vswitchd

    setup = Setup(tmp_path, variant)
    first = setup.guest()
    switch = None
    try:
        if setup.guest_is_server:
            first.spawn()
        with Vswitchd(tmp_path, ports=setup.ports) as switch:
            connect_guest(setup, switch, first)
            check_guest(*run_loop(first))

            # Killed while frames loop through the switch: an abrupt end, as when a VM crashes.
            first.start(tx_first=TX_FIRST)
            time.sleep(1)
            first.kill()
            wait_links(switch, ["vm1", "vm2"], up=False)
            if setup.guest_is_server:
                # A crashed server leaves its socket files behind; a restarted one replaces them.
                for port in setup.ports:
                    os.unlink(port["path"])
            before = settle(lambda: switch_stats(switch))

            second = setup.guest()
            connect_guest(setup, switch, second)
            fwd, nic = run_loop(second)
            check_guest(fwd, nic)
            check_switch(setup, switch, nic, before)
            assert second.quit() == 0
    finally:
        setup.close()
        print_logs(setup, switch)


def test_vswitchd_loop_with_features_turned_off(tmp_path):
    """Ports configured with `features: {mrg_rxbuf: false, in_order: false}`: virtio-user, which
    would take both, negotiates without them, `show` names what was offered and negotiated, and
    frames loop without loss with counters exact on both sides."""
    from tests.support.daemon import Vswitchd
    from vswitch.vhost.protocol import VIRTIO_NET_F_MRG_RXBUF

    setup = Setup(tmp_path, {}, port_features={"mrg_rxbuf": False, "in_order": False})
    guest = setup.guest()
    switch = None
    try:
        with Vswitchd(tmp_path, ports=setup.ports) as switch:
            connect_guest(setup, switch, guest)
            fwd, nic = run_loop(guest)
            check_guest(fwd, nic)
            check_switch(setup, switch, nic)
            for port in switch.ctl("show")["ports"]:
                vhost = port["vhost"]
                assert not int(vhost["features"], 16) >> VIRTIO_NET_F_MRG_RXBUF & 1, vhost["features"]
                for name in ("mrg_rxbuf", "in_order"):
                    assert name not in vhost["offered_feature_names"], vhost
                    assert name not in vhost["negotiated_feature_names"], vhost
                assert "version_1" in vhost["negotiated_feature_names"], vhost
            text = switch.ctl_raw("show").stdout
            assert "port vm1: mtu 1500, turned off: in_order mrg_rxbuf" in text, text
            negotiated = text.split("port vm1:")[1].split("negotiated:")[1].split("\n")[0].split()
            assert "version_1" in negotiated and "mrg_rxbuf" not in negotiated, text
            assert guest.quit() == 0
    finally:
        setup.close()
        print_logs(setup, switch)
