"""Instructions the vhost ring engine spends per frame, per virtio path, counted by callgrind.

Two vhost ports with mock guests in this process (tests/support/virtio_driver.py's
memory and memory table), laid out as the benchmark's generator lays out its
rings (DPDK virtio-user, tools/bench.py): one descriptor per buffer, each
buffer an "mbuf" of a pool with the frame at offset 128 and the 12-byte
virtio-net header just before it; receive buffers of 2048 + 12 bytes.  Each
pass the first guest makes 32 frames available on its TX ring, the second
makes 32 receive buffers available again, and one vs_pmd_poll_once forwards
the frames (the destination is learned first).  The front-end's work is
Python and not counted; only vs_pmd_poll_once is:

    python3 -m tools.ring_cost --matrix            # every path, 64 and 1518 B, under callgrind
    python3 -m tools.ring_cost --path packed --size 1518    # one configuration, for valgrind by hand:
    valgrind --tool=callgrind '--toggle-collect=_cffi_f_vs_pmd_poll_once*' \\
        --callgrind-out-file=/tmp/cg.out "$(python3 -c 'import sys; print(sys.executable)')" \\
        -m tools.ring_cost --path packed --size 1518

`--time split,packed --sizes 64,1518 --passes 20000` runs the same rig without
valgrind and prints the nanoseconds per frame of vs_pmd_poll_once over the
passes (fastest, 10th percentile, median): on a shared host only the fastest
passes are comparable between runs, so alternate the builds you compare.

`--matrix` prints, per path and frame size, the instructions per frame of the
whole pass and of its two ring sides (callgrind_annotate's inclusive counts):
*dequeue* is taking frames off the source guest's TX ring and returning them
(vhost_rx_burst and vhost_rx_done: the port's receive side), *enqueue* is
filling the destination guest's RX ring (vhost_tx_burst).  The paths are the
benchmark's (`--paths`): split or packed, with or without IN_ORDER and
mergeable RX buffers.  Instruction counts are exact and repeat run to run,
so they compare the code paths; they say nothing of cache misses between
the switch's and the guest's cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import statistics
import sys
import tempfile
import time

from tests.support.virtio_driver import GuestMemory, memtable_for
from vswitch.fib import MacTable
from vswitch.native import ffi, lib

BURST = 32
RING = 256
MBUF_STRIDE = 2368           # a DPDK mempool element of 2176-byte mbufs: header, headroom, data room
HEADROOM = 128
HDR_LEN = 12
RX_BUF_LEN = 2048 + HDR_LEN  # what DPDK's virtio PMD posts: buf_len - headroom + header
F_AVAIL, F_USED, F_WRITE = 1 << 7, 1 << 15, 2
PATHS = {
    "split": dict(packed=False, in_order=True, mrg=True),
    "packed": dict(packed=True, in_order=True, mrg=True),
    "split-no-in-order": dict(packed=False, in_order=False, mrg=True),
    "packed-no-in-order": dict(packed=True, in_order=False, mrg=True),
    "split-no-mrg": dict(packed=False, in_order=True, mrg=False),
    "packed-no-mrg": dict(packed=True, in_order=True, mrg=False),
}
SIDES = {"dequeue": ("vhost_rx_burst", "vhost_rx_done"), "enqueue": ("vhost_tx_burst",)}


class Driver:
    """The guest side of one port: a TX and an RX ring and a pool of buffers,
    written with plain stores in the order a driver must (flags or index last)."""

    def __init__(self, port_no: int, features: int, packed: bool):
        self.keep: list = []
        self.mem = GuestMemory(8 << 20, gpa_base=0x100000, name=f"ring-cost-{port_no}")
        self.mm = self.mem.mm
        self.packed = packed
        self.dev = ffi.new("struct vs_vhost_dev *")
        lib.vs_vhost_dev_init(self.dev, 1)
        lib.vs_vhost_dev_set_features(self.dev, features)
        self.dev.mem = memtable_for(ffi, [self.mem], self.keep)
        self.rings = {}
        for index in (0, 1):
            if packed:
                desc = self.mem.alloc(16 * RING, 64)
                drv, devev = self.mem.alloc(4, 4), self.mem.alloc(4, 4)
                self.mem.write(drv + 2, struct.pack("<H", 1))          # the driver polls: no interrupts
                addrs, base = (desc, drv, devev), 1 << 15
            else:
                desc = self.mem.alloc(16 * RING, 64)
                avail = self.mem.alloc(6 + 2 * RING, 64)
                used = self.mem.alloc(6 + 8 * RING, 64)
                self.mem.write(avail, struct.pack("<H", 1))            # VIRTQ_AVAIL_F_NO_INTERRUPT
                addrs, base = (desc, avail, used), 0
            uvas = [self.mem.gpa_to_uva(a) for a in addrs]
            assert lib.vs_vring_setup(self.dev, index, RING, *uvas, base) == 0
            lib.vs_vring_set_enabled(ffi.addressof(self.dev.vrings[index]), 1)
            self.rings[index] = {"desc": desc, "avail": addrs[1], "next": 0, "wrap": 1}
        pool = self.mem.alloc(MBUF_STRIDE * RING, 64)
        self.bufs = [pool + i * MBUF_STRIDE + HEADROOM for i in range(RING)]   # where a frame starts
        self.port = ffi.new("struct vs_port *")
        self.port.port_no, self.port.ops, self.port.priv, self.port.link_up = port_no, lib.vs_vhost_port_ops(), \
            self.dev, 1

    def _off(self, gpa: int) -> int:
        return gpa - self.mem.gpa_base

    def post(self, index: int, descs: list[tuple[int, int, int]]) -> None:
        """Makes (addr, len, flags) buffers available, one descriptor each, id = slot."""
        r = self.rings[index]
        if self.packed:
            writes = []
            for addr, length, flags in descs:
                slot = r["next"]
                avail_bits = F_AVAIL if r["wrap"] else F_USED
                writes.append((slot, addr, length, flags | avail_bits))
                r["next"] = (slot + 1) % RING
                r["wrap"] ^= r["next"] == 0
            for slot, addr, length, flags in writes[1:] + writes[:1]:   # the first one's flags last
                struct.pack_into("<QIHH", self.mm, self._off(r["desc"] + 16 * slot), addr, length, slot, flags)
            return
        start = r["next"]
        for k, (addr, length, flags) in enumerate(descs):
            slot = (start + k) % RING
            struct.pack_into("<QIHH", self.mm, self._off(r["desc"] + 16 * slot), addr, length, flags, 0)
            struct.pack_into("<H", self.mm, self._off(r["avail"] + 4 + 2 * slot), slot)
        r["next"] = (start + len(descs)) & 0xFFFF
        struct.pack_into("<H", self.mm, self._off(r["avail"] + 2), r["next"])

    def post_tx(self, frames: list[bytes]) -> None:
        descs = []
        for f in frames:
            slot = self.rings[1]["next"] % RING
            addr = self.bufs[slot] - HDR_LEN
            self.mem.write(addr, bytes(HDR_LEN) + f)
            descs.append((addr, HDR_LEN + len(f), 0))
        self.post(1, descs)

    def post_rx(self, n: int) -> None:
        descs = []
        for k in range(n):
            slot = (self.rings[0]["next"] + k) % RING
            descs.append((self.bufs[slot] - HDR_LEN, RX_BUF_LEN, F_WRITE))
        self.post(0, descs)

    def close(self) -> None:
        for obj in self.keep:
            ffi.release(obj)
        self.mem.close()


def features_of(path: str) -> int:
    p = PATHS[path]
    f = 1 << lib.VIRTIO_F_VERSION_1
    f |= (1 << lib.VIRTIO_F_RING_PACKED) if p["packed"] else 0
    f |= (1 << lib.VIRTIO_F_IN_ORDER) if p["in_order"] else 0
    f |= (1 << lib.VIRTIO_NET_F_MRG_RXBUF) if p["mrg"] else 0
    return f


def run(path: str, size: int, passes: int) -> list[int]:
    """Forwards passes * 32 frames; returns each pass's nanoseconds in vs_pmd_poll_once."""
    packed = PATHS[path]["packed"]
    a, b = Driver(0, features_of(path), packed), Driver(1, features_of(path), packed)
    fib = MacTable(max_entries=1024)
    pmd = ffi.new("struct vs_pmd *")
    assert lib.vs_pmd_init(pmd, fib.c) == 0
    table = ffi.new("struct vs_port_table *")
    for i, d in enumerate((a, b)):
        table.ports[i] = d.port
        table.live[i] = i
        table.poll[i].port, table.poll[i].queue = d.port, 0
    table.n_live = table.n_poll = 2
    lib.vs_pmd_publish(pmd, table)
    mac_a, mac_b = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    # The destination is learned from a reply first (not counted: it is the first call).
    a.post_rx(RING - BURST)
    b.post_tx([mac_a + mac_b + b"\x08\x00" + bytes(50)])
    assert lib.vs_pmd_poll_once(pmd) == 1
    table.n_poll = 1                                   # only the source's TX ring from now on
    b.post_rx(RING - BURST)
    frame = mac_b + mac_a + b"\x08\x00" + bytes(range(256)) * (size // 256) + bytes(size - 14 - 4 - size // 256 * 256)
    forwarded = 0
    times = []
    clock = time.perf_counter_ns
    for _ in range(passes):
        a.post_tx([frame] * BURST)
        t0 = clock()
        forwarded += lib.vs_pmd_poll_once(pmd)
        times.append(clock() - t0)
        b.post_rx(BURST)
    rx, tx = b.dev.vrings[0].stats, a.dev.vrings[1].stats
    print(f"{path} {len(frame)} B: {forwarded} frames forwarded in {passes} passes; destination RX ring "
          f"{rx.packets} packets, {rx.dropped} dropped; source TX ring {tx.packets}")
    assert rx.packets == forwarded == passes * BURST and rx.dropped == 0, "the rig lost frames"
    last = b.bufs[(passes * BURST - 1) % RING]        # receive buffers are used in ring order
    got = b.mem.read(last - HDR_LEN, HDR_LEN + len(frame))
    assert got == bytes(10) + struct.pack("<H", 1) + frame, "the last frame arrived wrong"
    lib.vs_pmd_fini(pmd)
    fib.close()
    a.close()
    b.close()
    return times


def callgrind(path: str, size: int, passes: int, out_dir: str) -> dict:
    """Instructions per frame of the pass and of each side, for one configuration,
    and under "functions" each function's own instructions (any object file)."""
    out = os.path.join(out_dir, f"cg-{path}-{size}.out")
    subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=_cffi_f_vs_pmd_poll_once*",
                    f"--callgrind-out-file={out}", sys.executable, "-m", "tools.ring_cost", "--path", path,
                    "--size", str(size), "--passes", str(passes)],
                   check=True, capture_output=True, text=True)
    frames = passes * BURST + 1
    with open(out) as f:
        total = int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1))

    def per_function(inclusive: str, objects: str) -> dict[str, int]:
        report = subprocess.run(["callgrind_annotate", f"--inclusive={inclusive}", out], check=True,
                                capture_output=True, text=True).stdout
        counts: dict[str, int] = {}
        for line in report.splitlines():
            # A function inlined from several files is listed once per file, and
            # once as a whole: the latter is the line naming the object file.
            m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?\S*:(\S+) \[(\S+)\]$", line)
            if m and re.search(objects, m.group(3)):
                fn = m.group(2).split(".")[0]
                counts[fn] = counts.get(fn, 0) + int(m.group(1).replace(",", ""))
        return counts

    inclusive = per_function("yes", "_native")
    result: dict = {"pass": total / frames, "functions": per_function("no", ".")}
    for side, fns in SIDES.items():
        result[side] = sum(inclusive.get(fn, 0) for fn in fns) / frames
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", choices=sorted(PATHS), default="packed")
    p.add_argument("--size", type=int, default=1518, help="frame bytes, FCS included as the benchmark counts")
    p.add_argument("--passes", type=int, default=200)
    p.add_argument("--matrix", action="store_true", help="run every path at --sizes under callgrind, print a table")
    p.add_argument("--sizes", default="64,1518")
    p.add_argument("--time", metavar="PATHS", help="no valgrind: time vs_pmd_poll_once on these paths "
                   "(comma-separated) at --sizes, in this process, and print ns per frame over the passes "
                   "(min, 10th percentile, median: on a shared host the low ones are the undisturbed passes)")
    args = p.parse_args()
    if args.time:
        for size in (int(s) for s in args.sizes.split(",")):
            for path in args.time.split(","):
                ns = run(path, size, args.passes)[args.passes // 10:]     # the first passes warm the caches
                p10 = statistics.quantiles(ns, n=10)[0]
                print(f"time {path} {size} B: ns/frame min {min(ns) / BURST:.1f}, 10th percentile "
                      f"{p10 / BURST:.1f}, median {statistics.median(ns) / BURST:.1f}", flush=True)
        return
    if not args.matrix:
        run(args.path, args.size, args.passes)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found (Debian package valgrind)")
    print("| path | frame | pass | dequeue (TX ring) | enqueue (RX ring) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for path in PATHS:
                r = callgrind(path, size, args.passes, tmp)
                print(f"| {path} | {size} B | {r['pass']:.1f} | {r['dequeue']:.1f} | {r['enqueue']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
