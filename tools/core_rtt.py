"""How long a cache line takes between two cores and back, probed over time.

Run from the repository root, as root (the probe's threads run SCHED_FIFO so
that busy threads already on the cores cannot stretch a round trip):

    python -m tools.core_rtt                          # cores 0 and 1, every 0.5 s for 60 s
    python -m tools.core_rtt --seconds 600 --json-out /tmp/rtt.json
    python -m tools.core_rtt --busy        # both cores kept busy between probes, as in a benchmark

Method
------
vswitch/pmd/core_probe.c (vs_core_probe_run) pins one thread to each core
and hands one cache line back and forth: 5 batches of 2,000 round trips,
each batch timed as a whole; a probe's figure is the median batch (a batch
the host interrupted does not count).  A probe takes 1-5 ms.

Why: a virtual machine's two vCPUs can sit on physical cores that share a
cache or on cores that do not, and the hypervisor moves them.  On the host
this was written on a round trip takes about 100-150 ns in one placement
and about 450 ns in the other, for seconds at a time, while a loop on one
core runs at the same speed throughout; every line a producer hands to a
consumer on the other core (ring indexes, descriptors, frames) costs that
much more.  tools/bench.py probes before and after every measurement and
compares systems within one placement ("regime"), README "Performance".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vswitch.native import ffi, lib

ROUND_TRIPS = 2000
BATCHES = 5
# Two probes belong to different placements ("regimes") when the run's
# probes, sorted, jump by at least this factor between them: the placements
# on the host this was written on differ by 3-5x, probes within one by
# well under 1.8x.
REGIME_GAP = 1.8


def probe(cpu_a: int = 0, cpu_b: int = 1, realtime: bool = True, round_trips: int = ROUND_TRIPS,
          batches: int = BATCHES) -> float:
    """Nanoseconds a cache line takes from cpu_a to cpu_b and back: the median of `batches`."""
    p = ffi.new("struct vs_core_probe *")
    p.cpu_a, p.cpu_b, p.round_trips, p.batches = cpu_a, cpu_b, round_trips, batches
    p.realtime, p.timeout_ms = int(realtime), 2000
    rc = lib.vs_core_probe_run(p)
    if rc != 0:
        raise OSError(-rc, f"core probe {cpu_a}<->{cpu_b}: {os.strerror(-rc)}")
    return round(statistics.median(p.ns[b] for b in range(batches)), 1)


def regime_split(values: list[float | None]) -> float | None:
    """The boundary between the near and the far regime among a run's probes: the
    geometric middle of the largest jump between neighbours in sorted order, if
    it is a jump of REGIME_GAP or more; None if the probes form one regime."""
    ns = sorted(v for v in values if v)
    if len(ns) < 2:
        return None
    ratio, low, high = max((b / a, a, b) for a, b in zip(ns, ns[1:]))
    return (low * high) ** 0.5 if ratio >= REGIME_GAP else None


def regime_of(ns: float | None, split: float | None) -> str | None:
    """'near' or 'far' for one probe (every probe is near when the run had one regime)."""
    if ns is None:
        return None
    return "far" if split is not None and ns > split else "near"


def spans(trace: list[tuple[float, float]], split: float | None) -> list[dict]:
    """The trace cut into runs of one regime: start, seconds, regime, median ns."""
    out: list[dict] = []
    for t, ns in trace:
        r = regime_of(ns, split)
        if out and out[-1]["regime"] == r:
            out[-1]["ns"].append(ns)
            out[-1]["end"] = t
        else:
            out.append({"regime": r, "start": t, "end": t, "ns": [ns]})
    return [{"regime": s["regime"], "start_s": round(s["start"], 1), "seconds": round(s["end"] - s["start"], 1),
             "probes": len(s["ns"]), "median_ns": round(statistics.median(s["ns"]), 1)} for s in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.core_rtt", description=__doc__.splitlines()[0])
    p.add_argument("--cpus", default="0,1", help="the two cores, A,B (default 0,1)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to probe (default 60)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between probes (default 0.5)")
    p.add_argument("--no-realtime", action="store_true", help="probe at normal priority (no root needed)")
    p.add_argument("--json-out", help="write the trace and its regimes as JSON here")
    p.add_argument("--busy", action="store_true",
                   help="keep both cores busy between probes (a spinning process pinned to each), as a "
                        "benchmark does: the host then moves the vCPUs far less often")
    args = p.parse_args(argv)
    try:
        cpu_a, cpu_b = (int(c) for c in args.cpus.split(","))
    except ValueError:
        p.error(f"--cpus wants two core numbers, A,B: {args.cpus!r}")
    if args.seconds <= 0 or args.interval <= 0:
        p.error("--seconds and --interval must be > 0")
    trace: list[tuple[float, float]] = []
    spinners = [subprocess.Popen(["taskset", "-c", str(cpu), "sh", "-c", "while :; do :; done"])
                for cpu in (cpu_a, cpu_b)] if args.busy else []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < args.seconds:
            trace.append((time.monotonic() - t0, probe(cpu_a, cpu_b, not args.no_realtime)))
            print(f"{trace[-1][0]:7.1f} s  {trace[-1][1]:7.1f} ns", flush=True)
            time.sleep(args.interval)
    except OSError as exc:
        print(f"core_rtt: {exc}", file=sys.stderr)
        return 1
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    split = regime_split([ns for _, ns in trace])
    runs = spans(trace, split)
    share = {r: sum(1 for _, ns in trace if regime_of(ns, split) == r) / len(trace) for r in ("near", "far")}
    print(f"regime boundary {'none (one regime)' if split is None else f'{split:.0f} ns'}; near "
          f"{share['near']:.0%} of probes, far {share['far']:.0%}; {len(runs)} spans of one regime, "
          f"longest {max(s['seconds'] for s in runs)} s")
    for s in runs:
        print(f"  {s['start_s']:7.1f} s  {s['seconds']:6.1f} s  {s['regime']:4}  {s['median_ns']:7.1f} ns")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({
            "tool": "tools/core_rtt.py", "cpus": [cpu_a, cpu_b],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - args.seconds)),
            "load_average": os.getloadavg(), "regime_boundary_ns": split, "regime_gap": REGIME_GAP,
            "busy": args.busy, "trace": [[round(t, 2), ns] for t, ns in trace], "spans": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
