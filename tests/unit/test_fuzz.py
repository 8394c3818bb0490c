"""Fuzzing under sanitizers (fuzz/, tools/fuzz.py), and the bugs it found.

Each harness runs for a bounded time here (tools/fuzz.py builds them with
clang -fsanitize=fuzzer,address,undefined); any sanitizer report, crash or
broken invariant fails the test with the harness's own report.  The longer
run that gives the README's figures is `nice -n 10 python -m tools.fuzz --minutes 13 --until-figures`.

Below them, a regression test for each bug the fuzzers found, in plain
pytest against the normal build, so it runs without clang too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.unit.test_native_build import import_native
from tests.unit.test_offload import make_pkt, run_fit
from tools import fuzz as fuzz_tool
from vswitch import native_sources
from vswitch.native import lib

REPO = fuzz_tool.REPO
# Each harness runs this long in CI, side by side with the others.
CI_SECONDS = 20


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.fuzz", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def counts(output: str) -> dict[str, int]:
    """{'ring': chains, 'offload': headers, 'vhost-user': messages} from the tool's summary."""
    found = {}
    for name, (unit, _target) in fuzz_tool.FIGURES.items():
        m = re.search(rf"^{re.escape(name)}\s+([\d,]+) {unit}\b.*reports / crashes / broken invariants: (\d+)",
                      output, re.M)
        if m:
            found[name] = (int(m.group(1).replace(",", "")), int(m.group(2)))
    return found


# --------------------------------------------------------------------------- the fuzzers, bounded


def test_every_harness_runs_clean_for_a_bounded_time(tmp_path):
    # Needs clang with libFuzzer (tools/setup-test-env.sh installs it) and atheris (the test extra).
    assert shutil.which("clang") or shutil.which("clang-14"), \
        "clang is missing: apt-get install clang libclang-rt-14-dev (tools/setup-test-env.sh does)"
    out = run_tool("--seconds", str(CI_SECONDS), "--workdir", str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    found = counts(text)
    assert set(found) == set(fuzz_tool.FIGURES), text
    for name, (count, reports) in found.items():
        assert reports == 0, text
        assert count > 0, f"{name} did no work:\n{text}"
    # The ring harness drives packed rings too (an eighth of its inputs, half of its races).
    packed = re.search(r"packed_chains ([\d,]+)", text)
    assert packed and int(packed.group(1).replace(",", "")) > 0, f"no packed ring was fuzzed:\n{text}"


def test_vhost_user_harness_runs_clean_against_the_sanitized_build(tmp_path):
    # The message handlers drive vs_vring_setup and the ring engine through cffi: here the
    # fast path is the VSWITCH_SANITIZE=1 build, loaded with libasan preloaded.
    out = run_tool("--seconds", "10", "--only", "vhost-user", "--sanitized-python", "--workdir", str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    count, reports = counts(text)["vhost-user"]
    assert reports == 0 and count > 0, text


def test_a_broken_invariant_fails_the_run(tmp_path):
    # The tool's own check: a harness that reports a failure makes the run fail, with the report shown.
    runs = [fuzz_tool.Run("offload", [sys.executable, "-c",
                                      "import sys; print('INVARIANT FAILED x.c:1: planted'); sys.exit(1)"],
                          dict(os.environ), tmp_path / "s", tmp_path / "log")]
    fuzz_tool.execute(runs, deadline_slack=30)
    text, ok, _ = fuzz_tool.summary(runs)
    assert not ok and "INVARIANT FAILED x.c:1: planted" in text


# --------------------------------------------------------------------------- the sanitized build


@pytest.fixture(scope="module")
def sanitized_copy(tmp_path_factory):
    """A copy of the package whose fast path is built with VSWITCH_SANITIZE=1."""
    return fuzz_tool.build_sanitized_package(tmp_path_factory.mktemp("sanitized"))


def test_sanitized_build_without_libasan_is_refused_not_fatal(sanitized_copy):
    # Loading it plainly would abort the whole process inside ASan's start-up.
    out = import_native(sanitized_copy)
    assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr
    assert "is a sanitized build" in out.stderr and "LD_PRELOAD" in out.stderr
    assert "pip install -e ." in out.stderr     # and how to get the normal build back


def test_sanitized_build_loads_with_libasan_preloaded(sanitized_copy):
    env = dict(os.environ, VSWITCH_SANITIZE="1", LD_PRELOAD=fuzz_tool.libasan(), ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(sanitized_copy))
    code = ("import vswitch.native as n; print(n.__file__); "
            "print(n.ffi.string(n.lib.vs_build_flavor()).decode())")
    out = subprocess.run([sys.executable, "-c", code], cwd=sanitized_copy, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    path, flavor = out.stdout.split()
    assert path.startswith(str(sanitized_copy)) and flavor == native_sources.FLAVOR_SANITIZE


def test_normal_build_is_not_taken_for_a_sanitized_one(tmp_path):
    shutil.copytree(native_sources.PACKAGE_DIR, tmp_path / "vswitch", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import vswitch.native"
    env = dict(os.environ, VSWITCH_SANITIZE="1", PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "is the normal build" in out.stderr and "VSWITCH_SANITIZE=1 pip install -e ." in out.stderr


# --------------------------------------------------------------------------- regressions


def _tcp4_frame(total_len: int) -> bytes:
    """An untagged Ethernet + IPv4 + TCP frame of exactly total_len bytes."""
    eth = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00"
    ip = bytearray(20)
    ip[0] = 0x45
    ip[8] = 64
    ip[9] = 6
    ip[12:16] = bytes([10, 0, 0, 1])
    ip[16:20] = bytes([10, 0, 0, 2])
    tcp = bytearray(20)
    tcp[12] = 0x50
    tcp[13] = 0x18
    payload = bytes(i & 0xFF for i in range(total_len - 54))
    return eth + bytes(ip) + bytes(tcp) + payload


def test_tso_never_writes_a_truncated_ipv4_length():
    # Found by fuzz/offload_fuzz.c: a 65550-byte TCPv4 GSO frame (the largest
    # the ring engine accepts) whose gso_size covers all of it became one
    # "segment" of 65536 IP bytes, and the IPv4 total length wrapped to 0.
    frame = _tcp4_frame(lib.VS_MAX_FRAME)
    pkt, keep = make_pkt(frame, pieces=3, gso_type=lib.VS_NET_HDR_GSO_TCPV4, gso_size=0xFFFF)
    frames, errors = run_fit([pkt], caps=0)
    for out, _flags, _gso in frames:
        ip_len = int.from_bytes(out[16:18], "big")
        assert ip_len == len(out) - 14, f"IPv4 total length {ip_len}, segment has {len(out) - 14} bytes"
    # What cannot be said in 16 bits is dropped and counted, as any bad header.
    assert frames == [] and errors == 1
