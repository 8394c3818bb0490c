"""tools/wake_floor.py: how long the host takes to wake a thread blocked on an eventfd."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vswitch.native import ffi, lib
from vswitch.pmd.cpu_wake import attribute

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.wake_floor", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_every_wake_is_measured_and_the_percentiles_are_ordered(tmp_path):
    out = tmp_path / "wake.json"
    done = run("--count", "30", "--gap-ms", "3", "--json-out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert len(result["wakes_us"]) == 30
    # Sanity, not speed: a wake-up across CPUs is over a microsecond and, even preempted, under a second.
    assert all(1 < w < 1_000_000 for w in result["wakes_us"]), result["wakes_us"]
    assert result["p10_us"] <= result["p50_us"] <= result["p90_us"] <= result["p99_us"]
    assert "30 wakes: p10" in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="sets a CPU's PM QoS: run as root")
def test_cpu_qos_holds_polling_idle_for_the_run_and_puts_the_value_back(tmp_path):
    path = attribute(1)
    before = Path(path).read_text()
    out = tmp_path / "wake.json"
    done = run("--count", "10", "--gap-ms", "3", "--cpu-qos", "--json-out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["cpu_resume_latency"] == "n/a"   # the kernel's "polling only"
    assert "(polling idle only)" in done.stdout
    assert Path(path).read_text() == before


def test_wrong_arguments_get_one_line_and_change_nothing():
    same = run("--cpu", "0", "--waker-cpu", "0")
    assert same.returncode == 2 and "two different CPUs" in same.stderr
    assert run("--count", "0").returncode == 2
    assert run("--gap-ms", "-1").returncode == 2


def test_the_probe_refuses_bad_settings_and_a_core_it_may_not_use_at_once():
    p = ffi.new("struct vs_wake_probe *")
    p.cpu_waker, p.cpu_sleeper, p.wakes, p.gap_us, p.timeout_ms = 0, 0, 1, 100, 1000
    assert lib.vs_wake_probe_run(p) == -errno.EINVAL           # one CPU for both sides
    p.cpu_sleeper, p.wakes = 1, lib.VS_WAKE_PROBE_MAX + 1
    assert lib.vs_wake_probe_run(p) == -errno.EINVAL
    p.wakes, p.cpu_sleeper = 1, 1000                           # no such CPU: the sleeper cannot be pinned
    started = time.monotonic()
    assert lib.vs_wake_probe_run(p) == -errno.EINVAL
    assert time.monotonic() - started < 0.5, "the waker must stop as soon as the sleeper failed, not time out"
