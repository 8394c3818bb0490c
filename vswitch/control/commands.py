"""The control commands, registered by name in one registry."""

from __future__ import annotations

import vswitch
from vswitch.control.registry import Arg, CommandError, Registry
from vswitch.fib import FibError
from vswitch.switch import Switch, SwitchError

registry = Registry()


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


@registry.command("fdb/show", "Show the MAC table.", Arg("port", str, help="only entries on this port"))
async def fdb_show(switch: Switch, port: str | None = None):
    try:
        return {"entries": switch.fdb_entries(port)}
    except SwitchError as exc:
        raise CommandError(str(exc)) from None


@registry.command("fdb/flush", "Remove learned MAC entries.", Arg("port", str, help="only on this port"))
async def fdb_flush(switch: Switch, port: str | None = None):
    port_no = _port(switch, port).port_no if port else None
    return {"flushed": switch.fib.flush(port_no)}


@registry.command("fdb/stats", "Show MAC table counters: learned, moved, aged, evicted.")
async def fdb_stats(switch: Switch):
    return switch.fib.stats()


@registry.command("pmd/stats", "Show per-PMD-thread packet and cycle counters.")
async def pmd_stats(switch: Switch):
    return {"pmds": [p.stats() for p in switch.pmds]}


