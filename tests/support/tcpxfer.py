"""A TCP bulk transfer with a checksum, for tests that run it inside network
namespaces (`ip netns exec NS python -m tests.support.tcpxfer ...`).

    tcpxfer.py serve PORT            # accept one connection, print "<bytes> <sha256> <seconds>"
    tcpxfer.py send HOST PORT BYTES [TIMEOUT]  # send BYTES pseudo-random bytes, print "<bytes> <sha256> <seconds>"
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import time


def serve(port: int, timeout: float = 60.0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(1)
        ls.settimeout(timeout)
        print("listening", flush=True)
        conn, _ = ls.accept()
        conn.settimeout(timeout)
        digest, total, start = hashlib.sha256(), 0, time.monotonic()
        with conn:
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
        print(total, digest.hexdigest(), f"{time.monotonic() - start:.3f}", flush=True)


def send(host: str, port: int, nbytes: int, timeout: float = 60.0) -> None:
    rng = random.Random(nbytes)
    block = rng.randbytes(1 << 20)
    digest, sent, start = hashlib.sha256(), 0, time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        while sent < nbytes:
            piece = block[:min(len(block), nbytes - sent)]
            s.sendall(piece)
            digest.update(piece)
            sent += len(piece)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)   # wait for the peer to close: everything arrived
    print(sent, digest.hexdigest(), f"{time.monotonic() - start:.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *(float(a) for a in sys.argv[5:6]))
