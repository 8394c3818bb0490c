"""vswitchctl: a thin client of the control socket.

Human-readable tables by default, `--json` for scripts.  Every failure is
one line on stderr and a non-zero exit status.  Any control command can be
called as `vswitchctl call COMMAND key=value ...` (or `vswitchctl COMMAND
key=value ...`); the subcommands are shorthands for the common ones.
`add-port`'s flags are generated from the port type registry.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import sys
import time

from vswitch.config import DEFAULT_CONTROL_SOCKET
from vswitch.ports import registry as port_registry
from vswitch.ports import policing as policing_settings
from vswitch.ports import vlan as vlan_settings


class ControlError(Exception):
    pass


def _connect(path: str, timeout: float | None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        s.close()
        raise ControlError(f"cannot connect to {path}: no such socket (is vswitchd running?)") from None
    except OSError as exc:
        s.close()
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return s


def _request(command: str, args: dict | None) -> bytes:
    return json.dumps({"command": command, "args": args or {}}).encode() + b"\n"


def call(path: str, command: str, args: dict | None = None, timeout: float = 30.0):
    """Sends one request and returns its result, or raises ControlError."""
    try:
        with _connect(path, timeout) as s:
            s.sendall(_request(command, args))
            reply = _read_line(s)
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


def call_streaming(path: str, command: str, args: dict | None = None, timeout: float = 30.0):
    """Sends one request; returns its result and, if the command streams (its
    reply says "stream"), an iterator over the objects that follow, else None."""
    s = _connect(path, timeout)
    try:
        s.sendall(_request(command, args))
        f = s.makefile("rb")
        reply = json.loads(f.readline() or b"{}")
    except (OSError, ValueError) as exc:
        s.close()
        raise ControlError(f"cannot talk to {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not reply.get("ok"):
        s.close()
        raise ControlError(reply.get("error", "vswitchd closed the connection without a reply"))

    def lines():
        try:
            s.settimeout(None)   # a stream may be quiet for as long as it likes
            for line in f:
                yield json.loads(line)
        finally:
            s.close()

    if not reply.get("stream"):
        s.close()
        return reply.get("result"), None
    return reply.get("result"), lines()


def stream_events(path: str):
    _, events = call_streaming(path, "events/subscribe")
    yield from events or ()


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_ports(result: dict) -> None:
    rows = []
    for p in result["ports"]:
        s = p["stats"]
        rows.append([p["name"], p["type"], p.get("mode", "-"), p["link"], p.get("queues", "-"),
                     vlan_settings.describe(p.get("vlan")), s["rx_packets"], s["rx_bytes"], s["tx_packets"],
                     s["tx_bytes"],
                     s["rx_dropped"] + s["tx_dropped"] + s.get("vlan_dropped", 0) + s.get("police_dropped", 0),
                     s["rx_errors"] + s["tx_errors"]])
    print(table(rows, ["PORT", "TYPE", "MODE", "LINK", "QUEUES", "VLAN", "RX-PKTS", "RX-BYTES",
                       "TX-PKTS", "TX-BYTES", "DROPS", "ERRORS"]))
    for p in result["ports"]:
        if "xdp_program" in p:
            print_queue_stats(p)
    for p in result["ports"]:
        if p["stats"].get("vlan_dropped"):
            print(f"port {p['name']}: vlan_dropped {p['stats']['vlan_dropped']} "
                  "(received with a VLAN the port does not carry, or tagged on an access port)")
        if p["stats"].get("mem_faults"):
            print(f"port {p['name']}: mem_faults {p['stats']['mem_faults']} "
                  "(front-end disconnected: its guest memory faulted)")
        print_port_details(p)


# Drops by reason, printed under the table when not zero.
DROP_COUNTERS = {
    "tx_dropped_mtu": "longer than the port's MTU",
    "tx_dropped_too_big": "larger than the guest's receive buffers",
    "mtu_refused": "NET_SET_MTU values refused",
    "police_dropped": "received over the port's policing rate",
    "capture_dropped": "not captured: a capture ring was full (the reader was slow)",
    "mirror_output_dropped": "received on a mirror's output port, which takes no traffic",
    "rx_unknown_remote": "datagrams from an address that is not a remote",
    "rx_wrong_vni": "datagrams with a VNI the port does not carry",
    "rx_malformed": "malformed VXLAN datagrams",
    "rx_fragments": "outer IPv4 fragments (the AF_XDP underlay reassembles none)",
    "tx_no_neighbour": "datagrams not sent: the next hop's MAC towards the remote is not known yet",
    "tx_ring_full": "datagrams dropped: the underlay's TX ring or UMEM was full",
}


def print_port_details(p: dict) -> None:
    """A port's MTU, its drops by reason and, for vhost-user, its features by name."""
    details = [f"mtu {p['mtu']}"] if p.get("mtu") else []
    if p.get("policing"):
        details.append(f"policing {policing_settings.describe(p['policing'])}")
    details += [f"{c} {p['stats'][c]} ({why})" for c, why in DROP_COUNTERS.items() if p["stats"].get(c)]
    if p["stats"].get("rarp_sent"):
        details.append(f"rarp_sent {p['stats']['rarp_sent']} (RARP frames sent for the guest on SEND_RARP)")
    if p.get("features"):
        details.append("turned off: " + " ".join(sorted(n for n, on in p["features"].items() if not on)))
    if details:
        print(f"port {p['name']}: " + ", ".join(details))
    if p.get("remotes") is not None:
        remotes = ", ".join(f"{r['remote']} (rx {r['rx_packets']}, tx {r['tx_packets']})" for r in p["remotes"])
        print(f"  vni {p['vni']} from {p['local_ip']}:{p['dst_port']} to {remotes}")
        under = p.get("underlay") or {}
        if under.get("type") == "af-xdp":
            u = under["stats"]
            hops = ", ".join(f"{r['remote']} via {r['next_hop_mac'] or 'unresolved: ' + r.get('unresolved', '')}"
                             for r in p["remotes"])
            print(f"  underlay af-xdp on {under['interface']}: {under['mode']}, {under['copy']}, "
                  f"XDP program {under['xdp_program']['id']}; next hops: {hops}")
            print(f"  underlay rx {u['rx_packets']} tx {u['tx_packets']}  "
                  f"fill ring empty {u['kernel_rx_fill_ring_empty_descs']}  rx ring full {u['kernel_rx_ring_full']}  "
                  f"tx ring full {u['tx_ring_full']}  tx kicks {u['tx_kicks']}  fill wake-ups {u['fill_wakeups']}")
        elif "rx_polls" in p["stats"]:
            s = p["stats"]
            print(f"  recvmmsg calls {s['rx_polls']} (found nothing: {s['rx_empty_polls']}), "
                  f"bursts that skipped the socket while backing off {s['rx_polls_skipped']}")
    vhost = p.get("vhost")
    if vhost and "offered_feature_names" in vhost:
        print(f"  offered: {' '.join(vhost['offered_feature_names'])}")
        print(f"  negotiated: {' '.join(vhost['negotiated_feature_names']) or 'none (no front-end)'}")
    if vhost and (vhost.get("mem_regs_added") or vhost.get("mem_reg_refused")):
        # Memory hotplug (ADD_MEM_REG / REM_MEM_REG): what the front-end added and removed.
        print(f"  memory: {vhost['memory_regions']} regions, {vhost['memory_mapped']} bytes mapped; "
              f"mem_regs_added {vhost['mem_regs_added']} mem_regs_removed {vhost['mem_regs_removed']} "
              f"mem_reg_refused {vhost['mem_reg_refused']} rings_lost_memory {vhost['rings_lost_memory']}")


