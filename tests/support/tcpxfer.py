"""A TCP bulk transfer with a checksum, for tests that run it inside network
namespaces (`ip netns exec NS python -m tests.support.tcpxfer ...`).

    tcpxfer.py serve PORT            # accept one connection, print "<bytes> <sha256> <seconds>"
    tcpxfer.py send HOST PORT BYTES [TIMEOUT]  # send BYTES pseudo-random bytes, print "<bytes> <sha256> <seconds>"

`namespace_to_guest` and `guest_to_namespace` run both ends against a QEMU
guest of tools/vmkit (busybox `nc` in the guest) and check the checksums.
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


def namespace_to_guest(guest, netns: str, guest_ip: str, nbytes: int, port: int = 5001,
                       timeout: float = 300.0) -> tuple[int, float]:
    """Sends nbytes from the namespace to the guest; returns (bytes, seconds) once the guest has
    them all with the right SHA-256."""
    from tests.support.netns import python_in_ns
    # A subshell's job, reaped by PID 1: not a job of the console shell (tools/vmkit.py Guest.run).
    guest.run(f"(nc -l -p {port} < /dev/null > /tmp/in &)")
    time.sleep(1)
    sender = python_in_ns(netns, "-m", "tests.support.tcpxfer", "send", guest_ip, str(port), str(nbytes),
                          str(timeout))
    out, err = sender.communicate(timeout=timeout + 60)
    assert sender.returncode == 0, err
    sent, digest, seconds = out.split()
    # The sender is done once its kernel has the bytes (busybox nc closes its side at once): the
    # tail may still be on its way, resent after drops, so the guest waits for all of it.
    text = guest.run(f"for i in $(seq 120); do [ $(wc -c < /tmp/in) -ge {nbytes} ] && break; sleep 1; done; "
                     "wc -c < /tmp/in; sha256sum /tmp/in; rm /tmp/in", timeout=180)
    assert str(nbytes) in text and digest in text, f"guest got: {text}"
    return int(sent), float(seconds)


def guest_to_namespace(guest, netns: str, ns_ip: str, nbytes: int, port: int = 5002) -> tuple[int, float]:
    """Sends nbytes (a multiple of 64 KiB) of random data from the guest to the namespace; returns
    (bytes, seconds) once the namespace has them all with the right SHA-256."""
    import re
    from tests.support.netns import python_in_ns
    receiver = python_in_ns(netns, "-m", "tests.support.tcpxfer", "serve", str(port))
    try:
        assert receiver.stdout.readline().strip() == "listening"
        text = guest.run(f"dd if=/dev/urandom of=/tmp/out bs=65536 count={nbytes // 65536} 2>/dev/null; "
                         "sha256sum /tmp/out", timeout=120)
        digest = re.search(r"([0-9a-f]{64})", text).group(1)
        guest.run(f"nc {ns_ip} {port} < /tmp/out; rm /tmp/out", timeout=300)
        got, got_digest, seconds = receiver.stdout.readline().split()
    finally:
        receiver.kill()
        receiver.communicate()
    assert (int(got), got_digest) == (nbytes, digest)
    return int(got), float(seconds)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *(float(a) for a in sys.argv[5:6]))
