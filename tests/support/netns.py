"""Network namespaces and veth pairs for the kernel-port tests.

Every name a test gets here is unique to the test process and removed at
teardown (the conftest `netns` fixture removes namespaces; `veth_pair`
deletes its pair; `namespaces` deletes its own).  Addresses are only ever
given inside namespaces.  `EventStream` follows a switch's events (link
up/down) while a test moves interfaces around under it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.support.daemon import REPO

_extra_ids = itertools.count()


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


@contextlib.contextmanager
def namespaces(count: int):
    """`count` more fresh network namespaces (names unique to this process), deleted afterwards
    with anything a test left running inside them; for tests that need more than the `netns` fixture."""
    names = [f"vsx-{os.getpid()}-{next(_extra_ids)}" for _ in range(count)]
    made: list[str] = []
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            made.append(name)
        yield names
    finally:
        for name in made:
            delete_namespace(name)


def delete_namespace(name: str) -> None:
    """Deletes a namespace (if it still exists), killing what runs in it first so it really goes."""
    for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", name, check=False)


def ping(ns: str, ip: str, count: int = 1, wait: int = 1) -> bool:
    """True if `count` busybox pings from namespace `ns` to `ip` are all answered (each within `wait` s)."""
    out = in_ns(ns, "busybox", "ping", "-c", str(count), "-i", "0.2", "-W", str(wait), ip, check=False)
    return out.returncode == 0 and f"{count} packets received" in out.stdout


def ping_until(ns: str, ip: str, timeout: float = 10.0) -> float:
    """Pings until one is answered; returns the seconds it took, or raises after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ping(ns, ip):
            return time.monotonic() - start
    raise AssertionError(f"no answer from {ip} (pinging from namespace {ns}) in {timeout} s")


class EventStream:
    """The events of a running Vswitchd (what `vswitchctl events` streams), collected in the
    background from the moment the constructor returns; a context manager.

    >>> with EventStream(d) as events:
    ...     events.wait_link("tap0", "up")
    """

    def __init__(self, daemon):
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(daemon.control_socket)
        self._sock.sendall(b'{"command": "events/subscribe"}\n')
        self._file = self._sock.makefile("rb")
        reply = json.loads(self._file.readline() or b"{}")
        assert reply.get("ok"), f"cannot subscribe to events: {reply}"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._file:
                with self._lock:
                    self.events.append(json.loads(line))
        except (OSError, ValueError):
            pass

    def links(self, port: str) -> list[dict]:
        """The link events of one port so far, oldest first."""
        with self._lock:
            return [e for e in self.events if e["event"] == "link" and e.get("port") == port]

    def wait(self, match, timeout: float = 10.0) -> dict:
        """The first event (old or new) that satisfies `match`; raises after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if match(event):
                        return event
            time.sleep(0.02)
        raise AssertionError(f"no matching event in {timeout} s; got {self.events}")

    def wait_link(self, port: str, state: str, after: float = 0.0, timeout: float = 10.0) -> dict:
        """The first `link` event of `port` with `state` whose time is past `after` (time.time())."""
        return self.wait(lambda e: e["event"] == "link" and e.get("port") == port and e["state"] == state
                         and e["time"] >= after, timeout)

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(5)
        self._file.close()
        self._sock.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kport_open(opener, netns: str | None = None) -> int:
    """Runs `opener(netns_fd)` (a vs_kport_open_* call) on a helper thread, as the daemon does:
    the C side enters the namespace with setns(), which would otherwise move the test's thread."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC) if netns else -1
    result: list[int] = []
    try:
        helper = threading.Thread(target=lambda: result.append(opener(fd)))
        helper.start()
        helper.join()
    finally:
        if fd >= 0:
            os.close(fd)
    return result[0]


def kport_transmit(kp, frames: list[bytes]) -> None:
    """Hands frames to a struct vs_kport's transmit path (queue 0) in one burst, as the PMD does."""
    from vswitch.native import ffi, lib

    keep = [ffi.from_buffer(f) for f in frames]
    pkts = ffi.new("struct vs_pkt[]", len(frames))
    for pkt, buf, frame in zip(pkts, keep, frames):
        pkt.len = len(frame)
        pkt.nsegs = 1
        pkt.segs[0].addr = ffi.cast("uint8_t *", buf)
        pkt.segs[0].len = len(frame)
    ptrs = ffi.new("struct vs_pkt *[]", [pkts + i for i in range(len(frames))])
    lib.vs_kport_tx_burst(kp, 0, ptrs, len(frames))


def kport_stats(kp) -> dict:
    """The counters of queue 0 of a struct vs_kport, and whether it is marked gone."""
    s = kp.stats[0]
    return {"tx_packets": s.tx_packets, "tx_dropped": s.tx_dropped, "tx_errors": s.tx_errors,
            "rx_packets": s.rx_packets, "rx_errors": s.rx_errors, "fault": kp.fault}


TEST_ETHERTYPE = 0x88B5   # IEEE local experimental: nothing else on a test link sends it

_CAPTURE = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind((sys.argv[1], 0x88B5))
s.settimeout(15)
print("ready", flush=True)
seen = []
while True:
    try:
        frame = s.recv(65536)
    except socket.timeout:
        break
    payload = frame[14:].rstrip(b"\0").decode(errors="replace")
    if payload == "end":
        break
    seen.append(payload)
print(" ".join(seen), flush=True)
"""


def marked_frame(payload: str) -> bytes:
    """A broadcast frame of TEST_ETHERTYPE carrying `payload` (what `Capture` reports)."""
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x99" + TEST_ETHERTYPE.to_bytes(2, "big") + payload.encode().ljust(46, b"\0")


class Capture:
    """Collects the payloads of TEST_ETHERTYPE frames arriving on `ifname` in namespace `ns`
    until a frame says "end"; `result()` returns them in order."""

    def __init__(self, ns: str, ifname: str):
        self.proc = python_in_ns(ns, "-c", _CAPTURE, ifname)
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"capture did not start: {line} {self.proc.stderr.read() if not line else ''}"

    def result(self, timeout: float = 20.0) -> list[str]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return out.split()