def print_queue_stats(p: dict) -> None:
    """An AF_XDP port's mode and per-queue counters: the rings' drops, kicks and wake-ups."""
    prog = p.get("xdp_program") or {}
    under = "under libxdp's dispatcher" if prog.get("dispatcher") else "without dispatcher"
    print(f"port {p['name']}: {p.get('mode')}, {p.get('copy')}, XDP program {prog.get('id')} ({under})")
    for q in p["queue_stats"]:
        print(f"  queue {q['queue']}: rx {q['rx_packets']} tx {q['tx_packets']}  "
              f"fill ring empty {q['kernel_rx_fill_ring_empty_descs']}  rx ring full {q['kernel_rx_ring_full']}  "
              f"tx ring full {q['tx_ring_full']}  tx kicks {q['tx_kicks']}  fill wake-ups {q['fill_wakeups']}")


def print_fdb(result: dict) -> None:
    rows = [[e["port"], e["vlan"], e["mac"], "static" if e["static"] else e["age"]] for e in result["entries"]]
    if any("remote" in e for e in result["entries"]):
        # Tunnel ports: the remote endpoint each MAC was learned behind.
        for row, e in zip(rows, result["entries"]):
            row.insert(1, e.get("remote", ""))
        print(table(rows, ["PORT", "REMOTE", "VLAN", "MAC", "AGE"]))
        return
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
        never = " (never sleeps: pmd.sleep false)" if p.get("poll_only") else ""
        print(f"  sleeps: {p['sleeps']} (woken by a guest: {p['kick_wakeups']}; early, the CPU shared: "
              f"{p.get('shared_sleeps', 0)}){never}")
        if p.get("yield"):
            print(f"  yields after light passes: {p['yields']} (pmd.yield true), "
                  f"sleeps after yields that ran no other thread: {p.get('yield_sleeps', 0)}")
        resume = p.get("cpu_resume_latency")
        if resume is not None:
            bound = {"0": "none", "n/a": "0 us: its idle CPU polls"}.get(resume, f"{resume} us")
            print(f"  cpu {cpu} idle states (pm_qos_resume_latency_us): left within {bound}")
        print(f"  longest gap between passes: {p['max_gap_us']} us")
        print(f"  unicast: {p['unicast']}  flooded: {p['flooded']}  dropped (same port): {p['dropped_same_port']}")


