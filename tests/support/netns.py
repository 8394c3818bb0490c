"""Network namespaces and veth pairs for the kernel-port tests.

Every name a test gets here is unique to the test process and removed at
teardown (the conftest `netns` fixture removes namespaces; `veth_pair`
deletes its pair).  Addresses are only ever given inside namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.daemon import REPO


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command (no shell), raising with its stderr on failure."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def python_in_ns(ns: str, *args: str) -> subprocess.Popen:
    """Starts `python ARGS` inside a namespace, from the repository (for tests.support modules)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def link_mac(ns: str | None, ifname: str) -> str:
    cmd = ["ip"] + (["-n", ns] if ns else []) + ["-o", "link", "show", ifname]
    out = sh(*cmd).stdout.split()
    return out[out.index("link/ether") + 1]


def unique(prefix: str, n: int) -> str:
    """An interface name (at most 15 bytes) unique to this test process."""
    return f"{prefix}{os.getpid() % 100000}{n}"[:15]
