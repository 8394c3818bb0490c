"""Scale benchmark: the PMD's own cost per frame as the MAC table and the port count grow.

Run from the repository root (also as `python -m tools.bench --macs ...` or `--ports ...`):

    python -m tools.scale --macs 2,1000,65536,1000000
    python -m tools.scale --ports 2,8,32,64
    python -m tools.scale --profile 64,512,1518    # cycles per stage, the copy included
    python -m tools.scale --pmds 1,2               # the MAC table's lock between two PMDs

Method
------
One PMD thread of the switch (vswitch/pmd/pmd.c, vs_pmd_run, the same code
vswitchd runs) forwards between null ports in generator mode
(vswitch/ports/null.h struct vs_null_gen): each receive burst is 32 frames
of 60 bytes built in place, so no generator thread, guest or ring pays for
them and the figure is the switch's own.  What the switch sends a null port
is counted and dropped, so transmit costs one call per port per burst and
no copy: these are the costs of learning, lookup and the port table, not
of moving bytes (tools/bench.py measures that).  The PMD thread is pinned to
--core; this process waits on the other.  The figure is the PMD's busy TSC
cycles per received frame over the window (pmd-stats' cycles/packet),
best and median of --reps windows; the ratios use the best.  Cycles the
thread spent preempted inside a pass still count as busy, so on a shared
host a window can only come out too high, never too low: the best window
is the closest to the switch's own cost.  Mpps is frames over wall time,
median, and suffers from any preemption.

* `--macs`: two null ports, each cycling half of the source MACs and
  sending to the first MAC of the other, so every frame learns (or
  refreshes) its source and looks up a learned destination.  fdb
  max_entries is twice the MAC count.  2 MACs is the baseline.
* `--ports`: N null ports polled by one PMD, each sending from its own MAC,
  `unicast` to the next port's MAC, `flood` to the broadcast address (each
  frame copied to the N-1 other ports: cycles per copy are reported too).
  And the port-table swap a hotplug makes: a new table published
  (vs_pmd_publish) and the wait until the PMD has moved on
  (vs_pmd_quiesce), timed from Python, with the PMD's longest gap between
  passes while swaps repeat.
* `--profile`: two null ports sending each other frames of each size,
  each in copy mode (vs_null_port_copy_tx: what it is sent is copied after a
  virtio-net header into the next of 256 buffers, by the routine that copies
  into a guest's buffers), the PMD with its stage timer on (struct
  vs_pmd_profile): cycles per frame of each stage and of the loop around
  them, and the same PMD's cycles per frame with the timer off.
  `--no-copy`: the null ports count and drop.
* `--pmds`: four null ports in two pairs over one MAC table; one PMD on
  --core polling all four, or two PMDs on cores 0 and 1 polling a pair each;
  the table's lock counters (acquisitions, contended ones, cycles waited)
  from start to stop, and each PMD's cycles per frame and share of its
  core (schedstat); and the same over only the 2 ms windows in which every
  PMD ran throughout (a preempted holder or waiter stalls the other PMD for
  a time slice: the host's doing, not the lock's).  `--pmd-sources N`: source MACs per port (1: a burst
  learns once; 4096: every frame is a learn, the longest hold).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from vswitch.fib import MacTable, capacity_for
from vswitch.native import ffi, lib

FRAME_LEN = 60
BROADCAST = 0xFFFFFFFFFFFF


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class NullPort:
    def __init__(self, port_no: int):
        self.np = ffi.new("struct vs_null_port *")
        if lib.vs_null_port_init(self.np, 1) != 0:
            raise OSError("cannot set up a null port")
        self.c = ffi.new("struct vs_port *")
        self.c.port_no = port_no
        self.c.ops = lib.vs_null_port_ops()
        self.c.priv = self.np
        self.c.link_up = 1

    def generate(self, dst: int, src_base: int, n_src: int) -> None:
        if lib.vs_null_port_generate(self.np, dst.to_bytes(6, "big"), src_base, n_src, FRAME_LEN) != 0:
            raise ValueError("bad generator settings")

    def close(self) -> None:
        lib.vs_null_port_fini(self.np)


def port_table(ports: list[NullPort], poll: list[NullPort] | None = None):
    """Every port live (a flood reaches them all); the PMD polls `poll` (default: all)."""
    table = ffi.new("struct vs_port_table *")
    for p in ports:
        table.ports[p.c.port_no] = p.c
        table.live[table.n_live] = p.c.port_no
        table.n_live += 1
    for p in ports if poll is None else poll:
        table.poll[table.n_poll].port = p.c
        table.poll[table.n_poll].queue = 0
        table.n_poll += 1
    return table


class PmdRun:
    """One PMD thread over the ports (polling `poll`, default all), pinned to core; stopped by close()."""

    def __init__(self, fib: MacTable, ports: list[NullPort], core: int, poll: list[NullPort] | None = None,
                 profiling: bool = False, clock_sec: int = 0):
        self.pmd = ffi.new("struct vs_pmd *")
        if lib.vs_pmd_init(self.pmd, fib.c) != 0:
            raise OSError("cannot set up the PMD")
        self.pmd.profiling = int(profiling)
        self.pmd.clock_sec = clock_sec     # 0: the real clock; else held there (tools/pmd_cost.py)
        self.table = port_table(ports, poll)
        lib.vs_pmd_publish(self.pmd, self.table)
        self.core = core
        self.tid = 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.started.wait(10)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            os.sched_setaffinity(0, {self.core})
        except OSError:
            pass
        self.started.set()
        lib.vs_pmd_run(self.pmd)

    def on_cpu_ns(self) -> int:
        """The time the PMD thread has run (/proc/self/task/TID/schedstat; the hypervisor's steal left out)."""
        with open(f"/proc/self/task/{self.tid}/schedstat") as f:
            return int(f.read().split()[0])

    def counters(self) -> tuple[int, int, float]:
        s = self.pmd.stats
        return s.busy_cycles, s.packets, time.perf_counter()

    def max_gap_us(self) -> float:
        return self.pmd.stats.max_gap_cycles * 1e6 / self.pmd.tsc_hz

    def stop(self) -> None:
        """Stops the thread after its current pass; the counters stay readable until close()."""
        if self.thread.is_alive():
            lib.vs_pmd_stop(self.pmd)
            self.thread.join(10)

    def close(self) -> None:
        self.stop()
        lib.vs_pmd_fini(self.pmd)


def window(run: PmdRun, warmup: float, seconds: float) -> dict:
    time.sleep(warmup)
    c0, p0, t0 = run.counters()
    time.sleep(seconds)
    c1, p1, t1 = run.counters()
    packets = p1 - p0
    return {"cycles_per_packet": (c1 - c0) / packets if packets else None,
            "mpps": packets / (t1 - t0) / 1e6}


def median_of(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def min_of(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return round(min(values), 1) if values else None


def macs_generating(n_macs: int) -> tuple[MacTable, NullPort, NullPort]:
    """A table for n_macs active sources and two null ports generating frames to each other,
    half of the sources on each."""
    half = max(1, n_macs // 2)
    fib = MacTable(max_entries=min(capacity_for(2 * n_macs), lib.VS_FIB_MAX_CAPACITY))
    a, b = NullPort(0), NullPort(1)
    base_a, base_b = 0x020000000000, 0x020100000000
    a.generate(dst=base_b, src_base=base_a, n_src=half)
    b.generate(dst=base_a, src_base=base_b, n_src=n_macs - half if n_macs > 1 else 1)
    return fib, a, b


def measure_macs(n_macs: int, args) -> dict:
    fib, a, b = macs_generating(n_macs)
    samples = []
    try:
        for _ in range(args.reps):
            run = PmdRun(fib, [a, b], args.core)
            try:
                samples.append(window(run, args.warmup, args.window))
            finally:
                run.close()
        entries = fib.c.n_entries
    finally:
        for p in (a, b):
            p.close()
        fib.close()
    return {"macs": n_macs, "fdb_entries": entries, "samples": samples,
            "cycles_per_packet": median_of(samples, "cycles_per_packet"),
            "cycles_per_packet_min": min_of(samples, "cycles_per_packet"), "mpps": median_of(samples, "mpps")}


def swap_times(run: PmdRun, ports: list[NullPort], swaps: int) -> dict:
    """Publishes a fresh table of the same ports `swaps` times; the publish-to-quiesced times."""
    times = []
    run.pmd.gap_reset = 1
    for _ in range(swaps):
        table = port_table(ports)
        t0 = time.perf_counter()
        lib.vs_pmd_publish(run.pmd, table)
        rc = lib.vs_pmd_quiesce(run.pmd, 1000)
        times.append((time.perf_counter() - t0) * 1e6)
        if rc != 0:
            raise RuntimeError("the PMD did not move on within a second")
        run.table = table   # the old one is unused now
        time.sleep(0.002)
    return {"swap_us_median": round(statistics.median(times), 1), "swap_us_max": round(max(times), 1),
            "swap_pmd_max_gap_us": round(run.max_gap_us(), 1)}


def ports_generating(n_ports: int, mode: str) -> list[NullPort]:
    """N null ports, each generating from its own MAC to the next port's (unicast) or to all (flood)."""
    ports = [NullPort(i) for i in range(n_ports)]
    mac = [0x020000000000 | (i + 1) for i in range(n_ports)]
    for i, p in enumerate(ports):
        p.generate(dst=BROADCAST if mode == "flood" else mac[(i + 1) % n_ports], src_base=mac[i], n_src=1)
    return ports


def measure_ports(n_ports: int, mode: str, args) -> dict:
    fib = MacTable(max_entries=8192)
    ports = ports_generating(n_ports, mode)
    samples, swaps = [], {}
    try:
        for rep in range(args.reps):
            run = PmdRun(fib, ports, args.core)
            try:
                samples.append(window(run, args.warmup, args.window))
                if rep == 0 and mode == "unicast":
                    swaps = swap_times(run, ports, args.swaps)
            finally:
                run.close()
    finally:
        for p in ports:
            p.close()
        fib.close()
    row = {"ports": n_ports, "mode": mode, "samples": samples,
           "cycles_per_packet": median_of(samples, "cycles_per_packet"),
           "cycles_per_packet_min": min_of(samples, "cycles_per_packet"), "mpps": median_of(samples, "mpps")}
    copies = n_ports - 1 if mode == "flood" else 1
    row["cycles_per_copy"] = round(row["cycles_per_packet_min"] / copies, 1) if row["cycles_per_packet_min"] else None
    row.update(swaps)
    return row


STAGES = [("rx", lib.VS_PMD_STAGE_RX), ("hooks", lib.VS_PMD_STAGE_HOOKS), ("learn_lookup", lib.VS_PMD_STAGE_LEARN),
          ("group", lib.VS_PMD_STAGE_GROUP), ("tx", lib.VS_PMD_STAGE_TX), ("rx_done", lib.VS_PMD_STAGE_RX_DONE),
          ("vlan", lib.VS_PMD_STAGE_VLAN)]
SINK_SLOTS = 256     # the copy's destination buffers per port, as many as a 256-entry guest ring holds


def profile_counters(run: PmdRun) -> dict:
    p = run.pmd.profile
    return {"busy": p.busy_cycles, "packets": p.packets, "bursts": p.bursts,
            **{name: p.cycles[i] for name, i in STAGES}}


def stage_breakdown(before: dict, after: dict) -> dict:
    """Cycles per frame of each stage over a window, and the loop: the rest of the busy passes."""
    d = {k: after[k] - before[k] for k in after}
    if not d["packets"]:
        return {}
    row = {name: round(d[name] / d["packets"], 1) for name, _ in STAGES}
    row["loop"] = round((d["busy"] - sum(d[name] for name, _ in STAGES)) / d["packets"], 1)
    row["profiled_busy"] = round(d["busy"] / d["packets"], 1)
    row["frames_per_burst"] = round(d["packets"] / d["bursts"], 1)
    return row


def measure_profile(size: int, args) -> dict:
    """Two null ports sending each other frames of `size` bytes, each copying what it is sent
    (null copy mode: the switch's one copy); the stages, and the same without the timer."""
    fib = MacTable(max_entries=1024)
    a, b = NullPort(0), NullPort(1)
    mac_a, mac_b = 0x020000000001, 0x020000000002
    for port, dst, src in ((a, mac_b, mac_a), (b, mac_a, mac_b)):
        if lib.vs_null_port_generate(port.np, dst.to_bytes(6, "big"), src, 1, size) != 0:
            raise ValueError(f"the null generator cannot make {size}-byte frames")
        if args.copy and lib.vs_null_port_copy_tx(port.np, SINK_SLOTS) != 0:
            raise OSError("cannot set up null copy mode")
    profiled, plain = [], []
    try:
        for _ in range(args.reps):
            run = PmdRun(fib, [a, b], args.core, profiling=True)
            try:
                time.sleep(args.warmup)
                before = profile_counters(run)
                time.sleep(args.window)
                # Read the end once the thread has stopped: mid-pass, a pass's stages are counted
                # before its busy cycles, and the loop's share would come out negative.
                run.stop()
                profiled.append(stage_breakdown(before, profile_counters(run)))
            finally:
                run.close()
            run = PmdRun(fib, [a, b], args.core)
            try:
                plain.append(window(run, args.warmup, args.window))
            finally:
                run.close()
    finally:
        for port in (a, b):
            port.close()
        fib.close()
    best = min((r for r in profiled if r), key=lambda r: r["profiled_busy"])
    row = {"frame": size, "copy": bool(args.copy), "cycles_per_packet_min": min_of(plain, "cycles_per_packet"),
           "cycles_per_packet": median_of(plain, "cycles_per_packet"), **best, "profiled_samples": profiled,
           "samples": plain}
    return row


CLEAN_WINDOW_S = 0.001   # --pmds samples in windows this long
LOST_NS = 100_000        # a window is clean if every PMD ran for all of it but this much


def lock_sample(fib: MacTable, runs: list[PmdRun]) -> dict:
    st = fib.c.stats
    return {"acquired": st.lock_acquired, "contended": st.lock_contended, "wait": st.lock_wait_cycles,
            "packets": [r.pmd.stats.packets for r in runs], "busy": [r.pmd.stats.busy_cycles for r in runs],
            "ran": [r.on_cpu_ns() for r in runs], "t": time.perf_counter_ns()}


def lock_figures(acquired: int, contended: int, wait: int, packets: int, busy: int) -> dict:
    return {"lock_acquired": acquired, "lock_contended": contended, "lock_wait_cycles": wait,
            "packets": packets, "busy_cycles": busy,
            "cycles_per_packet": round(busy / packets, 1) if packets else None,
            "contended_share": round(contended / acquired, 4) if acquired else None,
            "wait_per_contended": round(wait / contended, 1) if contended else 0.0,
            "wait_per_acquisition": round(wait / acquired, 2) if acquired else None,
            "wait_per_packet": round(wait / packets, 2) if packets else None,
            "wait_share_of_busy": round(wait / busy, 4) if busy else None}


def wait_histogram(fib: MacTable) -> list[int]:
    return [fib.c.stats.lock_wait_log2[i] for i in range(lib.VS_FIB_WAIT_BUCKETS)]


def wait_quantiles(hist: list[int], tsc_hz: int) -> dict:
    """From the contended waits' log2 histogram: the bucket holding the median and the 99th
    percentile (their upper bounds, so never below the truth), the share under 1 us, and the
    waits over 100 us (a holder or a waiter preempted: a time slice, not a burst)."""
    total = sum(hist)
    if not total:
        return {"wait_median_us_max": 0.0, "wait_p99_us_max": 0.0, "waits_under_1us": None, "waits_over_100us": 0,
                "short_wait_cycles": [0, 0]}

    def upper_us(q: float) -> float:
        seen = 0
        for i, n in enumerate(hist):
            seen += n
            if seen >= q * total:
                return round((1 << (i + 1)) * 1e6 / tsc_hz, 2)
        return float("inf")

    us = [(1 << (i + 1)) * 1e6 / tsc_hz for i in range(len(hist))]   # each bucket's upper bound
    under_1 = sum(n for n, u in zip(hist, us) if u <= 1.0)
    long_ = [(1 << i) * 1e6 / tsc_hz >= 100 for i in range(len(hist))]
    over_100 = sum(n for n, is_long in zip(hist, long_) if is_long)
    # The cycles waited in the short waits alone (each bucket's count times its bounds):
    # the lock's own cost, with the time slices of preempted threads left out.
    short_low = sum(n << i for i, (n, is_long) in enumerate(zip(hist, long_)) if not is_long)
    return {"wait_median_us_max": upper_us(0.5), "wait_p99_us_max": upper_us(0.99),
            "waits_under_1us": round(under_1 / total, 4), "waits_over_100us": over_100,
            "short_wait_cycles": [short_low, 2 * short_low]}


def measure_pmds(n_pmds: int, args) -> dict:
    """Four null ports in two pairs, each pair sending to each other over one shared MAC table:
    one PMD on --core polls all four, or two PMDs (cores 0 and 1) poll a pair each.

    Two sets of figures.  `all`: the table's lock counters and every PMD's busy cycles and
    bursts from start to stop.  `clean`: the same summed over windows of CLEAN_WINDOW_S in
    which every PMD thread ran all the time (its schedstat run time): on a shared host a
    thread preempted while it holds or waits for the lock makes the other wait a time slice,
    which is the host's doing, not the lock's (README "Multi-core plan")."""
    fib = MacTable(max_entries=max(1024, 8 * args.pmd_sources))
    ports = [NullPort(i) for i in range(4)]
    macs = [0x020000000000 | (i << 24) for i in range(4)]
    for i, p in enumerate(ports):
        p.generate(dst=macs[i ^ 1], src_base=macs[i], n_src=args.pmd_sources)
    cores = [args.core] if n_pmds == 1 else [0, 1]
    polls = [ports] if n_pmds == 1 else [ports[:2], ports[2:]]
    s0 = fib.c.stats
    lock0 = (s0.lock_acquired, s0.lock_contended, s0.lock_wait_cycles)
    hist0 = wait_histogram(fib)
    load = os.getloadavg()
    runs = []
    clean = {"acquired": 0, "contended": 0, "wait": 0, "packets": 0, "busy": 0, "windows": 0, "seen": 0}
    try:
        runs = [PmdRun(fib, ports, core, poll) for core, poll in zip(cores, polls)]
        time.sleep(args.warmup)
        first = lock_sample(fib, runs)
        end = time.perf_counter() + args.window
        a = first
        while time.perf_counter() < end:
            time.sleep(CLEAN_WINDOW_S)
            b = lock_sample(fib, runs)
            clean["seen"] += 1
            wall = b["t"] - a["t"]
            if all(wall - (r1 - r0) < LOST_NS for r0, r1 in zip(a["ran"], b["ran"])):
                clean["windows"] += 1
                for k in ("acquired", "contended", "wait"):
                    clean[k] += b[k] - a[k]
                clean["packets"] += sum(b["packets"]) - sum(a["packets"])
                clean["busy"] += sum(b["busy"]) - sum(a["busy"])
            a = b
        last = a
    finally:
        for r in runs:
            r.close()
    st = fib.c.stats
    totals = lock_figures(st.lock_acquired - lock0[0], st.lock_contended - lock0[1], st.lock_wait_cycles - lock0[2],
                          sum(r.pmd.stats.packets for r in runs), sum(r.pmd.stats.busy_cycles for r in runs))
    wall_s = (last["t"] - first["t"]) / 1e9
    pmds = [{"core": r.core, "packets": r.pmd.stats.packets, "bursts": r.pmd.stats.bursts,
             "busy_cycles": r.pmd.stats.busy_cycles,
             "cycles_per_packet": round(r.pmd.stats.busy_cycles / r.pmd.stats.packets, 1)
             if r.pmd.stats.packets else None,
             "on_cpu": round((last["ran"][i] - first["ran"][i]) / (last["t"] - first["t"]), 3)}
            for i, r in enumerate(runs)]
    tsc_hz = runs[0].pmd.tsc_hz
    wait_max_us = round(st.lock_wait_max * 1e6 / tsc_hz, 1)
    hist = [b - a for a, b in zip(hist0, wait_histogram(fib))]
    quantiles = wait_quantiles(hist, tsc_hz)
    packets = totals["packets"]
    quantiles["short_wait_per_packet"] = [round(c / packets, 2) for c in quantiles["short_wait_cycles"]] \
        if packets else None
    for p in ports:
        p.close()
    fib.close()
    return {"pmds": n_pmds, "sources_per_port": args.pmd_sources, "load_average": [round(x, 2) for x in load],
            "per_pmd": pmds, "bursts": sum(p["bursts"] for p in pmds),
            "mpps": round((sum(last["packets"]) - sum(first["packets"])) / wall_s / 1e6, 2), **totals,
            "lock_wait_max_us": wait_max_us, "tsc_hz": tsc_hz, "wait_log2_cycles": hist,
            **quantiles,
            "clean_windows": clean["windows"], "windows": clean["seen"],
            "clean": lock_figures(clean["acquired"], clean["contended"], clean["wait"], clean["packets"],
                                  clean["busy"])}


def plot(rows: list[dict], x: str, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed, so no plot was drawn")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in sorted({r.get("mode", "unicast") for r in rows}):
        sel = [r for r in rows if r.get("mode", "unicast") == mode]
        ax.plot([r[x] for r in sel], [r["cycles_per_packet_min"] for r in sel], marker="o", label=mode)
        for r in sel:
            ax.annotate(f"{r['cycles_per_packet_min']:.0f}", (r[x], r["cycles_per_packet_min"]), fontsize=7,
                        xytext=(0, 4), textcoords="offset points", ha="center")
    ax.set_xscale("log")
    xs = sorted({r[x] for r in rows})
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel("PMD busy cycles per received frame (best window)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("n/a" if r.get(c) is None else str(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def series(name: str, values: str, unit: str, measure, args, meta: dict, out: Path, columns: list[str]) -> list[dict]:
    """Runs measure(value, args) for each of the comma-separated `values`, writes OUT/NAME.json
    and prints the rows' table of `columns`; returns the rows."""
    rows = []
    for value in (int(x) for x in values.split(",")):
        log(f"{name} {value}{unit} ...")
        rows.append(measure(value, args))
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(table(rows, columns))
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.scale", description=__doc__.split("\n")[0])
    p.add_argument("--macs", help="comma-separated active source MAC counts, e.g. 2,1000,65536,1000000")
    p.add_argument("--ports", help="comma-separated port counts, e.g. 2,8,32,64")
    p.add_argument("--modes", default="unicast,flood", help="for --ports: unicast, flood (default both)")
    p.add_argument("--profile", help="comma-separated frame sizes (60..2048): the PMD's cycles per stage")
    p.add_argument("--no-copy", dest="copy", action="store_false",
                   help="for --profile: the null ports do not copy what they are sent")
    p.add_argument("--pmds", help="comma-separated PMD counts (1, 2): the MAC table's lock between PMDs")
    p.add_argument("--pmd-sources", type=int, default=1, help="for --pmds: source MACs per port (default 1)")
    p.add_argument("--reps", type=int, default=5, help="windows per point; best and median reported (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window (default 1)")
    p.add_argument("--window", type=float, default=2.0, help="seconds per window (default 2)")
    p.add_argument("--swaps", type=int, default=50, help="port-table swaps timed per port count (default 50)")
    p.add_argument("--core", type=int, default=1, help="the PMD thread's core (default 1)")
    p.add_argument("--out-dir", default="results/scale", help="JSON and plots go here (default results/scale)")
    p.add_argument("--smoke", action="store_true", help="one short run per point, for the test suite")
    args = p.parse_args(argv)
    if not (args.macs or args.ports or args.profile or args.pmds):
        p.error("give --macs, --ports, --profile and/or --pmds")
    if args.smoke:
        args.reps, args.warmup, args.window, args.swaps = 1, 0.2, 0.3, 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"host_cpus": os.cpu_count(), "load_average": os.getloadavg(), "frame_len": FRAME_LEN,
            "reps": args.reps, "window_s": args.window, "core": args.core,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.macs:
        rows = []
        for n in (int(x) for x in args.macs.split(",")):
            log(f"macs {n} ...")
            rows.append(measure_macs(n, args))
        base = rows[0]["cycles_per_packet_min"]
        for r in rows:
            r["vs_first"] = round(r["cycles_per_packet_min"] / base, 2) if base and r["cycles_per_packet_min"] else None
        (out / "macs.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        plot(rows, "macs", out / "macs.png", "PMD cycles per frame vs active source MACs (null-port generator)")
        print(table(rows, ["macs", "fdb_entries", "cycles_per_packet_min", "cycles_per_packet", "vs_first", "mpps"]))
    if args.ports:
        rows = []
        for mode in args.modes.split(","):
            for n in (int(x) for x in args.ports.split(",")):
                log(f"ports {n} {mode} ...")
                rows.append(measure_ports(n, mode, args))
        for mode in args.modes.split(","):
            sel = [r for r in rows if r["mode"] == mode]
            base = sel[0]["cycles_per_packet_min"]
            for r in sel:
                r["vs_first"] = round(r["cycles_per_packet_min"] / base, 2) if base and r["cycles_per_packet_min"] else None
        (out / "ports.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        plot(rows, "ports", out / "ports.png", "PMD cycles per received frame vs ports (null-port generator)")
        print(table(rows, ["ports", "mode", "cycles_per_packet_min", "cycles_per_packet", "vs_first", "cycles_per_copy",
                           "mpps",
                           "swap_us_median", "swap_us_max", "swap_pmd_max_gap_us"]))
    if args.profile:
        series("profile", args.profile, " B", measure_profile, args, meta, out,
               ["frame", "copy", "cycles_per_packet_min", "profiled_busy", "rx", "hooks", "learn_lookup",
                "group", "tx", "rx_done", "loop", "frames_per_burst"])
    if args.pmds:
        rows = series("pmds", args.pmds, "", measure_pmds, args, meta, out,
                      ["pmds", "load_average", "mpps", "cycles_per_packet", "lock_acquired", "bursts",
                       "contended_share", "wait_per_contended", "wait_per_packet", "wait_share_of_busy",
                       "wait_median_us_max", "wait_p99_us_max", "waits_under_1us", "waits_over_100us",
                       "short_wait_per_packet",
                       "lock_wait_max_us", "clean_windows", "windows"])
        print("in the clean windows (every PMD ran throughout):")
        print(table([{"pmds": r["pmds"], **r["clean"]} for r in rows],
                    ["pmds", "cycles_per_packet", "lock_acquired", "contended_share", "wait_per_contended",
                     "wait_per_acquisition", "wait_per_packet", "wait_share_of_busy"]))
        for r in rows:
            print(f"pmds {r['pmds']}: " + "; ".join(
                f"core {p['core']} {p['cycles_per_packet']} cycles/frame, on CPU {p['on_cpu']:.0%}" for p in r["per_pmd"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
