"""The control commands, registered by name in one registry."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import yaml

import vswitch
from vswitch import capture as capture_mod
from vswitch.control.registry import Arg, CommandError, Registry, Stream
from vswitch.config import ConfigError
from vswitch.fib import FibError
from vswitch.ports import registry as port_types
from vswitch.switch import Switch, SwitchError

registry = Registry()


@contextlib.contextmanager
def refused():
    """Turns the switch's own refusals into one-line command errors."""
    try:
        yield
    except (SwitchError, FibError) as exc:
        raise CommandError(str(exc)) from None


def _port(switch: Switch, name: str):
    port = switch.ports.get(name)
    if port is None:
        raise CommandError(f"no port named '{name}'")
    return port


@registry.command("list-commands", "List every command with its usage.")
async def list_commands(switch: Switch):
    return {"commands": registry.describe()}


@registry.command("version", "Show the vswitch version.")
async def version(switch: Switch):
    return {"version": vswitch.__version__}


@registry.command("port/list", "List the ports: name, type, link state.")
async def port_list(switch: Switch):
    return {"ports": [{"name": p.name, "type": p.type, "link": "up" if p.link_up else "down"}
                      for p in sorted(switch.ports.values(), key=lambda p: p.port_no)]}


@registry.command("port/show", "Show ports with their mode, link, queues and counters.",
                  Arg("name", str, help="only this port"))
async def port_show(switch: Switch, name: str | None = None):
    ports = [_port(switch, name)] if name else sorted(switch.ports.values(), key=lambda p: p.port_no)
    return {"ports": [p.info() for p in ports]}


def _vlan_id(command: str, vlan: int | None) -> int | None:
    if vlan is not None and not 0 <= vlan <= 4094:
        raise CommandError(f"{command}: vlan {vlan} must be a VLAN ID from 0 to 4094")
    return vlan


@registry.command("fdb/show", "Show the MAC table.", Arg("port", str, help="only entries on this port"),
                  Arg("vlan", int, help="only entries in this VLAN (0: ports without VLAN settings)"))
async def fdb_show(switch: Switch, port: str | None = None, vlan: int | None = None):
    vlan = _vlan_id("fdb/show", vlan)
    with refused():
        return {"entries": [e for e in switch.fdb_entries(port) if vlan is None or e["vlan"] == vlan]}


@registry.command("fdb/flush", "Remove learned MAC entries.", Arg("port", str, help="only on this port"),
                  Arg("vlan", int, help="only in this VLAN"), changes=True)
async def fdb_flush(switch: Switch, port: str | None = None, vlan: int | None = None):
    vlan = _vlan_id("fdb/flush", vlan)
    port_no = _port(switch, port).port_no if port else None
    return {"flushed": switch.fib.flush(port_no, vlan=vlan)}


@registry.command("fdb/stats", "Show MAC table counters: learned, moved, aged, evicted.")
async def fdb_stats(switch: Switch):
    return switch.fib.stats()


@registry.command("pmd/stats", "Show per-PMD-thread packet and cycle counters.",
                  Arg("reset_max_gap", bool, help="after reading, restart the longest gap between passes"))
async def pmd_stats(switch: Switch, reset_max_gap: bool = False):
    result = {"pmds": [p.stats() for p in switch.pmds]}
    if reset_max_gap:
        for p in switch.pmds:
            p.reset_max_gap()
    return result


@registry.command("control/stats", "Show control socket counters: connections, refused clients, bad requests, "
                  "changes.", wants_server=True)
async def control_stats(switch: Switch, server):
    return server.stats()




def _port_add_args() -> tuple[Arg, ...]:
    """name, type, then every port type's keys: each type's own are checked by config.validate_port."""
    args = [Arg("name", str, True, "a short identifier"),
            Arg("type", str, True, ", ".join(port_types.names()))]
    for key, _ in port_types.all_keys().values():
        args.append(Arg(key.name, object, help=port_types.key_help(key.name), type_name=key.shown_type))
    return tuple(args)


def _port_add_help() -> str:
    types = "; ".join(f"{t.name} ({', '.join(k.name for k in t.keys) or 'no keys'})" for t in port_types.port_types())
    return f"Add a port; the other ports keep forwarding. Types and their keys: {types}."


