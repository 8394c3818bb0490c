"""Reload: make the running switch match a config file again, changing only what differs.

`vswitchd` reloads on SIGHUP and on `vswitchctl reload`.  The file is read
and validated first; a file with any problem changes nothing and the
problems are the answer.  Then, against the running switch:

* a port in the file and not running is added; one running and not in the
  file is removed; one whose `vlan` or `policing` alone differ gets the new
  settings in place (it keeps its link and its guest); one whose other keys
  differ is re-created (removed and added again: its guest sees the link go
  down and up); every other port is not
  touched, and loses no frame (the PMDs switch port tables without
  stopping, as for `add-port`);
* `fdb.aging_seconds`, `fdb.max_entries` and `fdb.static` are set to the
  file's values (`fdb.max_entries` above what the table was allocated for at
  start is reported as needing a restart), and so are the `mirrors`, once the
  ports are in place;
* settings that only a restart can change (`control_socket`,
  `control_group`, `pmd.cpus`, `metrics.listen`) are reported, not applied.

A port that cannot be created (say, its interface is missing) is reported
and the rest of the reload goes on.  The reload itself is not a user's
change: with `--persist` the file is not written back.
"""

from __future__ import annotations

import logging

from vswitch.config import Config, load
from vswitch.fib import FibError
from vswitch.switch import Switch, SwitchError

log = logging.getLogger(__name__)

RESTART_ONLY = {"control_socket": "control_socket", "control_group": "control_group", "pmd_cpus": "pmd.cpus",
                "pmd_sleep": "pmd.sleep", "pmd_yield": "pmd.yield",
                "pmd_cpu_resume_latency_us": "pmd.cpu_resume_latency_us",
                "metrics_listen": "metrics.listen"}


async def reload(switch: Switch, path: str, running: Config) -> dict:
    """Applies the file at `path` to the switch; `running` is the config the process started with
    (for the restart-only settings).  Raises ConfigError if the file is invalid (nothing changed)."""
    new = load(path)
    old_ports = {p["name"]: p for p in switch.config.ports}
    new_ports = {p["name"]: p for p in new.ports}
    removed = [n for n in old_ports if n not in new_ports]
    changed = [n for n in old_ports if n in new_ports and new_ports[n] != old_ports[n]]
    added = [n for n in new_ports if n not in old_ports]
    result = {"added": [], "removed": [], "changed": [], "unchanged": len(old_ports) - len(removed) - len(changed),
              "fdb": [], "restart_needed": [], "errors": []}

    # A port whose VLAN or policing settings alone changed keeps running: they are swapped in place.
    in_place = [n for n in changed if _without(old_ports[n], IN_PLACE) == _without(new_ports[n], IN_PLACE)]
    recreated = [n for n in changed if n not in in_place]

    on_change, switch.on_change = switch.on_change, None
    try:
        for name in in_place:
            for key, apply in (("vlan", switch.set_port_vlan), ("policing", switch.set_port_policing)):
                if old_ports[name].get(key) != new_ports[name].get(key):
                    apply(name, new_ports[name].get(key))
            result["changed"].append(name)
        for name in removed + recreated:
            await switch.del_port(name)
            if name in removed:
                result["removed"].append(name)
        # In file order, so that port numbers follow the file as at start-up.
        for name in [n for n in new_ports if n in recreated or n in added]:
            try:
                await switch.add_port(new_ports[name])
                result["changed" if name in recreated else "added"].append(name)
            except SwitchError as exc:
                result["errors"].append(str(exc))
        _apply_fdb(switch, new, result)
        # Last, once every port they name exists (a removed port already left them).
        if new.mirrors != switch.config.mirrors:
            switch.set_mirrors(new.mirrors)
            result["mirrors"] = [m["name"] for m in new.mirrors]
    finally:
        switch.on_change = on_change
    for attr, key in RESTART_ONLY.items():
        if getattr(new, attr) != getattr(running, attr):
            result["restart_needed"].append(key)
    return result


# Port keys a reload changes without re-creating the port.
IN_PLACE = ("vlan", "policing")


def _without(spec: dict, keys: tuple) -> dict:
    return {k: v for k, v in spec.items() if k not in keys}


def _apply_fdb(switch: Switch, new: Config, result: dict) -> None:
    if new.fdb_aging_seconds != switch.config.fdb_aging_seconds:
        switch.set_fdb_aging(new.fdb_aging_seconds)
        result["fdb"].append(f"aging_seconds={new.fdb_aging_seconds}")
    if new.fdb_max_entries > switch.fib.capacity:
        # The table was allocated at start for a smaller limit: growing it takes a restart.
        result["restart_needed"].append(f"fdb.max_entries (above the {switch.fib.capacity} allocated at start)")
    elif new.fdb_max_entries != switch.config.fdb_max_entries:
        switch.set_fdb_max(new.fdb_max_entries)
        result["fdb"].append(f"max_entries={new.fdb_max_entries}")
    wanted = {e["mac"].lower(): e["port"] for e in new.fdb_static}
    have = {e["mac"]: e["port"] for e in switch.config.fdb_static}
    for mac in [m for m in have if wanted.get(m) != have[m]]:
        switch.fdb_remove(mac)
        result["fdb"].append(f"static {mac} removed")
    for mac, port in wanted.items():
        if have.get(mac) != port:
            try:
                switch.fdb_add_static(mac, port)
                result["fdb"].append(f"static {mac} -> {port}")
            except (SwitchError, FibError) as exc:
                result["errors"].append(f"fdb.static {mac}: {exc}")


def summary(result: dict) -> str:
    """One line for the log and for vswitchctl."""
    parts = [f"{key} {', '.join(result[key])}" for key in ("added", "removed", "changed") if result[key]]
    parts.append(f"{result['unchanged']} port(s) untouched")
    if result["fdb"]:
        parts.append("fdb " + ", ".join(result["fdb"]))
    if "mirrors" in result:
        parts.append("mirrors set: " + (", ".join(result["mirrors"]) or "none"))
    if result["restart_needed"]:
        parts.append("not applied until a restart: " + ", ".join(result["restart_needed"]))
    if result["errors"]:
        parts.append("errors: " + "; ".join(result["errors"]))
    return "reloaded: " + "; ".join(parts)
