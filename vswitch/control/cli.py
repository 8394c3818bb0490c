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

from vswitch.config import DEFAULT_CONTROL_SOCKET


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


def print_fdb(result: dict) -> None:
    rows = [[e["port"], e["vlan"], e["mac"], "static" if e["static"] else e["age"]] for e in result["entries"]]
    print(table(rows, ["PORT", "VLAN", "MAC", "AGE"]))


def print_kv(result: dict) -> None:
    for k, v in result.items():
        print(f"{k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vswitchctl", description="control a running vswitchd")
    p.add_argument("--socket", default=os.environ.get("VSWITCH_SOCKET", DEFAULT_CONTROL_SOCKET),
                   help="control socket (default $VSWITCH_SOCKET or %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw JSON result")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="ports with mode, link, queues and counters")
    show.add_argument("name", nargs="?")
    sub.add_parser("list-ports", help="port names, types and link states")
    fdb = sub.add_parser("fdb", help="the MAC table")
    fdb_sub = fdb.add_subparsers(dest="fdb_cmd", required=True, metavar="fdb-command")
    fdb_show = fdb_sub.add_parser("show", help="list the entries")
    fdb_show.add_argument("--port")
    fdb_flush = fdb_sub.add_parser("flush", help="remove learned entries")
    fdb_flush.add_argument("--port")
    fdb_sub.add_parser("stats", help="learned, moved, aged, evicted")
    sub.add_parser("pmd-stats", help="per PMD thread counters")
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
    elif args.cmd == "fdb":
        if args.fdb_cmd == "show":
            emit(call(sock, "fdb/show", {"port": args.port}), print_fdb)
        elif args.fdb_cmd == "flush":
            emit(call(sock, "fdb/flush", {"port": args.port}), lambda r: print(f"flushed {r['flushed']} entries"))
        else:
            emit(call(sock, "fdb/stats"), print_kv)
    elif args.cmd == "pmd-stats":
        emit(call(sock, "pmd/stats"), lambda r: [print_kv(p) or print() for p in r["pmds"]])
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
