"""An idle switch sleeps on its guests' kick eventfds instead of burning a core."""

from __future__ import annotations

import sys
import time

import psutil

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac

IDLE_SECONDS = int(__import__("os").environ.get("IDLE_SECONDS", 10))
MAX_CPU_PERCENT = 2.0


def test_idle_guests_cost_under_2_percent_and_the_first_frame_is_prompt(tmp_path):
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, log_level="info") as d:
        guests = d.connect_guests(["vm0", "vm1"])
        # Some traffic first, so the PMD has been busy and must back off again.
        for n in range(20):
            guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(0, 20, timeout=2)) == 20

        proc = psutil.Process(d.proc.pid)
        time.sleep(1)
        proc.cpu_percent(None)
        time.sleep(IDLE_SECONDS)
        cpu = proc.cpu_percent(None)
        print(f"vswitchd idle CPU over {IDLE_SECONDS} s: {cpu:.2f}% of one core")
        assert cpu < MAX_CPU_PERCENT

        # The first frame after the long idle period: the kick wakes the PMD.
        start = time.monotonic()
        guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        got = guests[1].receive(0, 1, timeout=2)
        latency = time.monotonic() - start
        print(f"first frame after idle forwarded in {latency * 1000:.1f} ms")
        assert len(got) == 1 and latency < 0.05, (d.ctl("pmd-stats"), d.ctl("show"))
        stats = d.ctl("pmd-stats")["pmds"][0]
        assert stats["kick_wakeups"] >= 1 and stats["sleeps"] >= 1
        for fe in guests:
            fe.close()


def test_pmd_sleep_false_keeps_the_idle_pmd_polling(tmp_path):
    """`pmd: {sleep: false}`: the always-polling case the latency benchmark compares with."""
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, extra={"pmd": {"sleep": False}}) as d:
        guests = d.connect_guests(["vm0", "vm1"])
        guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(0, 1, timeout=2)) == 1
        before = d.ctl("pmd-stats")["pmds"][0]
        time.sleep(0.5)   # 500 times the linger before an idle PMD sleeps
        after = d.ctl("pmd-stats")["pmds"][0]
        assert after["poll_only"] and after["sleeps"] == before["sleeps"] == 0, after
        assert after["loops"] - before["loops"] > 1000, "the PMD should have kept polling"
        guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(0, 1, timeout=2)) == 1
        for fe in guests:
            fe.close()


def _shares(tmp_path, pmd: dict, seconds: float = 2.0) -> tuple[float, float, dict]:
    """CPU seconds of an idle, never-sleeping vswitchd and of a busy loop
    pinned to the same CPU, over the same window; and the PMD's stats."""
    tmp_path.mkdir()
    cpu = max(psutil.Process().cpu_affinity())
    ports = [{"name": "vm0", "type": "vhost-user", "path": str(tmp_path / "vm0.sock")}]
    with Vswitchd(tmp_path, ports=ports, extra={"pmd": {"cpus": [cpu], "sleep": False, **pmd}}) as d:
        spinner = psutil.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
        try:
            switch = psutil.Process(d.proc.pid)
            time.sleep(0.3)
            s0, w0 = sum(spinner.cpu_times()[:2]), sum(switch.cpu_times()[:2])
            time.sleep(seconds)
            s1, w1 = sum(spinner.cpu_times()[:2]), sum(switch.cpu_times()[:2])
        finally:
            spinner.kill()
            spinner.wait()
        return s1 - s0, w1 - w0, d.ctl("pmd-stats")["pmds"][0]


def test_pmd_yield_gives_the_cpu_to_a_thread_that_shares_it(tmp_path):
    """`pmd: {yield: true}`: after each light pass the PMD calls sched_yield(),
    so another busy thread on its CPU gets most of it, where without it the
    two split the CPU about evenly (the case of two switches' PMDs on one
    CPU, tools/bench.py's vxlan topology)."""
    spin, switch, stats = _shares(tmp_path / "yield", {"yield": True})
    print(f"yield: busy loop {spin:.2f} s, vswitchd {switch:.2f} s CPU")
    assert stats["yield"] and stats["yields"] > 1000, stats
    assert spin > 3 * switch, (spin, switch)
    spin, switch, stats = _shares(tmp_path / "spin", {})
    print(f"no yield: busy loop {spin:.2f} s, vswitchd {switch:.2f} s CPU")
    assert not stats["yield"] and stats["yields"] == 0, stats
    assert switch > spin / 3, (spin, switch)