@registry.command("port/add", _port_add_help, args_from=_port_add_args, changes=True)
async def port_add(switch: Switch, **spec):
    with refused():
        port = await switch.add_port(spec)
    return port.info()


@registry.command("port/set-vlan", "Change a port's VLAN settings at run time (vlan absent or null: none, "
                  "VLAN 0); its learned MAC entries are flushed.", Arg("name", str, True),
                  Arg("vlan", object, help="{mode: access|trunk|native-untagged|native-tagged, tag: N, "
                      "trunks: [N, ...]}", type_name="mapping"), changes=True)
async def port_set_vlan(switch: Switch, name: str, vlan=None):
    with refused():
        return {"name": name, "vlan": switch.set_port_vlan(name, vlan)}


@registry.command("port/set-policing", "Change a port's ingress policing at run time (policing absent or "
                  "null: none); the buckets start full.", Arg("name", str, True),
                  Arg("policing", object, help="{pps: N, bps: N, burst_packets: N, burst_bytes: N}",
                      type_name="mapping"), changes=True)
async def port_set_policing(switch: Switch, name: str, policing=None):
    with refused():
        return {"name": name, "policing": switch.set_port_policing(name, policing)}


@registry.command("port/types", "The port types port/add takes, with their keys: type, default, help.")
async def port_type_list(switch: Switch):
    return {"types": [t.describe() for t in port_types.port_types()]}


@registry.command("port/del", "Remove a port; its guest sees the link go down.", Arg("name", str, True),
                  changes=True)
async def port_del(switch: Switch, name: str):
    with refused():
        await switch.del_port(name)
    return {"removed": name}


@registry.command("stats/show", "Per-port counters, or one port's.", Arg("name", str, help="only this port"))
async def stats_show(switch: Switch, name: str | None = None):
    ports = [_port(switch, name)] if name else sorted(switch.ports.values(), key=lambda p: p.port_no)
    return {"ports": [{"name": p.name, **p.counters()} for p in ports]}


@registry.command("fdb/add", "Add a static MAC entry.", Arg("mac", str, True), Arg("port", str, True),
                  Arg("vlan", int, help="its VLAN (default 0: ports without VLAN settings)"), changes=True)
async def fdb_add(switch: Switch, mac: str, port: str, vlan: int | None = None):
    vlan = _vlan_id("fdb/add", vlan) or 0
    with refused():
        switch.fdb_add_static(mac, port, vlan)
    return {"mac": mac.lower(), "port": port, **({"vlan": vlan} if vlan else {}), "static": True}


@registry.command("fdb/del", "Remove a MAC entry, learned or static.", Arg("mac", str, True),
                  Arg("vlan", int, help="its VLAN (default 0)"), changes=True)
async def fdb_del(switch: Switch, mac: str, vlan: int | None = None):
    vlan = _vlan_id("fdb/del", vlan) or 0
    with refused():
        if not switch.fdb_remove(mac, vlan):
            raise CommandError(f"no MAC table entry for {mac}" + (f" in VLAN {vlan}" if vlan else ""))
    return {"removed": mac.lower(), **({"vlan": vlan} if vlan else {})}


@registry.command("fdb/set-aging", "Set how long an idle MAC entry lives.", Arg("seconds", int, True),
                  changes=True)
async def fdb_set_aging(switch: Switch, seconds: int):
    with refused():
        switch.set_fdb_aging(seconds)
    return {"aging_seconds": seconds}


@registry.command("fdb/set-max", "Set the MAC table's size limit.", Arg("entries", int, True), changes=True)
async def fdb_set_max(switch: Switch, entries: int):
    with refused():
        switch.set_fdb_max(entries)
    return {"max_entries": entries}


@registry.command("config/dump", "The running configuration, as YAML.")
async def config_dump(switch: Switch):
    data = switch.config.to_yaml_data()
    return {"config": data, "yaml": yaml.safe_dump(data, sort_keys=False, default_flow_style=None)}


# Events a subscriber has not read yet, at most; more are dropped (for that subscriber only).
EVENT_BACKLOG = 10000


@registry.command("config/reload", "Re-read the config file and apply what differs (as SIGHUP does).",
                  changes=True)
