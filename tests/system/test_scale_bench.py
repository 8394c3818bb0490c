"""The scale modes of the benchmark (tools/scale.py) work end to end in smoke mode.

Not a performance test: each point produced a positive cycles/packet figure,
the JSON parses, the plots are PNGs, and the port-table swaps were timed.
The modes need no root, no DPDK and no guest: the PMD forwards between null
ports in generator mode, in the benchmark's own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_scale_bench_smoke(tmp_path):
    pytest.importorskip("matplotlib", reason="the benchmark draws its plots with matplotlib: pip install matplotlib")
    argv = [sys.executable, "-m", "tools.bench", "--smoke", "--macs", "2,1000", "--ports", "2,4",
            "--out-dir", str(tmp_path)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    report = f"$ {' '.join(argv)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, report

    macs = json.loads((tmp_path / "macs.json").read_text())["results"]
    assert [r["macs"] for r in macs] == [2, 1000], report
    assert [r["fdb_entries"] for r in macs] == [2, 1000], report
    assert all(r["cycles_per_packet_min"] > 0 and r["cycles_per_packet"] > 0 and r["mpps"] > 0 for r in macs), report

    ports = json.loads((tmp_path / "ports.json").read_text())["results"]
    assert [(r["ports"], r["mode"]) for r in ports] == [(2, "unicast"), (4, "unicast"), (2, "flood"), (4, "flood")]
    assert all(r["cycles_per_packet"] > 0 for r in ports), report
    assert all(r["swap_us_max"] > 0 for r in ports if r["mode"] == "unicast"), report
    for name in ("macs.png", "ports.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert "| macs |" in proc.stdout and "| ports |" in proc.stdout, report