def test_pmd_yield_sleeps_after_a_few_yields_that_ran_no_other_thread(tmp_path):
    """`pmd: {yield: true}`: the scheduler (EEVDF) lets sched_yield() hand the
    CPU only to a thread it owes time, so a PMD whose yields came back at once
    sleeps on its queues after 8 such empty passes, not after 256 passes and
    a millisecond of polling (two switches' PMDs on one CPU would otherwise
    take turns by whole time slices: tools/bench.py's vxlan topology). Both
    guests connected, no traffic: every pass is empty."""
    cpu = max(psutil.Process().cpu_affinity())
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, extra={"pmd": {"cpus": [cpu], "yield": True}}) as d:
        guests = d.connect_guests(["vm0", "vm1"])
        guests[0].send_frame(0, frame(BROADCAST, mac(1)))
        assert len(guests[1].receive(0, 1, timeout=2)) == 1
        time.sleep(0.5)
        before = d.ctl("pmd-stats")["pmds"][0]
        time.sleep(2)
        after = d.ctl("pmd-stats")["pmds"][0]
        # The first frame after a sleep is still taken promptly.
        guests[0].send_frame(0, frame(BROADCAST, mac(2)))
        assert len(guests[1].receive(0, 1, timeout=2)) == 1
        for fe in guests:
            fe.close()
    loops, sleeps = after["loops"] - before["loops"], after["sleeps"] - before["sleeps"]
    yield_sleeps = after["yield_sleeps"] - before["yield_sleeps"]
    print(f"{loops} passes, {sleeps} sleeps, {yield_sleeps} after yields in vain")
    # Without the rule every sleep follows more than 256 empty passes.
    assert yield_sleeps > 0 and sleeps > 0 and loops / sleeps < 100, (loops, sleeps, yield_sleeps)


def test_pmd_without_yield_sleeps_only_after_256_empty_passes(tmp_path):
    """Without pmd.yield nothing changes: a sleep follows more than 256 empty passes."""
    cpu = max(psutil.Process().cpu_affinity())
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, extra={"pmd": {"cpus": [cpu]}}) as d:
        guests = d.connect_guests(["vm0", "vm1"])
        time.sleep(0.5)
        before = d.ctl("pmd-stats")["pmds"][0]
        time.sleep(2)
        after = d.ctl("pmd-stats")["pmds"][0]
        for fe in guests:
            fe.close()
    loops, sleeps = after["loops"] - before["loops"], after["sleeps"] - before["sleeps"]
    assert after["yield_sleeps"] == 0 and sleeps > 0 and loops / sleeps > 256, (loops, sleeps)


def test_pmd_held_off_its_cpu_sleeps_after_a_few_empty_passes(tmp_path):
    """A PMD with pmd.yield that a busy loop pinned to its CPU holds off the
    CPU sleeps after a few empty passes (`shared_sleeps`) instead of after
    256 passes and a millisecond of polling: polling would only take turns
    with that thread by whole time slices (two switches' PMDs on one CPU,
    tools/bench.py's vxlan topology).  Without pmd.yield it keeps the linger."""
    shared_sleeps = {}
    for pmd_yield in (True, False):
        shared_sleeps[pmd_yield] = held_off_sleeps(tmp_path / str(pmd_yield), pmd_yield)
    assert shared_sleeps[False] == 0, shared_sleeps


def held_off_sleeps(tmp_path, pmd_yield: bool) -> int:
    """Sends 100 frames 20 ms apart through a PMD whose CPU a pinned busy loop wants; returns its
    early sleeps, after asserting that with pmd.yield most sleeps are early ones."""
    tmp_path.mkdir()
    cpu = max(psutil.Process().cpu_affinity())
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, extra={"pmd": {"cpus": [cpu], "yield": pmd_yield}}) as d:
        guests = d.connect_guests(["vm0", "vm1"])
        spinner = psutil.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            before = d.ctl("pmd-stats")["pmds"][0]
            # Frames every 20 ms, so the PMD keeps waking and sleeping with the spinner on its CPU.
            for i in range(100):
                guests[0].send_frame(0, frame(BROADCAST, mac(1)))
                assert len(guests[1].receive(0, 1, timeout=2)) == 1
                guests[1].post_rx(0, 1)
                time.sleep(0.02)
            after = d.ctl("pmd-stats")["pmds"][0]
        finally:
            spinner.kill()
            spinner.wait()
        for fe in guests:
            fe.close()
    loops, sleeps = after["loops"] - before["loops"], after["sleeps"] - before["sleeps"]
    shared = after["shared_sleeps"] - before["shared_sleeps"]
    print(f"pmd.yield {pmd_yield}: {loops} passes, {sleeps} sleeps, {shared} early (CPU shared)")
    # Without the rule every sleep follows 1 ms of polling after each frame
    # (about 13,000 passes per sleep here, none early; with it 1,700, most early).
    assert sleeps > 0
    if pmd_yield:
        assert shared > sleeps / 2, (loops, sleeps, shared)
    return shared
