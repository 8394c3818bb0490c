"""Small helpers shared by the tests: test MACs, Ethernet frames, waiting."""

from __future__ import annotations

import time

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    """A locally administered test MAC, 02:00:00:00:00:nn."""
    return bytes([0x02, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 50) -> bytes:
    """An IPv4-typed Ethernet frame (the payload is not parsed by the switch)."""
    return dst + src + b"\x08\x00" + payload


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    """Polls until predicate() is truthy and returns its value, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