async def config_reload(switch: Switch):
    if switch.reload is None:
        raise CommandError("this switch has no config file to reload")
    try:
        return await switch.reload()
    except ConfigError as exc:
        raise CommandError("reload refused, nothing changed: " + "; ".join(exc.problems)) from None


@registry.command("events/subscribe", "Stream port, link and queue events, one JSON object a line, "
                  "until the client closes the connection.", streams=True)
async def events_subscribe(switch: Switch, stream: Stream):
    queue: asyncio.Queue = asyncio.Queue(maxsize=EVENT_BACKLOG)

    def deliver(event: dict) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(event)

    unsubscribe = switch.subscribe(deliver)
    try:
        await stream.start({"subscribed": True})
        while True:
            await stream.send(await queue.get())
    finally:
        unsubscribe()


# Capture and mirroring (vswitch/capture.py).

# With no frame to send, a capture stream still sends its counters this often,
# which is also how it finds out that its client has gone.
CAPTURE_HEARTBEAT_SECONDS = 1.0


@registry.command("capture/start", "Stream the frames a port receives and/or is sent, one JSON object a line "
                  "({time_ns, len, data: base64}), until count frames or the client closes the connection; "
                  "`vswitchctl capture` writes them to a pcap file.", Arg("port", str, True),
                  Arg("direction", str, help="rx, tx or both (default both)"),
                  Arg("snaplen", int, help=f"bytes kept per frame, 1 to {capture_mod.MAX_SNAPLEN} "
                      f"(default {capture_mod.DEFAULT_SNAPLEN})"),
                  Arg("count", int, help="stop after this many frames"), streams=True)
async def capture_start(switch: Switch, stream: Stream, port: str, direction: str = "both",
                        snaplen: int = capture_mod.DEFAULT_SNAPLEN, count: int | None = None):
    if count is not None and count < 1:
        raise CommandError(f"capture: count {count} must be at least 1")
    try:
        capture_mod.check_direction(direction)
        capture_mod.check_snaplen(snaplen)
    except capture_mod.CaptureProblem as exc:
        raise CommandError(f"capture: {exc}") from None
    with refused():
        cap = switch.start_capture(port, direction, snaplen)
    sent = 0
    try:
        await stream.start({"port": port, "direction": direction, "snaplen": snaplen, "slots": cap.n_slots})
        quiet = 0.0
        while cap.ended is None:
            frames = cap.read()
            for time_ns, wire_len, data in frames[:None if count is None else count - sent]:
                await stream.send({"time_ns": time_ns, "len": wire_len,
                                   "data": base64.b64encode(data).decode()})
                sent += 1
            if count is not None and sent >= count:
                break
            if frames:
                quiet = 0.0
            else:
                quiet += capture_mod.DRAIN_SECONDS
                if quiet >= CAPTURE_HEARTBEAT_SECONDS:
                    quiet = 0.0
                    await stream.send({"captured": cap.captured, "dropped": cap.dropped})
                await asyncio.sleep(capture_mod.DRAIN_SECONDS)
        await stream.send({"end": cap.ended or "count reached", "sent": sent, "captured": cap.captured,
                           "dropped": cap.dropped})
    finally:
        switch.stop_capture(cap)


@registry.command("mirror/add", "Mirror ports: copies of what the selected ports receive and/or are sent go to "
                  "the output port (which then takes no other traffic).", Arg("name", str, True),
                  Arg("select", list, True, "port names", type_name="list"), Arg("output", str, True),
                  Arg("select_direction", str, help="rx, tx or both (default both)"), changes=True)
async def mirror_add(switch: Switch, name: str, select: list, output: str, select_direction: str | None = None):
    spec = {"name": name, "select": select, "output": output}
    if select_direction is not None:
        spec["select_direction"] = select_direction
    with refused():
        return switch.add_mirror(spec)


@registry.command("mirror/del", "Remove a mirror.", Arg("name", str, True), changes=True)
async def mirror_del(switch: Switch, name: str):
    with refused():
        switch.del_mirror(name)
    return {"removed": name}


@registry.command("mirror/list", "The mirrors: name, selected ports, direction, output.")
async def mirror_list(switch: Switch):
    return {"mirrors": [{**m, "select_direction": m.get("select_direction", "both")} for m in switch.config.mirrors]}
