"""tools/bench.py --profile on a stripped library (Debian's DPDK): perf
names only addresses there, so the bench adds them up by the function that
holds them, bounded by the library's .eh_frame and named from the static
archive built from the same object.  README "Throughput per virtio path"
has what this showed about the generator."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools.bench import by_function, function_at, function_table, parse_perf_report

SOURCE = """
int hot_receive(volatile int *p) { int s = 0; for (int i = 0; i < 100; i++) s += p[i]; return s; }
static int cold_refill(volatile int *p, int n) { for (int i = 0; i < n; i++) p[i] = i; return n; }
int refill(volatile int *p) { return cold_refill(p, 7) + cold_refill(p, 9); }
"""


@pytest.fixture
def stripped(tmp_path):
    """A stripped shared library, and the archive of the same object next to it."""
    for tool in ("gcc", "ar", "strip", "readelf", "nm"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.fail(f"{tool} is needed (binutils, gcc)")
    src = tmp_path / "ring.c"
    src.write_text(SOURCE)
    obj = tmp_path / "ring.o"
    subprocess.run(["gcc", "-O1", "-fPIC", "-fno-inline", "-c", str(src), "-o", str(obj)], check=True)
    so = tmp_path / "libring.so.1"
    subprocess.run(["gcc", "-shared", str(obj), "-o", str(so)], check=True)
    subprocess.run(["ar", "rcs", str(tmp_path / "libring.a"), str(obj)], check=True)
    subprocess.run(["strip", "--strip-all", str(so)], check=True)
    return so


def symbol_starts(tmp_path, so: Path) -> dict:
    """Where each function starts in the library, from an unstripped link of the same object."""
    plain = tmp_path / "plain.so"
    subprocess.run(["gcc", "-shared", str(tmp_path / "ring.o"), "-o", str(plain)], check=True)
    starts = {}
    for line in subprocess.run(["nm", str(plain)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tT":
            starts[parts[2]] = int(parts[0], 16)
    return starts


def test_stripped_functions_are_bounded_and_named(tmp_path, stripped):
    # Stripped: the static function has no symbol left in the library.
    assert "cold_refill" not in subprocess.run(["nm", "-D", str(stripped)], capture_output=True, text=True).stdout
    table = function_table(stripped)
    starts = symbol_starts(tmp_path, stripped)
    for name in ("hot_receive", "refill", "cold_refill"):
        assert function_at(table, starts[name]) == name
        assert function_at(table, starts[name] + 3) == name


def test_without_an_archive_functions_are_named_by_start(tmp_path, stripped):
    (tmp_path / "libring.a").unlink()
    table = function_table(stripped)
    start = symbol_starts(tmp_path, stripped)["hot_receive"]
    assert function_at(table, start + 5) == f"fn@{start:#x}"


def test_report_rows_add_up_by_function(tmp_path, stripped):
    starts = symbol_starts(tmp_path, stripped)
    report = "\n".join([
        "# Overhead  Shared Object  Symbol",
        f"    30.00%  libring.so.1  [.] {starts['hot_receive'] + 2:#018x}",
        f"    12.50%  libring.so.1  [.] {starts['hot_receive'] + 9:#018x}",
        f"     5.00%  libring.so.1  [.] {starts['cold_refill'] + 1:#018x}",
        "    40.00%  vswitchd  [.] vs_pmd_run",
        "     2.00%  [kernel.kallsyms]  [k] finish_task_switch",
    ])
    rows = parse_perf_report(report)
    assert len(rows) == 5
    grouped = by_function(rows, {"libring.so.1": stripped})
    assert grouped == [(42.5, "hot_receive (libring.so.1)"), (40.0, "vs_pmd_run"),
                       (5.0, "cold_refill (libring.so.1)"), (2.0, "finish_task_switch")]
    # A DSO whose file is not known keeps its addresses.
    assert by_function(rows[:1], {})[0][1].startswith("0x")
