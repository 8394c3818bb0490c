"""The interop matrix: every virtio path DPDK's virtio-user can pick, looped through vswitchd.

Modeled on DPDK's own vhost test plans (loopback_multi_paths,
loopback_multi_queues, virtio-user server mode): one dpdk-testpmd with two
`net_virtio_user` ports loops frames through two vhost-user ports of
vswitchd (tests/system/test_testpmd.py explains the loop and its counter
checks).  For each combination the loop runs with 64-byte and then with
1518-byte frames (1514 without the FCS) in the same guest session, and after
each run the counters must be exact on both sides: every frame the guest
sent was taken by the switch, the switch delivered what the guest read (at
most a ring's worth more, still in the guest's RX ring), nobody dropped or
erred, every frame came back as long as it left, and both MACs were learned.

* test_virtio_path: ring layout (split, packed) x mrg_rxbuf 0/1 x in_order
  0/1 x vectorized 0/1.  virtio-user prints the Rx/Tx functions it chose
  (init log level info); the test asserts that the negotiated features are
  what the devargs and the switch's offer imply, and the chosen paths are
  printed with the result.
* test_queues_and_server_mode: queues 1, 2, 8 with the switch as vhost-user
  server (virtio-user server=0) and as client (server=1).
"""

from __future__ import annotations

import itertools
import re
import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.testpmd import TestPmd
from tests.system.test_testpmd import (Setup, check_guest, check_switch, connect_guest, delta, print_logs,
                                       run_loop, settle, switch_stats)
from vswitch.native import lib
from vswitch.vhost.protocol import OFFERED_FEATURES

pytestmark = [pytest.mark.system, pytest.mark.dpdk]

# Ethernet frame sizes without the FCS (virtio carries none): 64 and 1518 on a wire.
FRAMES = (60, 1514)
# virtio-user logs its choice of receive and transmit functions at this level.
VIRTIO_INIT_LOG = "--log-level=pmd.net.virtio.init:info"


def path_id(layout: str, mrg: int, in_order: int, vectorized: int) -> str:
    return f"{layout}-mrg{mrg}-inorder{in_order}-vec{vectorized}"


PATHS = {path_id(*combo): combo for combo in itertools.product(("split", "packed"), (0, 1), (0, 1), (0, 1))}


def chosen_paths(guest: TestPmd) -> list[str]:
    """virtio-user's log lines naming the Rx/Tx functions it picked."""
    return sorted(set(re.findall(r"virtio: using [^\n]*", guest.output())))


def offered(bit: int) -> bool:
    return bool(OFFERED_FEATURES >> bit & 1)


def check_features(switch, *, packed: bool, mrg: bool, in_order: bool) -> None:
    """What both vhost-user ports negotiated: each feature the guest asked for, if the switch offers it."""
    want = {"RING_PACKED": (lib.VIRTIO_F_RING_PACKED, packed and offered(lib.VIRTIO_F_RING_PACKED)),
            "MRG_RXBUF": (lib.VIRTIO_NET_F_MRG_RXBUF, mrg and offered(lib.VIRTIO_NET_F_MRG_RXBUF)),
            "IN_ORDER": (lib.VIRTIO_F_IN_ORDER, in_order and offered(lib.VIRTIO_F_IN_ORDER))}
    for port in switch.ctl("show")["ports"]:
        features = int(port["vhost"]["features"], 16)
        for name, (bit, expected) in want.items():
            assert bool(features >> bit & 1) == expected, \
                f"vswitchd port {port['name']} features {features:#x}: {name} should be {expected}"


def loop_each_frame_size(setup: Setup, switch, guest: TestPmd) -> None:
    """Runs the loop once per frame size in one guest session, checking exact counters after each."""
    for run, frame in enumerate(FRAMES):
        if run:
            drain(guest)
        before = settle(lambda: switch_stats(switch))
        guest.clear_port_stats()
        setup.frame = frame
        setup.configure(guest)
        fwd, nic = run_loop(guest)
        check_guest(fwd, nic)
        check_switch(setup, switch, nic, before)


def drain(guest: TestPmd) -> None:
    """Reads and drops the frames the last run left in the loop, so the next one starts empty.

    `stop` leaves a ring's worth of frames in the guest's RX rings, and the
    next `start` would forward them again among the new run's frames.
    """
    guest.cmd("set fwd rxonly")
    guest.start()
    time.sleep(0.5)
    guest.stop()
    guest.cmd("set fwd mac")


def run_matrix_case(tmp_path, devargs: dict) -> tuple[Setup, Vswitchd, TestPmd]:
    setup = Setup(tmp_path, devargs)
    guest = setup.guest()
    guest.argv.insert(guest.argv.index("--"), VIRTIO_INIT_LOG)
    switch = None
    try:
        if setup.guest_is_server:
            # virtio-user blocks in accept() until the switch connects.
            guest.spawn()
        with Vswitchd(tmp_path, ports=setup.ports) as switch:
            connect_guest(setup, switch, guest)
            check_features(switch, packed=bool(devargs.get("packed_vq")), mrg=devargs.get("mrg_rxbuf", True),
                           in_order=devargs.get("in_order", True))
            loop_each_frame_size(setup, switch, guest)
            print("virtio-user chose:", *chosen_paths(guest), sep="\n  ")
            assert guest.quit() == 0
    finally:
        setup.close()
        print_logs(setup, switch)


@pytest.mark.parametrize("combo", PATHS.values(), ids=PATHS.keys())
def test_virtio_path(tmp_path, combo):
    layout, mrg, in_order, vectorized = combo
    run_matrix_case(tmp_path, {"packed_vq": layout == "packed", "mrg_rxbuf": bool(mrg),
                               "in_order": bool(in_order), "vectorized": vectorized})


@pytest.mark.parametrize("server", (0, 1), ids=("switch-server", "switch-client"))
@pytest.mark.parametrize("queues", (1, 2, 8))
def test_queues_and_server_mode(tmp_path, queues, server):
    run_matrix_case(tmp_path, {"queues": queues, "server": bool(server)})
