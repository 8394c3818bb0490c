"""Instructions the PMD loop runs, counted by valgrind's callgrind over one tools.pmd_cost run.

Deterministic, unlike cycles on a shared host.  Collected in cffi's wrapper
of vs_pmd_poll_once, the one entry from Python whatever -flto inlines into
it or renames (a .lto_priv suffix); a pattern matching the inner function
too would toggle collection twice.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import IN_CI
from tests.support.daemon import REPO


def require_valgrind() -> None:
    if shutil.which("valgrind") is None:
        if IN_CI:
            pytest.fail("valgrind is missing although the test command installs it")
        pytest.skip("valgrind not found (Debian package valgrind); run tools/setup-test-env.sh")


def pmd_instructions(tmp_path, name: str, *args: str) -> tuple[int, dict[str, int]]:
    """(instructions inside vs_pmd_poll_once, instructions per function) of
    `python -m tools.pmd_cost ARGS` under callgrind."""
    require_valgrind()
    out = tmp_path / f"callgrind-{name}.out"
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--toggle-collect=_cffi_f_vs_pmd_poll_once*", f"--callgrind-out-file={out}",
         sys.executable, "-m", "tools.pmd_cost", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    total = int(re.search(r"^totals: (\d+)", out.read_text(), re.M).group(1))
    report = subprocess.run(["callgrind_annotate", "--inclusive=no", str(out)], capture_output=True, text=True,
                            check=True).stdout
    per_function: dict[str, int] = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?\S*:(\S+)", line)
        if m:
            fn = m.group(2).split(".")[0]
            per_function[fn] = per_function.get(fn, 0) + int(m.group(1).replace(",", ""))
    return total, per_function
