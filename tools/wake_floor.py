"""How long this host takes to wake a thread blocked on an eventfd: the
floor under a sleeping PMD's latency, whatever the switch does.

    python3 -m tools.wake_floor                      # 100 wakes, 100 ms apart, CPU 1 woken from CPU 0
    python3 -m tools.wake_floor --cpu-qos            # the same, CPU 1 held to polling idle meanwhile
    python3 -m tools.wake_floor --gap-ms 2 --count 500

Method
------
vs_wake_probe_run (vswitch/pmd/core_probe.c, C, so that no interpreter is
in the figure): a sleeper thread pinned to --cpu blocks in ppoll() on an
eventfd, as a sleeping PMD blocks in ppoll() on a guest's kick eventfd.  A
waker thread pinned to --waker-cpu waits --gap-ms (asleep, then spinning
the last 200 us so that its own wake-up is not in the figure), reads
CLOCK_MONOTONIC and writes the eventfd, as a guest's kick does, then spins
until the sleeper has answered, as a guest spins on its ring.  The sleeper
reads CLOCK_MONOTONIC as soon as ppoll() returns.  The difference is the
wake-up: the kernel's wake of a thread on another CPU, and that CPU's (and
in a VM the hypervisor's) way out of idle.  --cpu-qos holds --cpu's resume
latency at 0 for the run (polling idle only), as `pmd:
{cpu_resume_latency_us: 0}` does (vswitch/pmd/cpu_wake.py), and puts the
value found before back afterwards.

Reported: p10, p50, p90 and p99 of the wake-ups in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from tools.latency import percentile
from vswitch.native import ffi, lib
from vswitch.pmd import cpu_wake


def measure(count: int, gap_ms: float, cpu: int, waker_cpu: int) -> list[float]:
    """Wake-ups in microseconds, one a gap."""
    p = ffi.new("struct vs_wake_probe *")
    p.cpu_sleeper, p.cpu_waker, p.wakes = cpu, waker_cpu, count
    p.gap_us = max(1, round(gap_ms * 1000))
    p.timeout_ms = 5000
    rc = lib.vs_wake_probe_run(p)
    if rc != 0:
        raise OSError(-rc, f"wake probe: {os.strerror(-rc)}")
    return [p.ns[i] / 1000 for i in range(count)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=100, help="wake-ups to measure (default 100)")
    p.add_argument("--gap-ms", type=float, default=100.0,
                   help="idle time before each wake-up, ms (default 100: a PMD at 10 frames/s)")
    p.add_argument("--cpu", type=int, default=1, help="the sleeper's CPU (default 1, the benchmarks' SUT core)")
    p.add_argument("--waker-cpu", type=int, default=0, help="the waker's CPU (default 0)")
    p.add_argument("--cpu-qos", action="store_true", help="hold --cpu at polling idle (resume latency 0) meanwhile")
    p.add_argument("--json-out", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not 1 <= args.count <= 10_000 or not 0 < args.gap_ms <= 10_000:
        p.error("--count must be 1 to 10000 and --gap-ms above 0, at most 10000")
    if args.cpu == args.waker_cpu or not {args.cpu, args.waker_cpu} <= os.sched_getaffinity(0):
        p.error(f"--cpu and --waker-cpu must be two different CPUs of {sorted(os.sched_getaffinity(0))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    qos = None
    if args.cpu_qos:
        state = os.path.join(tempfile.mkdtemp(prefix="wake-floor-"), "cpu-qos.json")
        qos = cpu_wake.CpuResumeLatency([args.cpu], 0, state)
        qos.hold()
        if not qos.originals:
            print(f"wake_floor: cannot hold CPU {args.cpu} at polling idle (needs root)", file=sys.stderr)
            return 1
    try:
        bound = cpu_wake.current(args.cpu)
        wakes = sorted(measure(args.count, args.gap_ms, args.cpu, args.waker_cpu))
    finally:
        if qos is not None:
            qos.release()
            os.rmdir(os.path.dirname(qos.state_path))
    result = {"count": args.count, "gap_ms": args.gap_ms, "cpu": args.cpu, "waker_cpu": args.waker_cpu,
              "cpu_resume_latency": bound,
              **{f"p{q}_us": round(percentile(wakes, q), 1) for q in (10, 50, 90, 99)},
              "mean_us": round(statistics.fmean(wakes), 1), "wakes_us": [round(w, 1) for w in wakes]}
    idle = {cpu_wake.STRICT: "polling idle only", "0": "any idle state"}.get(bound,
                                                                           f"idle states left within {bound} us")
    print(f"wake-up of CPU {args.cpu} from CPU {args.waker_cpu} after {args.gap_ms:g} ms idle "
          f"({idle}), {args.count} wakes: "
          f"p10 {result['p10_us']} us, p50 {result['p50_us']}, p90 {result['p90_us']}, p99 {result['p99_us']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
