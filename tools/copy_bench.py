"""The copy's speed limit on this machine: memcpy against the switch's own frame copy, in bytes per TSC cycle.

Run from the repository root:

    python -m tools.copy_bench                       # 64,512,1518,9000 bytes, warm and cold
    python -m tools.copy_bench --sizes 64,1518 --copies 200000
    python -m tools.copy_bench --dst-offsets 0,12,64     # where the destination sits in its page

Method
------
vswitch/pmd/copy_bench.c (vs_copy_bench_run, in the switch's own build)
times a loop of copies of one size with the TSC: libc's memcpy, and
vs_vq_copy_frame, the routine that copies a frame into a guest's receive
buffers (a 12-byte virtio-net header, then the frame; the vhost ring's
one-buffer fast path makes the same two memcpy calls).  Warm: the same
source and destination every time, so both stay in L1/L2.  Cold: every copy
from and to buffers of their own, 12 KiB apart in 128 MiB pools, flushed
from every cache (clflush) before the clock starts and taken in a random
order, so no prefetcher guesses the next one; like a guest's buffer the
switch has not touched since the guest wrote it on another core, without
the cross-core snoop (the line is in memory, not in the other core's
cache).  Each point is the best of --reps loops (the least disturbed on a
shared host).  --dst-offsets: the destination starts that many bytes
further into its page than the source (copy_frame's frame 12 more, after
the header): on this machine glibc's memcpy of 4 KiB or more is two
orders of magnitude slower when the destination is a few bytes ahead of
the source modulo 4096 (README "The switch's own cost").  "Cycles" are TSC ticks, the unit of pmd-stats; this VM has
no hardware counters to count core cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vswitch.native import ffi, lib

ROUTINES = {"memcpy": lib.VS_COPY_MEMCPY, "copy_frame": lib.VS_COPY_FRAME}


def run_one(size: int, routine: str, cold: bool, copies: int, dst_offset: int = 0) -> dict:
    """One timed loop; raises OSError if the benchmark fails or a copy came out wrong."""
    b = ffi.new("struct vs_copy_bench *")
    b.size, b.routine, b.cold, b.copies, b.dst_offset = size, ROUTINES[routine], int(cold), copies, dst_offset
    rc = lib.vs_copy_bench_run(b)
    if rc != 0:
        raise OSError(-rc, f"copy benchmark {routine} {size} B {'cold' if cold else 'warm'}: {os.strerror(-rc)}")
    return {"copies": b.copies, "cycles": b.cycles, "bytes": b.bytes}


def measure(size: int, routine: str, cold: bool, copies: int, reps: int, dst_offset: int = 0) -> dict:
    runs = [run_one(size, routine, cold, copies, dst_offset) for _ in range(reps)]
    best = min(runs, key=lambda r: r["cycles"] / r["copies"])
    per_copy = best["cycles"] / best["copies"]
    return {"size": size, "routine": routine, "cache": "cold" if cold else "warm", "dst_offset": dst_offset,
            "copies": best["copies"],
            "cycles_per_copy": round(per_copy, 1), "bytes_per_cycle": round(best["bytes"] / best["cycles"], 2),
            "runs_cycles_per_copy": [round(r["cycles"] / r["copies"], 1) for r in runs]}


def table(rows: list[dict]) -> str:
    lines = ["| frame | routine | cache | dst offset | cycles/copy | bytes/cycle |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} B | {r['routine']} | {r['cache']} | {r['dst_offset']} | {r['cycles_per_copy']} "
                     f"| {r['bytes_per_cycle']} |")
    return "\n".join(lines)


def run(sizes: list[int], copies: int, cold_copies: int, reps: int, dst_offsets: tuple[int, ...] = (0,)) -> list[dict]:
    rows = []
    for size in sizes:
        for cold in (False, True):
            for offset in dst_offsets:
                for routine in ROUTINES:
                    rows.append(measure(size, routine, cold, cold_copies if cold else copies, reps, offset))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.copy_bench", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,512,1518,9000", help="frame sizes in bytes (default 64,512,1518,9000)")
    p.add_argument("--copies", type=int, default=1_000_000, help="copies per warm loop (default 1000000)")
    p.add_argument("--cold-copies", type=int, default=10_000, help="copies per cold loop, one per buffer (default 10000)")
    p.add_argument("--reps", type=int, default=5, help="loops per point, best reported (default 5)")
    p.add_argument("--dst-offsets", default="0",
                   help="destination's offset in its page past the source's, bytes (default 0); copy_frame "
                        "adds its 12-byte header")
    p.add_argument("--out", help="write the rows and the host's state as JSON here")
    args = p.parse_args(argv)
    rows = run([int(s) for s in args.sizes.split(",")], args.copies, args.cold_copies, args.reps,
               tuple(int(o) for o in args.dst_offsets.split(",")))
    print(table(rows))
    if args.out:
        meta = {"host_cpus": os.cpu_count(), "load_average": os.getloadavg(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reps": args.reps}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
