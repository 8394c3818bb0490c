"""The core-to-core probe (vswitch/pmd/core_probe.c, tools/core_rtt.py) and how
the benchmark sorts its samples by the placement it found (tools/bench.py).

No timing is asserted beyond "a plausible number of nanoseconds": what a round
trip costs is the host's business; that the probe measures one, refuses bad
settings, and that the benchmark compares like with like is ours.
"""

from __future__ import annotations

import errno
import os
import statistics

import pytest

from tools import bench, core_rtt
from vswitch.native import ffi, lib

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the probe needs two cores")


@pytest.mark.parametrize("realtime", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.geteuid() != 0, reason="SCHED_FIFO needs root"))])
def test_a_probe_times_a_round_trip_between_two_cores(realtime):
    ns = core_rtt.probe(0, 1, realtime=realtime, round_trips=500, batches=3)
    # A line cannot cross between cores in under 10 ns, and 2,000 round trips
    # in a batch would not take a second even on a host that stole the core.
    assert 10 < ns < 100_000


@pytest.mark.parametrize("field,value", [("cpu_b", 0), ("cpu_b", -1), ("cpu_b", 4096), ("round_trips", 0),
                                         ("round_trips", 1_000_001), ("batches", 0),
                                         ("batches", lib.VS_CORE_PROBE_MAX_BATCHES + 1), ("timeout_ms", 0)])
def test_bad_settings_are_refused(field, value):
    p = ffi.new("struct vs_core_probe *")
    p.cpu_a, p.cpu_b, p.round_trips, p.batches, p.timeout_ms = 0, 1, 10, 1, 1000
    setattr(p, field, value)
    assert lib.vs_core_probe_run(p) == -errno.EINVAL


def test_a_core_outside_the_machine_is_refused_not_waited_for():
    with pytest.raises(OSError) as info:
        core_rtt.probe(0, os.cpu_count() + 7, round_trips=10, batches=1)
    assert info.value.errno == errno.EINVAL


def test_probes_split_into_regimes_at_their_largest_jump():
    # Two placements, as on the host this was written on.
    split = core_rtt.regime_split([110.0, 480.0, 97.0, 505.0, None, 130.0, 880.0])
    assert 130 < split < 480
    assert [core_rtt.regime_of(ns, split) for ns in (97, 130, 480, 880, None)] == \
        ["near", "near", "far", "far", None]
    # One placement: jitter within it is not a regime.
    assert core_rtt.regime_split([100.0, 120.0, 150.0, 170.0]) is None
    assert core_rtt.regime_of(170.0, None) == "near"
    assert core_rtt.regime_split([100.0]) is None


def sample(system: str, rep: int, mpps: float, before: float | None, after: float | None) -> bench.Sample:
    # The generator's cost per frame is made to follow the rate, as it does.
    return bench.Sample(system, 64, rep, mpps=mpps, core_rtt_ns_before=before, core_rtt_ns_after=after,
                        generator_cycles_per_packet=2000 / mpps)


def test_the_benchmark_compares_two_systems_within_one_regime():
    # Regimes by the default boundary (250 ns): this host's near is 95-135, far 430-910.
    # vswitchd is ahead in each regime, but its far samples outnumber the
    # baseline's: the plain median says behind, the regime columns say ahead.
    samples = [
        sample("vswitchd", 0, 6.0, 480, 490), sample("testpmd-io", 0, 5.0, 470, 500),
        sample("vswitchd", 1, 6.5, 500, 470), sample("testpmd-io", 1, 10.0, 100, 110),
        sample("vswitchd", 2, 12.0, 105, 115), sample("testpmd-io", 2, 11.0, 120, 100),
        sample("vswitchd", 3, 9.0, 110, 490), sample("testpmd-io", 3, 9.5, 480, 115),
    ]
    rows = {r["system"]: r for r in bench.summarise(["vswitchd", "testpmd-io"], [64], samples, {})}
    mine = rows["vswitchd"]
    assert mine["regimes"] == {"near": 1, "far": 2, "mixed": 1}
    assert mine["ratio_to_baseline"] < 1
    assert mine["ratio_near"] == pytest.approx(12.0 / 10.5)
    assert mine["ratio_far"] == pytest.approx(6.25 / 5.0)
    assert rows["testpmd-io"]["ratio_near"] == pytest.approx(1.0)
    assert mine["generator_cycles_per_packet_far"] == pytest.approx(statistics.median([2000 / 6.0, 2000 / 6.5]))
    assert mine["generator_cycles_per_packet_near"] == pytest.approx(2000 / 12.0)
    table = bench.render_table(list(rows.values()))
    assert "1/2/1" in table and "1.14" in table


def test_a_sample_is_mixed_when_the_placement_changed_and_unsorted_when_unprobed():
    split = 300.0
    assert bench.sample_regime(sample("s", 0, 1.0, 100, 120), split) == "near"
    assert bench.sample_regime(sample("s", 0, 1.0, 400, 450), split) == "far"
    assert bench.sample_regime(sample("s", 0, 1.0, 100, 450), split) == "mixed"
    assert bench.sample_regime(sample("s", 0, 1.0, None, 450), split) is None


def test_a_sample_in_the_other_regime_is_measured_again_up_to_the_tries(monkeypatch):
    probes = iter([(480, 500), (110, 470), (105, 120), (490, 495), (500, 510)])

    def fake_measure(system_cls, size, rep, args, scratch, path):
        before, after = next(probes)
        return sample("vswitchd", rep, 5.0, before, after)

    monkeypatch.setattr(bench, "measure", fake_measure)
    args = bench.parse_args(["--regime", "near", "--regime-tries", "3"])
    discarded = []
    kept = bench.measure_in_regime(None, 64, 0, args, None, "split", discarded)
    # Far, then mixed, both measured again; the near one is kept.
    assert (kept.core_rtt_ns_before, kept.core_rtt_ns_after) == (105, 120)
    assert [(s.core_rtt_ns_before, s.core_rtt_ns_after) for s in discarded] == [(480, 500), (110, 470)]
    # Out of tries: the last one is kept whatever its regime.
    discarded.clear()
    args.regime_tries = 2
    kept = bench.measure_in_regime(None, 64, 0, args, None, "split", discarded)
    assert (kept.core_rtt_ns_before, kept.core_rtt_ns_after) == (500, 510)
    assert len(discarded) == 1
    # Without --regime every sample is kept.
    args = bench.parse_args([])
    assert args.regime == "any"
    with pytest.raises(SystemExit):
        bench.parse_args(["--regime", "near", "--regime-tries", "0"])
