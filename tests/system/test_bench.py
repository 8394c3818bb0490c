"""The benchmark (tools/bench.py) works end to end in its short smoke mode.

This is not a performance test: it checks that every requested system
produced a positive frame rate, that the JSON result parses and has the ratio
to DPDK testpmd, that the PNG plot is a PNG, and that the run left no process
and no file behind. OVS-DPDK joins the run when its package is installed
(`openvswitch-switch-dpdk`); the benchmark never downloads anything here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tools.bench import OVS_DPDK_BINARY

pytestmark = [pytest.mark.system, pytest.mark.dpdk]

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-up of three DPDK processes plus 1 s warm-up and 1 s window per system.
TIMEOUT_SECONDS = 300


def test_bench_smoke(tmp_path):
    pytest.importorskip("matplotlib", reason="the benchmark draws its plot with matplotlib: pip install matplotlib")
    systems = ["vswitchd", "testpmd-io"]
    if os.access(OVS_DPDK_BINARY, os.X_OK):
        systems.append("ovs-dpdk")
    json_out, plot_out = tmp_path / "bench.json", tmp_path / "bench.png"
    # The benchmark's sockets and logs go to a scratch directory of its own
    # (tempfile honours TMPDIR); it must be empty again afterwards.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    argv = [sys.executable, "-m", "tools.bench", "--smoke", "--profile", "--systems", ",".join(systems),
            "--paths", "split,packed", "--json-out", str(json_out), "--plot-out", str(plot_out)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop its testpmd/vswitchd/OVS processes by PID first.
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"the benchmark did not finish within {TIMEOUT_SECONDS} s\n{stdout}\n{stderr}")
    done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    report = f"$ {' '.join(argv)}\nexit {done.returncode}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, report

    result = json.loads(json_out.read_text())
    assert result["systems"] == systems, report
    assert result["unavailable"] == {}, report
    assert result["paths"] == ["split", "packed"], report
    rows = {row["system"]: row for row in result["results"]}
    # Every system on each path: `vswitchd` (split rings), `vswitchd/packed` (virtio-user packed_vq=1).
    labels = systems + [f"{system}/packed" for system in systems]
    assert sorted(rows) == sorted(labels), report
    for system in labels:
        row = rows[system]
        assert row["size"] == 64 and row["status"] == "ok", f"{row}\n{report}"
        assert row["mpps_median"] > 0, f"{row}\n{report}"
        assert "ratio_to_testpmd_io" in row and row["ratio_to_testpmd_io"] > 0, f"{row}\n{report}"
        assert row["gbit_s_median"] > 0, f"{row}\n{report}"
    assert rows["testpmd-io"]["ratio_to_testpmd_io"] == pytest.approx(1.0)
    assert rows["testpmd-io/packed"]["ratio_to_testpmd_io"] == pytest.approx(1.0)   # each path against its own
    assert len(result["samples"]) == len(labels), report
    # --profile: perf sampled each system; vswitchd's time is in its ring engine and packet loop.
    vswitchd_profile = next(x for x in result["samples"] if x["system"] == "vswitchd")["profile"]
    assert vswitchd_profile and all(0 < pct <= 100 for pct, _ in vswitchd_profile), report
    assert {"vs_vring_enqueue_burst", "vs_vring_dequeue_burst"} & {sym for _, sym in vswitchd_profile}, report
    packed_profile = next(x for x in result["samples"] if x["system"] == "vswitchd/packed")["profile"]
    assert {"vs_packed_enqueue_burst", "vs_packed_dequeue_burst"} & {sym for _, sym in packed_profile}, report
    assert result["machine"]["sut_core"] != result["machine"]["generator_core"]
    # The terminal table names every system on every path.
    for system in labels:
        assert system in done.stdout, report

    assert plot_out.read_bytes()[:8] == PNG_SIGNATURE, report

    # Nothing left behind: no file in the scratch directory, no process
    # still using it (a testpmd, vswitchd or OVS started by the benchmark).
    assert list(scratch.iterdir()) == [], report
    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(scratch) in arg for arg in proc.info["cmdline"] or []):
            leftovers.append((proc.info["pid"], proc.info["cmdline"]))
    assert leftovers == [], f"processes left running: {leftovers}"
