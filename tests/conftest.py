"""Shared fixtures and the skip policy for the whole test suite.

Skip policy (DESIGN.md, Testing): tests that need real peers are marked
`system` (plus `dpdk` or `qemu`). Locally, a missing tool, root or hugepages
skips such a test with a reason that says how to get it
(`tools/setup-test-env.sh`). When the environment variable CI is set, the
test command has installed everything, so a skipped `system` test is a broken
environment: the skip is reported as a failure instead.

What a marker needs is checked here, once, before the test runs:

* `system`: root.
* `dpdk`: dpdk-testpmd, stdbuf and free hugepages.
* `qemu`: qemu-system-x86_64.

Tests that need more can use the `require_tool` / `require_root` fixtures or
the plain functions below (`pytest.skip` from anywhere is covered by the
policy).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess

import pytest

from tests.support.daemon import Vswitchd
from tests.support.testpmd import hugepages_free

IN_CI = bool(os.environ.get("CI"))
INSTALL_HINT = "run tools/setup-test-env.sh as root to install it"

# Enough for two testpmd processes with the fixture's small mbuf pools (about
# 60 x 2 MB pages each) and some headroom for a switch that uses hugepages.
DPDK_MIN_HUGEPAGES = 256

# Tools each marker needs: (command, Debian package that provides it).
MARKER_TOOLS = {
    "dpdk": [("dpdk-testpmd", "dpdk-dev"), ("stdbuf", "coreutils")],
    "qemu": [("qemu-system-x86_64", "qemu-system-x86")],
}


def require_root() -> None:
    """Skip (in CI: fail) unless running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, hugepages, vhost-user peers); "
                    "run the tests as root, e.g. sudo tools/run-tests")


def require_tool(tool: str, package: str | None = None) -> str:
    """Return the path of `tool`; skip (in CI: fail) with how to install it if it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found (Debian package {package or tool}); {INSTALL_HINT}")
    return path


def require_hugepages(pages: int = DPDK_MIN_HUGEPAGES) -> None:
    """Skip (in CI: fail) unless `pages` default-size hugepages are free."""
    free = hugepages_free()
    if free < pages:
        pytest.skip(f"needs {pages} free hugepages, /proc/meminfo HugePages_Free is {free}: "
                    f"echo 1024 > /proc/sys/vm/nr_hugepages as root, or run tools/setup-test-env.sh")


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test():
    """Stops a vswitchd the test left running: one whose test failed before
    its stop() would otherwise run on, holding its CPU settings and sockets.
    Daemons of wider fixtures (a module's) are set up before this, and kept."""
    before = set(Vswitchd.started)
    yield
    for d in Vswitchd.started - before:
        d.stop(timeout=5)


@pytest.fixture(autouse=True)
def _marker_requirements(request):
    """Check what the test's markers say it needs before it runs."""
    markers = {mark.name for mark in request.node.iter_markers()}
    if "system" in markers:
        require_root()
    for marker, tools in MARKER_TOOLS.items():
        if marker in markers:
            for tool, package in tools:
                require_tool(tool, package)
    if "dpdk" in markers:
        require_hugepages()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI, a skipped `system` test is a failure: the test command installs its peers."""
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped and item.get_closest_marker("system")):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"system test skipped under CI=true, which counts as a failure "
                       f"(tools/run-tests installs what these tests need): {reason}")


@pytest.fixture(name="require_root")
def require_root_fixture() -> None:
    """Request this fixture to make a test skip (in CI: fail) unless run as root."""
    require_root()


@pytest.fixture(name="require_tool")
def require_tool_fixture():
    """The `require_tool(tool, package)` function, for tests that need a particular tool."""
    return require_tool


@pytest.fixture
def closing():
    """closing(thing): thing.close() after the test, last added first."""
    things = []
    yield things.append
    for t in reversed(things):
        t.close()


_netns_ids = itertools.count()


@pytest.fixture
def netns():
    """A fresh, empty network namespace name; deleted (and anything left in it killed) afterwards."""
    require_root()
    require_tool("ip", "iproute2")
    name = f"vst-{os.getpid()}-{next(_netns_ids)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    try:
        yield name
    finally:
        # Processes a test left inside are its own: stop them by PID so the namespace really goes.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
