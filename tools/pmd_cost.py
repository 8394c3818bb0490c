"""Instructions the PMD loop spends per frame, counted by valgrind (deterministic, unlike cycles).

Two null ports; each pass injects a burst of 32 frames into the first (from
Python, not counted) and runs one vs_pmd_poll_once, which forwards them to
the second.  Run under callgrind, collecting only inside vs_pmd_poll_once:

    valgrind --tool=callgrind '--toggle-collect=_cffi_f_vs_pmd_poll_once*' \\
        --callgrind-out-file=/tmp/cg.out "$(python3 -c 'import sys; print(sys.executable)')" \\
        -m tools.pmd_cost [--monitor none|capture|mirror]
    grep ^totals /tmp/cg.out                   # instructions (Ir)

The pattern names cffi's wrapper (_cffi_f_vs_pmd_poll_once, with or without
an .lto_priv suffix), into which -flto inlines the loop, and only it (a
pattern matching the wrapper and the function inside would toggle twice); valgrind must start the real interpreter, not
a shell shim.  Divide by the calls (passes + 1: a first pass learns the
destination) or the frames (32 per pass, + 1).  `--monitor none` is the
switch as it runs without captures or mirrors; `capture` adds an rx capture
on the first port (drained every pass), `mirror` mirrors its received
frames to a third null port.  `--profile` runs the loop with the stage
timer (tests/unit/test_pmd_profile.py: without it, none of that code runs).  README "Capture and mirroring" has the figures.

`--macs N` is the MAC table's cost instead (README "Latency and scale"):
two null ports in generator mode as `tools.scale --macs` runs them, each
cycling half of N source MACs to the first MAC of the other, every pass
polling both (64 frames).  A PMD thread (vs_pmd_run, not counted) first
learns all N; then --passes passes are counted, every frame a known source.
The PMD's clock is held (struct vs_pmd clock_sec) in the second the sources
were learned in, or with `--refresh` in the next one, so that every frame's
source is refreshed once (counted passes at most one cycle of the sources).
Frames counted: printed; divide the total by them.  `--siphash`: the
table hashes with SipHash-1-3, as on a CPU without AES-NI.

`--ports N [--mode unicast|flood]` is the port count's cost instead
(README "Latency and scale"): N null ports in generator mode as
`tools.scale --ports` runs them (its measure_ports), each sending 32 frames
a burst from its own MAC to the next port's MAC (unicast) or to the
broadcast address (flood: each frame sent to the N-1 other ports), every
pass polling all N (32 N frames).  A PMD thread (not counted) first learns
every port's MAC, with the clock held as for --macs; then --passes passes
are counted.  Frames received and copies delivered (what the null ports
were sent) are printed: divide the total by them.
"""

from __future__ import annotations

import argparse

from vswitch.fib import MacTable
from vswitch.native import ffi, lib

BURST = 32


def null_port(port_no: int):
    np = ffi.new("struct vs_null_port *")
    assert lib.vs_null_port_init(np, 1) == 0
    port = ffi.new("struct vs_port *")
    port.port_no, port.ops, port.priv, port.link_up = port_no, lib.vs_null_port_ops(), np, 1
    return np, port


def mac_cost(n_macs: int, passes: int, refresh: bool, siphash: bool) -> None:
    """--macs: learn n_macs sources with a PMD thread, then count passes of vs_pmd_poll_once."""
    import time

    from tools.scale import PmdRun, macs_generating

    fib, a, b = macs_generating(n_macs)
    if siphash:
        fib.c.hash_aes = 0     # while empty
    start = 1_000_000
    run = PmdRun(fib, [a, b], core=0, clock_sec=start)
    while fib.c.n_entries < n_macs:
        time.sleep(0.05)
    run.close()
    pmd = ffi.new("struct vs_pmd *")
    assert lib.vs_pmd_init(pmd, fib.c) == 0
    pmd.clock_sec = start + 1 if refresh else start
    lib.vs_pmd_publish(pmd, run.table)
    frames = 0
    for _ in range(passes):
        frames += lib.vs_pmd_poll_once(pmd)
    print(f"macs {n_macs}: {fib.c.n_entries} entries, {frames} frames counted in {passes} passes, "
          f"refresh {refresh}, learned {fib.c.stats.learned}")
    lib.vs_pmd_fini(pmd)
    for port in (a, b):
        port.close()
    fib.close()


