"""PMD threads: statistics, and receive queues spread over several pinned threads."""

from __future__ import annotations

import os

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac


def test_two_pmd_threads_split_the_queues_and_both_forward(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock"), "queues": 2}
             for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, extra={"pmd": {"cpus": cpus}}) as d:
        guests = d.connect_guests(["vm0", "vm1"], queues=2, rx_buffers=64)
        pmds = d.ctl("pmd-stats")["pmds"]
        assert [p["cpu"] for p in pmds] == cpus
        polled = [(q["port"], q["queue"]) for p in pmds for q in p["rx_queues"]]
        # Every receive queue is polled by exactly one thread, and both threads have work.
        assert sorted(polled) == [("vm0", 0), ("vm0", 1), ("vm1", 0), ("vm1", 1)]
        assert all(p["rx_queues"] for p in pmds)
        guests[1].send_frame(0, frame(BROADCAST, mac(2)))  # vm1's MAC is learned
        guests[1].receive(0, 1, timeout=0.2)
        for q in range(2):
            for _ in range(10):
                guests[0].send_frame(q, frame(mac(2), mac(1)))
        got = [len(guests[1].receive(q, 10, timeout=2)) for q in range(2)]
        assert got == [10, 10]
        pmds = d.ctl("pmd-stats")["pmds"]
        assert all(p["packets"] > 0 for p in pmds), pmds
        for fe in guests:
            fe.close()


def test_pmd_stats_human_and_json(tmp_path):
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports) as d:
        guests = d.connect_guests(["vm0", "vm1"], rx_buffers=64)
        for _ in range(64):
            guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(0, 64, timeout=2)) == 64
        [p] = d.ctl("pmd-stats")["pmds"]
        assert p["packets"] == 64 and p["busy_cycles"] > 0
        assert p["cycles_per_packet"] == round(p["busy_cycles"] / 64, 1)
        assert 1 <= p["packets_per_burst"] <= 32
        assert p["rx_queues"] == [{"port": "vm0", "queue": 0}, {"port": "vm1", "queue": 0}]
        text = d.ctl_raw("pmd-stats").stdout
        assert "pmd thread 0 (cpu any), polling: vm0/0, vm1/0" in text
        assert "cycles/packet (busy):" in text and "packets/burst:" in text
        for fe in guests:
            fe.close()
