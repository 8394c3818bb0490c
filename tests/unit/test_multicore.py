"""Two PMD threads on this host's two cores, sharing one MAC table: what its
lock costs them (README "Multi-core plan").

tools/scale.py --pmds forwards between four null ports in generator mode,
one PMD polling all four or two PMDs (cores 0 and 1) polling a pair each,
and reads the table's lock counters (struct vs_fib_stats lock_acquired,
lock_contended, lock_wait_cycles, lock_wait_max).  Asserted: the structure
(each PMD takes the lock once per burst, and only then; the counters see a
wait that is forced), and a bound on the average wait per acquisition that
is generous for a host where other jobs preempt the threads.  The figures
are printed with the host's load."""

from __future__ import annotations

import argparse
import threading
import time

import pytest

from tests.support.null_pmd import two_null_ports
from tools import scale
from vswitch.native import lib

# The contended waits' median (the upper bound of its log2 bucket) must stay
# below this.  A burst holds the lock for about a microsecond (32 lookups, or 32
# learns); a wait past this many would mean the PMDs queue behind each other
# for several bursts, which no preemption of a single thread explains.
MAX_MEDIAN_WAIT_US = 20.0


def args(**kw) -> argparse.Namespace:
    base = {"warmup": 0.3, "window": 2.0, "core": 1, "pmd_sources": 1}
    base.update(kw)
    return argparse.Namespace(**base)


def check_structure(row: dict) -> None:
    # Every burst forwards (generator mode, no drops), and each takes the lock exactly once.
    assert row["lock_acquired"] == row["bursts"], row
    assert row["packets"] == row["bursts"] * lib.VS_BURST, row
    assert row["lock_contended"] <= row["lock_acquired"]
    # Waits happen inside busy passes, so they are part of the busy cycles.
    assert row["lock_wait_cycles"] <= row["busy_cycles"], row


@pytest.mark.parametrize("sources", [1, 4096])
def test_two_pmds_on_two_cores_share_the_mac_table_lock(sources):
    """1 source MAC per port (a lookup and a remembered learn per burst) and 4096
    (a learn per frame, the longest hold of the lock per burst).  Printed too:
    the figures over only the windows in which both PMD threads ran throughout
    (none, on a host busy enough)."""
    one = scale.measure_pmds(1, args(pmd_sources=sources))
    two = scale.measure_pmds(2, args(pmd_sources=sources))
    for row in (one, two):
        check_structure(row)
        c = row["clean"]
        print(f"{row['pmds']} PMD(s), {sources} source(s)/port, load {row['load_average']}: "
              f"{row['mpps']} Mpps; all: {row['cycles_per_packet']} cycles/frame, "
              f"contended waits: median under {row['wait_median_us_max']} us, p99 under {row['wait_p99_us_max']} us, "
              f"{row['waits_under_1us']} under 1 us, {row['waits_over_100us']} over 100 us; "
              f"{row['lock_acquired']} acquisitions ({row['contended_share']:.2%} contended), "
              f"{row['wait_per_packet']} wait cycles/frame, longest wait {row['lock_wait_max_us']} us; "
              f"{row['clean_windows']}/{row['windows']} clean windows: {c['cycles_per_packet']} cycles/frame, "
              f"{c['contended_share']} contended, {c['wait_per_contended']} cycles per contended wait, "
              f"{c['wait_per_packet']} per frame ({c['wait_share_of_busy']} of busy); "
              + ", ".join(f"core {p['core']}: {p['cycles_per_packet']} cycles/frame, on CPU {p['on_cpu']:.0%}"
                          for p in row["per_pmd"]))
    assert one["lock_contended"] == 0, "one PMD and no control plane: nobody to wait for"
    assert len(two["per_pmd"]) == 2 and all(p["packets"] > 0 for p in two["per_pmd"])
    assert sum(two["wait_log2_cycles"]) == two["lock_contended"]
    # Half the contended waits end within a burst's hold of the lock, however many
    # waits a preempted holder drags out: the median, not the mean, is the design's.
    assert two["wait_median_us_max"] < MAX_MEDIAN_WAIT_US, two["wait_log2_cycles"]


def test_the_lock_counters_see_a_forced_wait(closing):
    """The counters can fail: a hold of 5 ms by another thread shows as one contended
    acquisition that waited at least 4 ms, and every acquisition is counted."""
    a, _, run = two_null_ports(closing, polled=1)
    fib, pmd = run.fib, run.pmd
    assert lib.vs_null_port_generate(a.np, (2).to_bytes(6, "big"), 0x020000000001, 1, 64) == 0
    s = fib.c.stats
    for _ in range(10):
        lib.vs_pmd_poll_once(pmd)
    assert (s.lock_acquired, s.lock_contended, s.lock_wait_cycles) == (10, 0, 0)
    assert fib.stats()["lock_acquired"] == 10
    # Hold the lock with one ticket while the PMD's pass waits behind it on another thread.
    lib.vs_fib_lock(fib.c)
    t = threading.Thread(target=lib.vs_pmd_poll_once, args=(pmd,))
    t.start()
    deadline = time.monotonic() + 10
    while fib.c.lock_next - fib.c.lock_owner < 2:   # the PMD has drawn its ticket and waits
        assert time.monotonic() < deadline, "the PMD's pass never asked for the lock"
        time.sleep(0.0001)
    time.sleep(0.005)
    lib.vs_fib_unlock(fib.c)
    t.join(10)
    assert s.lock_acquired == 12 and s.lock_contended == 1
    assert s.lock_wait_cycles * 1e6 / pmd.tsc_hz >= 4000 and s.lock_wait_cycles == s.lock_wait_max
    hist = scale.wait_histogram(fib)
    assert sum(hist) == 1 and hist[s.lock_wait_cycles.bit_length() - 1] == 1
    assert scale.wait_quantiles(hist, pmd.tsc_hz)["waits_over_100us"] == 1