def print_kv(result: dict) -> None:
    for k, v in result.items():
        print(f"{k}: {v}")


STATS_COLUMNS = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped",
                 "rx_errors", "tx_errors"]


def print_stats(result: dict, previous: dict | None = None, dt: float = 0.0) -> None:
    """Counters per port; with the previous result and the seconds since, rates too."""
    rows = []
    for p in result["ports"]:
        row = [p["name"]] + [p[c] for c in STATS_COLUMNS]
        if previous is not None and p["name"] in previous:
            row += [f"{(p['rx_packets'] - previous[p['name']]['rx_packets']) / dt:.0f}",
                    f"{(p['tx_packets'] - previous[p['name']]['tx_packets']) / dt:.0f}"]
        rows.append(row)
    headers = ["PORT"] + [c.upper().replace("_", "-") for c in STATS_COLUMNS]
    if previous is not None:
        headers += ["RX-PPS", "TX-PPS"]
    print(table(rows, headers[:max(len(r) for r in rows)] if rows else headers), flush=True)


def print_event(event: dict) -> None:
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "event", "port"))
    print(f"{event['time']:.3f} {event['event']} {event.get('port', '')} {rest}".rstrip(), flush=True)


def print_port_types(result: dict) -> None:
    rows = []
    for t in result["types"]:
        for k in t["keys"] or [{"key": "-", "type": "", "required": False, "default": None, "help": ""}]:
            default = "required" if k["required"] else ("-" if k["default"] is None else json.dumps(k["default"]))
            rows.append([t["type"], k["key"], k["type"], default, k["help"]])
    print(table(rows, ["TYPE", "KEY", "VALUE", "DEFAULT", "DESCRIPTION"]))


