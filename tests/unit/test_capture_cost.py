"""No capture, no copy: the PMD runs its capture and mirror code only for a
port that is captured or mirrored.  Counted in instructions by valgrind's
callgrind (tools/pmd_cost.py), which is exact where cycle counts on a shared
host are not; README "Capture and mirroring" has the figures."""

from __future__ import annotations

from tests.support.callgrind import pmd_instructions

PASSES = 200
MONITOR_CODE = ("monitor_group", "monitor_received", "vs_capture_frames")


def instructions(tmp_path, monitor: str) -> tuple[int, dict[str, int]]:
    """(total instructions inside vs_pmd_poll_once, instructions per function) for one tools.pmd_cost run."""
    return pmd_instructions(tmp_path, monitor, "--passes", str(PASSES), "--monitor", monitor)


def test_the_monitor_code_runs_only_for_a_captured_or_mirrored_port(tmp_path):
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
