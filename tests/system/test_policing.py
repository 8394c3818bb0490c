"""Ingress policing holds its rate: DPDK testpmd in txonly mode floods a
vhost-user port as fast as it can, the port is policed, and what leaves the
switch (counted exactly by a null port) stays within 5% of the limit, set and
changed at run time."""

from __future__ import annotations

import time

import pytest

from tests.support.daemon import Vswitchd
from tests.support.testpmd import TestPmd, virtio_user_vdev
from tests.system.test_testpmd import log_tail, wait_links
from vswitch.control.cli import call

pytestmark = [pytest.mark.system, pytest.mark.dpdk]

WINDOW = 5.0          # seconds each rate is measured over
SETTLE = 1.0          # after a change: the bucket's first (full) burst is not in the window
TOLERANCE = 0.05
MAX_LIMIT_PPS = 10_000    # the highest packet rate a limit below lets through (4 Mbit/s of 60-byte frames: 8.3k)


def counters(switch: Vswitchd, name: str) -> tuple[float, dict]:
    """A port's counters and when they were read (the middle of the call)."""
    before = time.monotonic()
    stats = call(switch.control_socket, "port/show", {"name": name})["ports"][0]["stats"]
    return (before + time.monotonic()) / 2, stats


def measure(switch: Vswitchd) -> tuple[float, float, int]:
    """Frames and bits per second the sink got over WINDOW, and the source's policing drops meanwhile."""
    time.sleep(SETTLE)
    _, src0 = counters(switch, "src")
    t0, sink0 = counters(switch, "sink")
    time.sleep(WINDOW)
    t1, sink1 = counters(switch, "sink")
    _, src1 = counters(switch, "src")
    seconds = t1 - t0
    return ((sink1["tx_packets"] - sink0["tx_packets"]) / seconds,
            (sink1["tx_bytes"] - sink0["tx_bytes"]) * 8 / seconds,
            src1["police_dropped"] - src0["police_dropped"])


def within(measured: float, limit: float) -> bool:
    return abs(measured - limit) <= TOLERANCE * limit


@pytest.mark.parametrize("frame", [60, 1000])
def test_policing_holds_the_rate_within_5_percent(tmp_path, frame):
    ports = [{"name": "src", "type": "vhost-user", "path": str(tmp_path / "src.sock")},
             {"name": "sink", "type": "null"}]
    guest = TestPmd([virtio_user_vdev(0, tmp_path / "src.sock", mac="02:00:00:00:00:01")],
                    ["--forward-mode=txonly", f"--txpkts={frame}"], log_path=tmp_path / "testpmd.log")
    switch = None
    try:
        with Vswitchd(tmp_path, ports=ports, log_level="info") as switch:
            guest.spawn().wait_ready()
            wait_links(switch, ["src"])
            guest.start()
            pps, _, dropped = measure(switch)
            # The limits below are well under what even a busy host offers.
            assert dropped == 0 and pps > 2 * MAX_LIMIT_PPS, f"unpoliced, the generator offers only {pps:.0f} pps"
            offered = pps

            results = []
            for flags, limit, unit in ((["--pps", "10k"], 10_000, "pps"),
                                       (["--bps", "4M"], 4e6, "bps"),
                                       (["--pps", "2k", "--bps", "1G"], 2_000, "pps")):
                reply = switch.ctl("set", "port", "src", "policing", *flags)
                assert reply["policing"][unit] == limit
                pps, bps, dropped = measure(switch)
                got = pps if unit == "pps" else bps
                results.append(f"{' '.join(flags)}: {pps:.0f} pps, {bps / 1e6:.1f} Mbit/s")
                print(f"{frame}-byte frames, offered {offered:.0f} pps, policed {results[-1]}")
                assert within(got, limit), f"policing {' '.join(flags)}: measured {got:.0f} {unit}"
                assert dropped > 0, "the generator offered more than the limit: some must have been dropped"

            switch.ctl("set", "port", "src", "policing", "none")
            pps, _, dropped = measure(switch)
            assert switch.port("src")["policing"] is None
            # Whatever the generator manages on a busy host, it is well above the last limit (2k).
            assert dropped == 0 and pps > 3 * 2_000, f"policing removed, yet only {pps:.0f} pps"
            guest.stop()
    finally:
        print(log_tail(guest.log_path))
        if switch is not None:
            print(log_tail(switch.log_path, 60))
        guest.close()
