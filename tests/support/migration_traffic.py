"""Traffic that watches a guest move, run inside a network namespace
(`ip netns exec NS python -m tests.support.migration_traffic ...`).

    migration_traffic.py ping HOST INTERVAL_MS
        An ICMP echo request every INTERVAL_MS until SIGTERM; then, after a
        second for late replies, one JSON line: sent, received, lost, the
        longest run of consecutive losses, and both as milliseconds.
    migration_traffic.py send HOST PORT BYTES BYTES_PER_SECOND
        A TCP stream of BYTES pseudo-random bytes, paced, so that it is still
        running while the guest moves; prints "<bytes> <sha256> <seconds>".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(host: str, interval_ms: float) -> None:
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(0.2)
    replies: set[int] = set()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def receive() -> None:
        while not (stop.is_set() and time.monotonic() > stopped_at[0] + 1.0):
            try:
                data = sock.recv(2048)
            except socket.timeout:
                continue
            ihl = (data[0] & 0xF) * 4
            kind, _code, _sum, rid, seq = struct.unpack_from("!BBHHH", data, ihl)
            if kind == ICMP_ECHO_REPLY and rid == ident:
                replies.add(seq)

    stopped_at = [float("inf")]
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    print("pinging", flush=True)
    sent = 0
    next_at = time.monotonic()
    while not stop.is_set():
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, sent & 0xFFFF)
        payload = struct.pack("!d", time.time()) + bytes(48)
        packet = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(header + payload), ident, sent & 0xFFFF)
        try:
            sock.sendto(packet + payload, (host, 0))
        except OSError:
            pass                          # no route yet, or a full queue: counted as lost
        sent += 1
        next_at += interval_ms / 1000
        time.sleep(max(0.0, next_at - time.monotonic()))
    stopped_at[0] = time.monotonic()
    receiver.join()
    lost_seqs = [s for s in range(sent) if s & 0xFFFF not in replies]
    longest = run = 0
    for s in range(sent):
        run = run + 1 if s & 0xFFFF not in replies else 0
        longest = max(longest, run)
    print(json.dumps({"sent": sent, "received": sent - len(lost_seqs), "lost": len(lost_seqs),
                      "longest_lost_run": longest, "interval_ms": interval_ms,
                      "lost_ms": len(lost_seqs) * interval_ms, "longest_gap_ms": longest * interval_ms,
                      "first_lost": lost_seqs[:20]}), flush=True)


def send(host: str, port: int, nbytes: int, rate: float, timeout: float = 120.0) -> None:
    block = random.Random(nbytes).randbytes(1 << 16)
    digest, sent, start = hashlib.sha256(), 0, time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        while sent < nbytes:
            piece = block[:min(len(block), nbytes - sent)]
            s.sendall(piece)
            digest.update(piece)
            sent += len(piece)
            # Paced: the stream lasts nbytes / rate seconds.
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        s.shutdown(socket.SHUT_WR)
        s.recv(1)   # wait for the peer to close: everything arrived
    print(sent, digest.hexdigest(), f"{time.monotonic() - start:.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "ping":
        ping(sys.argv[2], float(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
