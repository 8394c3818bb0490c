"""vswitchctl: a thin client of the control socket.

Human-readable tables by default, `--json` for scripts.  Every failure is
one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from vswitch.config import DEFAULT_CONTROL_SOCKET, parse_size
from vswitch.ports import PORT_TYPES


class ControlError(Exception):
    pass


def call(path: str, command: str, args: dict | None = None, timeout: float = 30.0):
    """Sends one request and returns its result, or raises ControlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
            reply = _read_line(s)
    except FileNotFoundError:
        raise ControlError(f"cannot connect to {path}: no such socket (is vswitchd running?)") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to {path}: {exc.strerror or exc}") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")


def _read_line(s: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise ControlError("vswitchd closed the connection without a reply")
        buf += chunk
    return json.loads(buf)


def stream_events(path: str):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    s.sendall(b'{"command": "events/subscribe"}\n')
    f = s.makefile("rb")
    first = json.loads(f.readline() or b"{}")
    if not first.get("ok"):
        raise ControlError(first.get("error", "cannot subscribe"))
    for line in f:
        yield json.loads(line)


def _size(text: str) -> int:
    size = parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or a number with K, M, G or T, e.g. 64G)")
    return size


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_ports(result: dict) -> None:
    rows = []
    for p in result["ports"]:
        s = p["stats"]
        rows.append([p["name"], p["type"], p.get("mode", "-"), p["link"], p.get("queues", "-"),
                     s["rx_packets"], s["rx_bytes"], s["tx_packets"], s["tx_bytes"],
                     s["rx_dropped"] + s["tx_dropped"], s["rx_errors"] + s["tx_errors"]])
    print(table(rows, ["PORT", "TYPE", "MODE", "LINK", "QUEUES", "RX-PKTS", "RX-BYTES",
                       "TX-PKTS", "TX-BYTES", "DROPS", "ERRORS"]))
    for p in result["ports"]:
        if p["stats"].get("mem_faults"):
            print(f"port {p['name']}: mem_faults {p['stats']['mem_faults']} "
                  "(front-end disconnected: its guest memory faulted)")


def print_fdb(result: dict) -> None:
    rows = [[e["port"], e["vlan"], e["mac"], "static" if e["static"] else e["age"]] for e in result["entries"]]
    print(table(rows, ["PORT", "VLAN", "MAC", "AGE"]))


def print_pmd_stats(result: dict) -> None:
    """Like OVS's dpif-netdev/pmd-perf-show: one block per PMD thread."""
    for p in result["pmds"]:
        queues = ", ".join(f"{q['port']}/{q['queue']}" for q in p["rx_queues"]) or "none"
        cpu = "any" if p["cpu"] is None else p["cpu"]
        print(f"pmd thread {p['pmd']} (cpu {cpu}), polling: {queues}")
        print(f"  packets: {p['packets']}  bursts: {p['bursts']}  packets/burst: {p['packets_per_burst']}")
        print(f"  busy cycles: {p['busy_cycles']} ({p['busy_percent']}%)  idle cycles: {p['idle_cycles']}")
        print(f"  cycles/packet (busy): {p['cycles_per_packet']}")
        print(f"  sleeps: {p['sleeps']} (woken by a guest: {p['kick_wakeups']})")
        print(f"  unicast: {p['unicast']}  flooded: {p['flooded']}  dropped (same port): {p['dropped_same_port']}")


def print_kv(result: dict) -> None:
    for k, v in result.items():
        print(f"{k}: {v}")


STATS_COLUMNS = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped",
                 "rx_errors", "tx_errors"]


