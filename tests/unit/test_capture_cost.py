"""No capture, no copy: the PMD runs its capture and mirror code only for a
port that is captured or mirrored.  Counted in instructions by valgrind's
callgrind (tools/pmd_cost.py), which is exact where cycle counts on a shared
host are not; README "Capture and mirroring" has the figures."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import IN_CI
from tests.support.daemon import REPO

PASSES = 200
MONITOR_CODE = ("monitor_group", "monitor_received", "vs_capture_frames")


def instructions(tmp_path, monitor: str) -> tuple[int, dict[str, int]]:
    """(total instructions inside vs_pmd_poll_once, instructions per function) for one tools.pmd_cost run."""
    out = tmp_path / f"callgrind-{monitor}.out"
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--toggle-collect=_cffi_f_vs_pmd_poll_once*", f"--callgrind-out-file={out}",
         sys.executable, "-m", "tools.pmd_cost", "--passes", str(PASSES), "--monitor", monitor],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    total = int(re.search(r"^totals: (\d+)", out.read_text(), re.M).group(1))
    report = subprocess.run(["callgrind_annotate", "--inclusive=no", str(out)], capture_output=True, text=True,
                            check=True).stdout
    per_function: dict[str, int] = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?\S*:(\S+)", line)
        if m:
            name = m.group(2).split(".")[0]
            per_function[name] = per_function.get(name, 0) + int(m.group(1).replace(",", ""))
    return total, per_function


def test_the_monitor_code_runs_only_for_a_captured_or_mirrored_port(tmp_path):
    if shutil.which("valgrind") is None:
        if IN_CI:
            pytest.fail("valgrind is missing although the test command installs it")
        pytest.skip("valgrind not found (Debian package valgrind); run tools/setup-test-env.sh")
    idle_total, idle = instructions(tmp_path, "none")
    captured_total, captured = instructions(tmp_path, "capture")
    mirrored_total, mirrored = instructions(tmp_path, "mirror")
    assert not any(idle.get(f) for f in MONITOR_CODE), {f: idle.get(f) for f in MONITOR_CODE}
    assert captured.get("vs_capture_frames", 0) > 0 and captured.get("monitor_received", 0) > 0
    assert mirrored.get("monitor_group", 0) > 0
    frames = (PASSES + 1) * 32
    print(f"instructions per frame: idle {idle_total / frames:.1f}, rx capture {captured_total / frames:.1f}, "
          f"rx mirror {mirrored_total / frames:.1f}")
    assert idle_total < captured_total and idle_total < mirrored_total