def ports_cost(n_ports: int, mode: str, passes: int) -> None:
    """--ports: learn every port's MAC with a PMD thread, then count passes of vs_pmd_poll_once."""
    import time

    from tools.scale import PmdRun, ports_generating

    fib = MacTable(max_entries=8192)
    ports = ports_generating(n_ports, mode)
    start = 1_000_000
    run = PmdRun(fib, ports, core=0, clock_sec=start)
    while fib.c.n_entries < n_ports:
        time.sleep(0.05)
    run.close()
    learned = fib.c.stats.learned
    pmd = ffi.new("struct vs_pmd *")
    assert lib.vs_pmd_init(pmd, fib.c) == 0
    pmd.clock_sec = start
    lib.vs_pmd_publish(pmd, run.table)
    sent0 = sum(p.np.queues[0].stats.tx_packets for p in ports)
    frames = 0
    for _ in range(passes):
        frames += lib.vs_pmd_poll_once(pmd)
    copies = sum(p.np.queues[0].stats.tx_packets for p in ports) - sent0
    assert frames == passes * n_ports * BURST, (frames, passes, n_ports)
    assert copies == frames * (n_ports - 1 if mode == "flood" else 1), (copies, frames)
    assert fib.c.stats.learned == learned, "a counted pass learned: a destination was unknown"
    print(f"ports {n_ports} {mode}: {frames} frames received, {copies} copies delivered in {passes} passes, "
          f"{fib.c.n_entries} entries, learned {fib.c.stats.learned}, flooded {pmd.stats.flooded}, "
          f"unicast {pmd.stats.unicast}")
    lib.vs_pmd_fini(pmd)
    for port in ports:
        port.close()
    fib.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=2000)
    p.add_argument("--macs", type=int, help="the MAC table's cost with this many active sources")
    p.add_argument("--ports", type=int, help="the cost with this many null ports, all polled")
    p.add_argument("--mode", choices=["unicast", "flood"], default="unicast",
                   help="--ports: to the next port's MAC, or to the broadcast address")
    p.add_argument("--refresh", action="store_true", help="--macs: count passes in the second after the learning")
    p.add_argument("--siphash", action="store_true", help="--macs: hash with SipHash-1-3, as without AES-NI")
    p.add_argument("--monitor", choices=["none", "capture", "mirror"], default="none")
    p.add_argument("--profile", action="store_true", help="time each stage (struct vs_pmd_profile)")
    args = p.parse_args()
    if args.macs:
        mac_cost(args.macs, args.passes, args.refresh, args.siphash)
        return
    if args.ports:
        ports_cost(args.ports, args.mode, args.passes)
        return
    fib = MacTable(max_entries=1024)
    pmd = ffi.new("struct vs_pmd *")
    assert lib.vs_pmd_init(pmd, fib.c) == 0
    ports = [null_port(i) for i in range(3)]
    table = ffi.new("struct vs_port_table *")
    for i, (_, port) in enumerate(ports):
        table.ports[i] = port
    table.live[0], table.live[1], table.n_live = 0, 1, 2     # port 2 is only ever a mirror output
    table.poll[0].port, table.poll[0].queue, table.n_poll = ports[0][1], 0, 1
    keep = []
    cap = None
    if args.monitor != "none":
        monitor = ffi.new("struct vs_monitor *")
        if args.monitor == "capture":
            from vswitch.capture import Capture
            cap = Capture("p0", "rx", snaplen=128)
            monitor.rx_captures[0], monitor.n_rx_captures = cap.c, 1
        else:
            monitor.rx_mirrors[0], monitor.n_rx_mirrors = ports[2][1], 1
        ports[0][1].monitor = monitor
        keep.append(monitor)
    pmd.profiling = int(args.profile)
    lib.vs_pmd_publish(pmd, table)
    # Unicast after the first pass: the destination is learned from a reply.
    frames = [bytes.fromhex("020000000002" "020000000001" "0800") + bytes(50) for _ in range(BURST)]
    reply = ffi.from_buffer("uint8_t[]", bytes.fromhex("020000000001" "020000000002" "0800") + bytes(50))
    lib.vs_null_port_inject(ports[1][0], 0, reply, len(reply))
    table.poll[1].port, table.poll[1].queue, table.n_poll = ports[1][1], 0, 2
    lib.vs_pmd_poll_once(pmd)
    table.n_poll = 1
    bufs = [ffi.from_buffer("uint8_t[]", f) for f in frames]
    forwarded = 0
    for _ in range(args.passes):
        for b in bufs:
            lib.vs_null_port_inject(ports[0][0], 0, b, len(b))
        forwarded += lib.vs_pmd_poll_once(pmd)
        if cap is not None:
            cap.read()
    sent = ports[1][0].queues[0].stats.tx_packets
    print(f"monitor {args.monitor}: {forwarded} frames forwarded in {args.passes} passes, {sent} sent to port 1, "
          f"{ports[2][0].queues[0].stats.tx_packets} mirrored")
    lib.vs_pmd_fini(pmd)


if __name__ == "__main__":
    main()