# How a command's result is shown without --json; a command not here prints its JSON.
FORMATTERS = {
    "port/show": print_ports,
    "port/list": lambda r: print(table([[p["name"], p["type"], p["link"]] for p in r["ports"]],
                                       ["PORT", "TYPE", "LINK"])),
    "port/add": lambda r: print(f"added port {r['name']} ({r['type']})"),
    "port/del": lambda r: print(f"removed port {r['removed']}"),
    "port/types": print_port_types,
    "stats/show": print_stats,
    "fdb/show": print_fdb,
    "fdb/flush": lambda r: print(f"flushed {r['flushed']} entries"),
    "fdb/add": lambda r: print(f"added static entry {r['mac']}" + (f" vlan {r['vlan']}" if r.get("vlan") else "")
                               + f" -> {r['port']}"),
    "fdb/del": lambda r: print(f"removed {r['removed']}"),
    "fdb/stats": print_kv,
    "fdb/set-aging": print_kv,
    "fdb/set-max": print_kv,
    "pmd/stats": print_pmd_stats,
    "control/stats": print_kv,
    "config/dump": lambda r: print(r["yaml"], end=""),
    "config/reload": lambda r: print(__import__("vswitch.reload", fromlist=["summary"]).summary(r)),
    "list-commands": lambda r: print(table([[c["usage"], c["help"]] for c in r["commands"]],
                                           ["COMMAND", "DESCRIPTION"])),
    "version": lambda r: print(r["version"]),
    "mirror/add": lambda r: print(f"added mirror {r['name']}"),
    "mirror/del": lambda r: print(f"removed mirror {r['removed']}"),
    "mirror/list": lambda r: print(table([[m["name"], ",".join(m["select"]), m["select_direction"], m["output"]]
                                          for m in r["mirrors"]], ["MIRROR", "SELECT", "DIRECTION", "OUTPUT"])),
}
# How each line of a streaming command is shown without --json.
STREAM_FORMATTERS = {
    "events/subscribe": print_event,
}


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
            print_stats(result, previous, now - before)
        if args.watch is None:
            return
        previous, before = {p["name"]: p for p in result["ports"]}, now
        time.sleep(args.watch)
        if not args.json:
            print()


def top(sock: str, args) -> None:
    """A live view, refreshed every --interval seconds: ports by traffic rate, then the PMD threads."""
    if args.interval <= 0:
        raise ControlError("--interval takes a positive number of seconds")
    tty = sys.stdout.isatty()
    before = None
    frames = 0
    while args.iterations is None or frames < args.iterations:
        now = (time.monotonic(), {p["name"]: p for p in call(sock, "port/show", {})["ports"]},
               {p["pmd"]: p for p in call(sock, "pmd/stats", {})["pmds"]})
        if before is not None:
            text = render_top(before, now)
            # A terminal gets the screen redrawn in place; a pipe gets one block per refresh.
            print(("\x1b[H\x1b[2J" if tty else "") + text, flush=True)
            frames += 1
        before = now
        time.sleep(args.interval)


def render_top(before, now) -> str:
    """The `top` screen from two samples (monotonic time, ports by name, PMDs by index)."""
    seconds = max(now[0] - before[0], 1e-6)

    def rate(new: dict, old: dict | None, key: str) -> float:
        return (new[key] - (old or {}).get(key, 0)) / seconds if old is not None else 0.0

    rows = []
    for name, port in now[1].items():
        new, old = port["stats"], before[1].get(name, {}).get("stats")
        rx, tx = rate(new, old, "rx_packets"), rate(new, old, "tx_packets")
        drops = rate(new, old, "rx_dropped") + rate(new, old, "tx_dropped")
        errors = rate(new, old, "rx_errors") + rate(new, old, "tx_errors")
        rows.append((rx + tx, [name, port["type"], port["link"], f"{rx:,.0f}", f"{tx:,.0f}",
                               f"{rate(new, old, 'rx_bytes') * 8 / 1e6:,.1f}",
                               f"{rate(new, old, 'tx_bytes') * 8 / 1e6:,.1f}", f"{drops:,.0f}", f"{errors:,.0f}"]))
    rows.sort(key=lambda r: -r[0])
    pmds = []
    for index, pmd in now[2].items():
        old = before[2].get(index, {})
        busy = pmd["busy_cycles"] - old.get("busy_cycles", 0)
        idle = pmd["idle_cycles"] - old.get("idle_cycles", 0)
        packets = pmd["packets"] - old.get("packets", 0)
        bursts = pmd["bursts"] - old.get("bursts", 0)
        pmds.append([str(index), "-" if pmd["cpu"] is None else str(pmd["cpu"]),
                     f"{100.0 * busy / (busy + idle):.1f}" if busy + idle else "0.0", f"{packets / seconds:,.0f}",
                     f"{busy / packets:.0f}" if packets else "-", f"{packets / bursts:.1f}" if bursts else "-",
                     f"{(pmd['sleeps'] - old.get('sleeps', 0)) / seconds:,.0f}", str(len(pmd["rx_queues"]))])
    return (f"vswitch top: {len(rows)} ports, refreshed every {seconds:.1f} s\n\n"
            + table([r[1] for r in rows], ["PORT", "TYPE", "LINK", "RX PPS", "TX PPS", "RX MBIT/S", "TX MBIT/S",
                                           "DROPS/S", "ERRORS/S"])
            + "\n\n" + table(pmds, ["PMD", "CPU", "BUSY %", "PPS", "CYC/PKT", "PKT/BURST", "SLEEPS/S", "QUEUES"]))


