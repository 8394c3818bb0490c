"""Fuzzing under sanitizers (fuzz/, tools/fuzz.py), and the bugs it found.

Each harness runs for a bounded time here (tools/fuzz.py builds them with
clang -fsanitize=fuzzer,address,undefined); any sanitizer report, crash or
broken invariant fails the test with the harness's own report.  The longer
run that gives the README's figures is `python -m tools.fuzz --minutes 10`.

Below them, a regression test for each bug the fuzzers found, in plain
pytest against the normal build, so it runs without clang too.
"""

from __future__ import annotations

from tests.unit.test_offload import make_pkt, run_fit
from vswitch.native import lib

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
