"""The latency mode of the benchmark (tools/latency.py) works end to end, briefly.

Not a performance test (a busy host makes any bound on the figures flaky):
every system answered every frame it was sent within the loss timeout, the
percentiles are ordered, the background flow of the busy load got through,
and the run left no process and no namespace behind.  The figures are
printed (pytest -s) for a look.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.system, pytest.mark.dpdk]

REPO = Path(__file__).resolve().parents[2]


def test_latency_smoke(tmp_path):
    json_out = tmp_path / "latency.json"
    resume_latency = Path("/sys/devices/system/cpu/cpu1/power/pm_qos_resume_latency_us")   # the SUT core's
    resume_before = resume_latency.read_text()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [sys.executable, "-m", "tools.bench", "--latency", "--smoke", "--rates", "20", "--loads", "idle,busy",
            "--systems", "vswitchd,vswitchd-cpu-qos,vswitchd-poll,testpmd-io,linux-bridge", "--json-out", str(json_out),
            "--plot", str(tmp_path / "latency.png")]
    done = subprocess.run(argv, cwd=REPO, env=dict(os.environ, TMPDIR=str(scratch)), capture_output=True,
                          text=True, timeout=600)
    report = f"$ {' '.join(argv)}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    print(report)
    assert done.returncode == 0, report
    run = json.loads(json_out.read_text())
    rows = run["results"]
    for samples in run["samples_us"]:
        if samples["case"] == "vhost":
            assert len(samples["transit_us"]) == len(samples["rtt_us"]) == 40, samples
            assert all(0 < t < rtt for t, rtt in zip(samples["transit_us"], samples["rtt_us"])), samples
    systems = {("vhost", "vswitchd"), ("vhost", "vswitchd-cpu-qos"), ("vhost", "vswitchd-poll"),
               ("vhost", "testpmd-io"), ("tap", "vswitchd"), ("tap", "vswitchd-cpu-qos"), ("tap", "vswitchd-poll"),
               ("tap", "linux-bridge")}
    assert {(r["case"], r["system"], r["load"]) for r in rows} == {
        (case, system, load) for case, system in systems for load in ("idle", "busy")}, report
    for r in rows:
        assert r["error"] is None and r["sent"] == 40 and r["lost"] == 0, f"{r}\n{report}"
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["p99_9_us"] <= r["max_us"], f"{r}\n{report}"
        # Sanity, not speed: a round trip through a switch on this host is over a microsecond and under 1 s.
        assert 1 < r["p50_us"] < 1_000_000, f"{r}\n{report}"
        if r["case"] == "vhost":
            # The transit leaves the harness's own work out of the round trip: shorter, never longer.
            assert 0 < r["transit_p10_us"] <= r["transit_p50_us"] <= r["transit_p99_us"], f"{r}\n{report}"
            assert r["transit_p50_us"] < r["p50_us"], f"{r}\n{report}"
        else:
            assert "transit_p50_us" not in r, f"{r}\n{report}"
        if r["load"] == "busy":
            assert r["load_frames"] > 0, f"the background flow did not get through: {r}\n{report}"
        else:
            assert r["load_frames"] is None, f"{r}\n{report}"
        assert f"{r['system']}" in done.stdout
    assert "| vhost | idle | vswitchd-poll |" in done.stdout, "the README table is printed"
    if "matplotlib not installed" not in done.stdout:
        assert (tmp_path / "latency.png").stat().st_size > 0
    assert list(scratch.iterdir()) == [], report
    assert resume_latency.read_text() == resume_before, "vswitchd-cpu-qos should have put the SUT core's value back"
    left = [p.name for p in Path("/run/netns").iterdir() if p.name.startswith("vsl-")]
    assert left == [], f"namespaces left behind: {left}"
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any(str(scratch) in a for a in p.info["cmdline"] or [])]
    assert leftovers == [], f"processes left running: {leftovers}"