def _flag_value(key: port_registry.Key):
    """argparse's type= for a key's flag: its parse_flag (or its type), errors as usage errors."""
    parse = key.parse_flag or key.type

    def convert(text: str):
        try:
            return parse(text)
        except port_registry.KeyProblem as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = key.shown_type   # argparse says "invalid int value: ..."
    return convert


def _key_dest(key: str) -> str:
    """Where argparse keeps a port key's flag: apart from vswitchctl's own options."""
    return f"port_key_{key}"


def _add_port_parser(sub) -> None:
    """`add-port`, generated from the port types: one flag per key, whatever types have it."""
    types = port_registry.port_types()
    names = [t.name for t in types]
    epilog = "port types:\n" + "\n".join(
        f"  {t.name}: {t.help}\n    vswitchctl add-port NAME --type {t.name} {t.synopsis}".rstrip() for t in types)
    add = sub.add_parser("add-port", help=f"add a port to the running switch ({', '.join(names)})",
                         description="Add a port to the running switch; the other ports keep forwarding.",
                         epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("name")
    add.add_argument("--type", required=True, choices=names)
    for name, (key, kinds) in port_registry.all_keys().items():
        if key is port_registry.VLAN_KEY:
            _add_vlan_flags(add)
            continue
        if key is port_registry.POLICING_KEY:
            _add_policing_flags(add)
            continue
        text = port_registry.key_help(name)
        # A key several types share (mode) takes the choices of each; the
        # daemon checks the value against the port's own type.
        choices = []
        for kind in kinds:
            choices += [c for c in port_registry.get(kind).key(name).choices if c not in choices]
        options = {"dest": _key_dest(name), "help": text.replace("%", "%%")}
        if key.type is bool:
            add.add_argument(key.flag, action=argparse.BooleanOptionalAction, default=None, **options)
        else:
            add.add_argument(key.flag, type=_flag_value(key), choices=choices or None,
                             metavar=None if choices else (key.metavar or name.upper()), **options)


def _add_vlan_flags(parser) -> None:
    """The `vlan` key as three flags (add-port and set port NAME vlan); the daemon checks them together."""
    parser.add_argument("--vlan-mode", metavar="MODE", help="any type: access, trunk, native-untagged or "
                        "native-tagged (default: access with --tag, else trunk)")
    parser.add_argument("--tag", type=int, metavar="VLAN", help="any type: the access or native VLAN (1..4094)")
    # Passed on as text: the daemon reads the list, so a bad one is its one-line error.
    parser.add_argument("--trunks", metavar="LIST",
                        help="any type: VLANs a trunk carries, e.g. 10,20,100-110 (default: all)")


def _vlan_from_flags(args) -> dict | None:
    """The vlan mapping the flags give, or None if none was given."""
    given = {"mode": args.vlan_mode, "tag": args.tag, "trunks": args.trunks}
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


def _add_policing_flags(parser) -> None:
    """The `policing` key as four flags (add-port and set port NAME policing); the daemon checks them."""
    parser.add_argument("--pps", metavar="RATE", help="any type: ingress policing, packets per second "
                        "(k, M, G suffixes)")
    parser.add_argument("--bps", metavar="RATE", help="any type: ingress policing, bits per second (e.g. 100M)")
    parser.add_argument("--burst-packets", metavar="N", help="any type: policing bucket depth in packets "
                        "(default: 100 ms at --pps, at least 32)")
    parser.add_argument("--burst-bytes", metavar="N", help="any type: policing bucket depth in bytes "
                        "(default: 100 ms at --bps, at least 64 KiB)")


def _policing_from_flags(args) -> dict | None:
    """The policing mapping the flags give, or None if none was given."""
    given = {"pps": args.pps, "bps": args.bps, "burst_packets": args.burst_packets,
             "burst_bytes": args.burst_bytes}
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


def _key_value(text: str) -> tuple[str, object]:
    """A `call` argument: key=value, the value parsed as JSON if it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


CALL_EPILOG = """\
Any control command can also be given directly: vswitchctl COMMAND key=value ...
Values are JSON when they parse as JSON (5, true, null, [1,2], "007"), else
strings.  `vswitchctl list-commands` lists the commands with their arguments."""


def build_parser(port_types: bool = True) -> argparse.ArgumentParser:
    """The command line.  Without `port_types`, add-port is a stub: loading the
    port types imports every port module, which a command that neither adds a
    port nor shows help need not wait for."""
    p = argparse.ArgumentParser(prog="vswitchctl", description="control a running vswitchd", epilog=CALL_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", default=os.environ.get("VSWITCH_SOCKET", DEFAULT_CONTROL_SOCKET),
                   help="control socket (default $VSWITCH_SOCKET or %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw JSON result")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="ports with mode, link, queues and counters")
    show.add_argument("name", nargs="?")
    sub.add_parser("list-ports", help="port names, types and link states")
    if port_types:
        _add_port_parser(sub)
    else:
        sub.add_parser("add-port")
    delete = sub.add_parser("del-port", help="remove a port")
    delete.add_argument("name")
    sub.add_parser("port-types", help="the port types with their keys")
    stats = sub.add_parser("stats", help="port counters")
    stats.add_argument("name", nargs="?")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS, with rates")
    setp = sub.add_parser("set", help="change a setting")
    set_sub = setp.add_subparsers(dest="set_cmd", required=True, metavar="setting")
    aging = set_sub.add_parser("fdb-aging", help="MAC entry idle lifetime")
    aging.add_argument("seconds", type=int)
    fdb_max = set_sub.add_parser("fdb-max", help="MAC table size limit")
    fdb_max.add_argument("entries", type=int)
    set_port = set_sub.add_parser("port", help="a port's settings: set port NAME vlan [--vlan-mode M] [--tag N] "
                                  "[--trunks LIST] | none; set port NAME policing [--pps R] [--bps R] "
                                  "[--burst-packets N] [--burst-bytes N] | none")
    set_port.add_argument("name")
    set_port.add_argument("setting", choices=["vlan", "policing"])
    set_port.add_argument("none", nargs="?", choices=["none"], help="remove the port's settings (VLAN 0, no "
                          "policing)")
    _add_vlan_flags(set_port)
    _add_policing_flags(set_port)
    config = sub.add_parser("config", help="the running configuration")
    config_sub = config.add_subparsers(dest="config_cmd", required=True, metavar="config-command")
    config_sub.add_parser("dump", help="print it as YAML")
    sub.add_parser("reload", help="re-read the config file and apply what differs (as SIGHUP does)")
    fdb = sub.add_parser("fdb", help="the MAC table")
    fdb_sub = fdb.add_subparsers(dest="fdb_cmd", required=True, metavar="fdb-command")
    fdb_show = fdb_sub.add_parser("show", help="list the entries")
    fdb_show.add_argument("--port")
    fdb_show.add_argument("--vlan", type=int)
    fdb_flush = fdb_sub.add_parser("flush", help="remove learned entries")
    fdb_flush.add_argument("--port")
    fdb_flush.add_argument("--vlan", type=int)
    fdb_sub.add_parser("stats", help="learned, moved, aged, evicted")
    fdb_add = fdb_sub.add_parser("add", help="add a static entry")
    fdb_add.add_argument("mac")
    fdb_add.add_argument("port")
    fdb_add.add_argument("--vlan", type=int)
    fdb_del = fdb_sub.add_parser("del", help="remove an entry")
    fdb_del.add_argument("mac")
    fdb_del.add_argument("--vlan", type=int)
    pmd_stats = sub.add_parser("pmd-stats", help="per PMD thread counters")
    pmd_stats.add_argument("--reset-gap", action="store_true",
                           help="after reading, restart the longest gap between passes")
    top_p = sub.add_parser("top", help="live view: ports by traffic rate, PMD load (Ctrl-C to leave)")
    top_p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top_p.add_argument("--iterations", type=int, help="stop after this many refreshes")
    cap = sub.add_parser("capture", help="write the frames a port receives and/or is sent to a pcap file "
                         "(-w - : to stdout, e.g. | tcpdump -r -)")
    cap.add_argument("port")
    cap.add_argument("--direction", default="both", help="rx (received from the port), tx (sent to it) or both "
                     "(default both)")
    cap.add_argument("--count", "-c", type=int, help="stop after this many frames (default: until Ctrl-C)")
    cap.add_argument("--snaplen", "-s", type=int, default=65535, help="bytes kept per frame (default 65535)")
    cap.add_argument("-w", dest="write", required=True, metavar="FILE", help="pcap file to write, - for stdout")
    mirror = sub.add_parser("mirror", help="port mirrors: copies of ports' traffic sent to an output port")
    mirror_sub = mirror.add_subparsers(dest="mirror_cmd", required=True, metavar="mirror-command")
    mirror_add = mirror_sub.add_parser("add", help="add a mirror: mirror add NAME --select P1,P2 --output P "
                                       "[--direction rx|tx|both]")
    mirror_add.add_argument("name")
    mirror_add.add_argument("--select", required=True, help="comma-separated ports whose traffic is copied")
    mirror_add.add_argument("--output", required=True, help="the port the copies go to")
    mirror_add.add_argument("--direction", help="rx, tx or both (default both)")
    mirror_del = mirror_sub.add_parser("del", help="remove a mirror")
    mirror_del.add_argument("name")
    mirror_sub.add_parser("list", help="list the mirrors")
    sub.add_parser("control-stats", help="control socket counters: connections, refused clients, changes")
    sub.add_parser("events", help="stream port, link and queue events")
    sub.add_parser("list-commands", help="every control command with its usage")
    sub.add_parser("version", help="the daemon's version")
    call_p = sub.add_parser("call", help="call any control command: call COMMAND [key=value ...]",
                            epilog=CALL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    call_p.add_argument("command", help="a command from list-commands, e.g. port/show")
    call_p.add_argument("args", nargs="*", type=_key_value, metavar="key=value")
    return p


# The control command each plain subcommand stands for, and its arguments.
SUBCOMMANDS = {
    "show": lambda a: ("port/show", {"name": a.name}),
    "list-ports": lambda a: ("port/list", {}),
    "del-port": lambda a: ("port/del", {"name": a.name}),
    "port-types": lambda a: ("port/types", {}),
    "set": lambda a: {"fdb-aging": lambda: ("fdb/set-aging", {"seconds": a.seconds}),
                      "fdb-max": lambda: ("fdb/set-max", {"entries": a.entries}),
                      "port": lambda: set_port_request(a)}[a.set_cmd](),
    "config": lambda a: ("config/dump", {}),
    "reload": lambda a: ("config/reload", {}),
    "fdb": lambda a: {"show": lambda: ("fdb/show", {"port": a.port, "vlan": a.vlan}),
                      "flush": lambda: ("fdb/flush", {"port": a.port, "vlan": a.vlan}),
                      "add": lambda: ("fdb/add", {"mac": a.mac, "port": a.port, "vlan": a.vlan}),
                      "del": lambda: ("fdb/del", {"mac": a.mac, "vlan": a.vlan}),
                      "stats": lambda: ("fdb/stats", {})}[a.fdb_cmd](),
    "pmd-stats": lambda a: ("pmd/stats", {"reset_max_gap": True} if a.reset_gap else {}),
    "mirror": lambda a: {"add": lambda: ("mirror/add", {"name": a.name, "select": [p for p in a.select.split(",") if p],
                                                       "output": a.output, "select_direction": a.direction}),
                         "del": lambda: ("mirror/del", {"name": a.name}),
                         "list": lambda: ("mirror/list", {})}[a.mirror_cmd](),
    "control-stats": lambda a: ("control/stats", {}),
    "events": lambda a: ("events/subscribe", {}),
    "list-commands": lambda a: ("list-commands", {}),
    "version": lambda a: ("version", {}),
    "call": lambda a: (a.command, dict(a.args)),
}


def add_port_request(args) -> tuple[str, dict]:
    spec = {"name": args.name, "type": args.type}
    spec.update({key: getattr(args, _key_dest(key)) for key in port_registry.all_keys()
                 if key not in (port_registry.VLAN_KEY.name, port_registry.POLICING_KEY.name)})
    spec["vlan"] = _vlan_from_flags(args)
    spec["policing"] = _policing_from_flags(args)
    return "port/add", {k: v for k, v in spec.items() if v is not None}


def set_port_request(args) -> tuple[str, dict]:
    vlan, policing = _vlan_from_flags(args), _policing_from_flags(args)
    settings, other, flags = ((vlan, policing, "--vlan-mode, --tag and/or --trunks") if args.setting == "vlan" else
                              (policing, vlan, "--pps, --bps, --burst-packets and/or --burst-bytes"))
    usage = f"set port NAME {args.setting}"
    if other:
        raise ControlError(f"{usage}: takes only {flags}")
    if args.none and settings:
        raise ControlError(f"{usage}: 'none' takes no {flags}")
    if not args.none and not settings:
        raise ControlError(f"{usage}: give {flags}, or 'none'")
    return f"port/set-{args.setting}", {"name": args.name, args.setting: settings}


def capture(sock: str, args) -> None:
    """Streams a port's frames from the daemon into a pcap file (or stdout), written with scapy.
    What was written and what the switch dropped (its ring was full) go to stderr at the end."""
    request = {"port": args.port, "direction": args.direction, "snaplen": args.snaplen, "count": args.count}
    if args.count is not None and args.count < 1:
        raise ControlError(f"capture: --count {args.count} must be at least 1")
    result, frames = call_streaming(sock, "capture/start", {k: v for k, v in request.items() if v is not None})
    from scapy.utils import RawPcapWriter   # slow to import: only here

    to_stdout = args.write == "-"
    try:
        out = sys.stdout.buffer if to_stdout else open(args.write, "wb")
    except OSError as exc:
        raise ControlError(f"cannot write {args.write}: {exc.strerror}") from None
    writer = RawPcapWriter(out, linktype=1, nano=True, snaplen=result["snaplen"], sync=to_stdout)
    written, last = 0, {}
    try:
        writer.write_header(None)
        if to_stdout:
            out.flush()
        for item in frames or ():
            if "data" not in item:
                last = item       # counters, and the end of the stream
                continue
            data = base64.b64decode(item["data"])
            sec, nsec = divmod(item["time_ns"], 1_000_000_000)
            writer.write_packet(data, sec=sec, usec=nsec, caplen=len(data), wirelen=item["len"])
            written += 1
    finally:
        if to_stdout:
            with contextlib.suppress(BrokenPipeError):
                out.flush()
        else:
            writer.close()
        dropped = f", {last['dropped']} dropped by the switch (capture ring full)" if last.get("dropped") else ""
        ended = f" ({last['end']})" if last.get("end") and last["end"] != "count reached" else ""
        print(f"vswitchctl: {written} frames written from port {args.port}{dropped}{ended}", file=sys.stderr)


def run(args) -> None:
    if args.cmd == "capture":
        capture(args.socket, args)
        return
    if args.cmd == "stats":
        watch_stats(args.socket, args)
        return
    if args.cmd == "top":
        top(args.socket, args)
        return
    command, request = add_port_request(args) if args.cmd == "add-port" else SUBCOMMANDS[args.cmd](args)
    result, stream = call_streaming(args.socket, command, request)
    if stream is None:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            FORMATTERS.get(command, lambda r: print(json.dumps(r, indent=2)))(result)
        return
    # A stream: the lines that follow the reply are what the user asked for.
    show = STREAM_FORMATTERS.get(command) if not args.json else None
    for item in stream:
        if show:
            show(item)
        else:
            print(json.dumps(item), flush=True)


def _direct_command(argv: list[str]) -> list[str]:
    """`vswitchctl port/show name=vm1` is `vswitchctl call port/show name=vm1`."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--socket":
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return argv[:i] + ["call"] + argv[i:] if "/" in arg else argv
    return argv


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    needs_port_types = any(a in ("add-port", "-h", "--help") for a in argv)
    args = build_parser(port_types=needs_port_types).parse_args(_direct_command(argv))
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