def watch_stats(sock: str, args) -> None:
    """Prints counters once, or every --watch seconds with per-second rates."""
    if args.watch is not None and args.watch <= 0:
        raise ControlError("--watch takes a positive number of seconds")
    previous, before = None, 0.0
    while True:
        result = call(sock, "stats/show", {"name": args.name})
        now = time.monotonic()
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            rows = []
            for p in result["ports"]:
                row = [p["name"]] + [p[c] for c in STATS_COLUMNS]
                if previous is not None and p["name"] in previous:
                    dt = now - before
                    row += [f"{(p['rx_packets'] - previous[p['name']]['rx_packets']) / dt:.0f}",
                            f"{(p['tx_packets'] - previous[p['name']]['tx_packets']) / dt:.0f}"]
                rows.append(row)
            headers = ["PORT"] + [c.upper().replace("_", "-") for c in STATS_COLUMNS]
            if previous is not None:
                headers += ["RX-PPS", "TX-PPS"]
            print(table(rows, headers[:max(len(r) for r in rows)] if rows else headers), flush=True)
        if args.watch is None:
            return
        previous, before = {p["name"]: p for p in result["ports"]}, now
        time.sleep(args.watch)
        if not args.json:
            print()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vswitchctl", description="control a running vswitchd")
    p.add_argument("--socket", default=os.environ.get("VSWITCH_SOCKET", DEFAULT_CONTROL_SOCKET),
                   help="control socket (default $VSWITCH_SOCKET or %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw JSON result")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="ports with mode, link, queues and counters")
    show.add_argument("name", nargs="?")
    sub.add_parser("list-ports", help="port names, types and link states")
    add = sub.add_parser("add-port", help="add a port to the running switch")
    add.add_argument("name")
    add.add_argument("--type", required=True, choices=PORT_TYPES)
    add.add_argument("--path", help="vhost-user socket path")
    add.add_argument("--ifname", help="tap: interface to create (default the port name); "
                                      "af-packet: interface to attach to")
    add.add_argument("--netns", help="tap, af-packet: network namespace of the interface (ip netns)")
    add.add_argument("--mode", choices=["server", "client"], help="vhost-user mode (default server)")
    add.add_argument("--queues", type=int, help="queue pairs (default 1)")
    add.add_argument("--max-memory", type=_size, metavar="SIZE",
                     help="vhost-user: most guest memory the port maps, e.g. 64G (default 1T)")
    delete = sub.add_parser("del-port", help="remove a port")
    delete.add_argument("name")
    stats = sub.add_parser("stats", help="port counters")
    stats.add_argument("name", nargs="?")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS, with rates")
    setp = sub.add_parser("set", help="change a setting")
    set_sub = setp.add_subparsers(dest="set_cmd", required=True, metavar="setting")
    aging = set_sub.add_parser("fdb-aging", help="MAC entry idle lifetime")
    aging.add_argument("seconds", type=int)
    fdb_max = set_sub.add_parser("fdb-max", help="MAC table size limit")
    fdb_max.add_argument("entries", type=int)
    config = sub.add_parser("config", help="the running configuration")
    config_sub = config.add_subparsers(dest="config_cmd", required=True, metavar="config-command")
    config_sub.add_parser("dump", help="print it as YAML")
    fdb = sub.add_parser("fdb", help="the MAC table")
    fdb_sub = fdb.add_subparsers(dest="fdb_cmd", required=True, metavar="fdb-command")
    fdb_show = fdb_sub.add_parser("show", help="list the entries")
    fdb_show.add_argument("--port")
    fdb_flush = fdb_sub.add_parser("flush", help="remove learned entries")
    fdb_flush.add_argument("--port")
    fdb_sub.add_parser("stats", help="learned, moved, aged, evicted")
    fdb_add = fdb_sub.add_parser("add", help="add a static entry")
    fdb_add.add_argument("mac")
    fdb_add.add_argument("port")
    fdb_del = fdb_sub.add_parser("del", help="remove an entry")
    fdb_del.add_argument("mac")
    sub.add_parser("pmd-stats", help="per PMD thread counters")
    sub.add_parser("control-stats", help="control socket counters: connections, refused clients, changes")
    sub.add_parser("events", help="stream port, link and queue events")
    sub.add_parser("list-commands", help="every control command with its usage")
    sub.add_parser("version", help="the daemon's version")
    return p


def run(args) -> None:
    def emit(result, human):
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            human(result)

    sock = args.socket
    if args.cmd == "show":
        emit(call(sock, "port/show", {"name": args.name}), print_ports)
    elif args.cmd == "list-ports":
        emit(call(sock, "port/list"),
             lambda r: print(table([[p["name"], p["type"], p["link"]] for p in r["ports"]], ["PORT", "TYPE", "LINK"])))
    elif args.cmd == "add-port":
        spec = {"name": args.name, "type": args.type, "path": args.path, "mode": args.mode, "queues": args.queues,
                "ifname": args.ifname, "netns": args.netns, "max_memory": args.max_memory}
        emit(call(sock, "port/add", {k: v for k, v in spec.items() if v is not None}),
             lambda r: print(f"added port {r['name']} ({r['type']})"))
    elif args.cmd == "del-port":
        emit(call(sock, "port/del", {"name": args.name}), lambda r: print(f"removed port {r['removed']}"))
    elif args.cmd == "stats":
        watch_stats(sock, args)
    elif args.cmd == "set":
        if args.set_cmd == "fdb-aging":
            emit(call(sock, "fdb/set-aging", {"seconds": args.seconds}), print_kv)
        else:
            emit(call(sock, "fdb/set-max", {"entries": args.entries}), print_kv)
    elif args.cmd == "config":
        emit(call(sock, "config/dump"), lambda r: print(r["yaml"], end=""))
    elif args.cmd == "fdb":
        if args.fdb_cmd == "show":
            emit(call(sock, "fdb/show", {"port": args.port}), print_fdb)
        elif args.fdb_cmd == "flush":
            emit(call(sock, "fdb/flush", {"port": args.port}), lambda r: print(f"flushed {r['flushed']} entries"))
        elif args.fdb_cmd == "add":
            emit(call(sock, "fdb/add", {"mac": args.mac, "port": args.port}),
                 lambda r: print(f"added static entry {r['mac']} -> {r['port']}"))
        elif args.fdb_cmd == "del":
            emit(call(sock, "fdb/del", {"mac": args.mac}), lambda r: print(f"removed {r['removed']}"))
        else:
            emit(call(sock, "fdb/stats"), print_kv)
    elif args.cmd == "pmd-stats":
        emit(call(sock, "pmd/stats"), print_pmd_stats)
    elif args.cmd == "control-stats":
        emit(call(sock, "control/stats"), print_kv)
    elif args.cmd == "events":
        for event in stream_events(sock):
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "event", "port"))
                print(f"{event['time']:.3f} {event['event']} {event.get('port', '')} {rest}".rstrip(), flush=True)
    elif args.cmd == "list-commands":
        emit(call(sock, "list-commands"),
             lambda r: print(table([[c["usage"], c["help"]] for c in r["commands"]], ["COMMAND", "DESCRIPTION"])))
    elif args.cmd == "version":
        emit(call(sock, "version"), lambda r: print(r["version"]))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ControlError as exc:
        print(f"vswitchctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
