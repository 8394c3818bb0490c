"""The latency mode of the benchmark (tools/latency.py) works end to end, briefly.

Not a performance test: every system answered every frame it was sent
within the loss timeout, the percentiles are ordered, and the run left no
process and no namespace behind.
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
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [sys.executable, "-m", "tools.bench", "--latency", "--smoke", "--rates", "20",
            "--systems", "vswitchd,testpmd-io,linux-bridge", "--json-out", str(json_out)]
    done = subprocess.run(argv, cwd=REPO, env=dict(os.environ, TMPDIR=str(scratch)), capture_output=True,
                          text=True, timeout=300)
    report = f"$ {' '.join(argv)}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    rows = json.loads(json_out.read_text())["results"]
    assert {(r["case"], r["system"]) for r in rows} == {
        ("vhost", "vswitchd"), ("vhost", "testpmd-io"), ("tap", "vswitchd"), ("tap", "linux-bridge")}, report
    for r in rows:
        assert r["error"] is None and r["sent"] == 40 and r["lost"] == 0, f"{r}\n{report}"
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["p99_9_us"] <= r["max_us"], f"{r}\n{report}"
        assert f"{r['system']}" in done.stdout
    assert list(scratch.iterdir()) == [], report
    left = [p.name for p in Path("/run/netns").iterdir() if p.name.startswith("vsl-")]
    assert left == [], f"namespaces left behind: {left}"
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any(str(scratch) in a for a in p.info["cmdline"] or [])]
    assert leftovers == [], f"processes left running: {leftovers}"
