"""Switch: the ports by name, the MAC table, the PMD threads, and events.

Every change to the set of ports goes the same way: build the new port
list, publish a fresh table to each PMD with one pointer swap, and hand the
old table (and whatever only it references) to the Reclaimer, which frees it
once every PMD has passed a quiescent point.  The control loop never waits
long for a PMD: a stuck one delays the freeing, not the switch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

from vswitch import capture as capture_mod
from vswitch.capture import Capture, CaptureProblem
from vswitch.config import Config, validate_port
from vswitch.fib import MacTable
from vswitch.native import ffi, lib
from vswitch.pmd import CallWatchdog, PmdThread, Reclaimer
from vswitch.ports import policing as policing_settings
from vswitch.ports import vlan as vlan_settings
from vswitch.ports.base import Port

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
# MAC entries aged per housekeeping tick at most: a million idle at once are
# aged over some seconds, and the control loop is never blocked for long.
AGE_PER_TICK = 65536


class SwitchError(ValueError):
    """A request refused with a one-line reason."""


class Switch:
    """The running switch; `config` always describes it as it is now.

    `on_change`, if set, is called after every change a user made (ports,
    MAC table settings, static entries): the daemon persists the config there.
    """

    def __init__(self, config: Config):
        self.config = dataclasses.replace(config, ports=[], fdb_static=[], mirrors=[])
        self.fib = MacTable(config.fdb_max_entries, config.fdb_aging_seconds)
        cpus = config.pmd_cpus or [None]
        self.pmds = [PmdThread(i, self.fib, cpu, poll_only=not config.pmd_sleep,
                               yield_light=config.pmd_yield) for i, cpu in enumerate(cpus)]
        self._call_watchdog = CallWatchdog(self.pmds)
        self.reclaimer = Reclaimer(self.pmds)
        self.ports: dict[str, Port] = {}
        self.on_change: Callable[[], None] | None = None
        # Set by the daemon: re-reads its config file and applies the differences (vswitch/reload.py).
        self.reload: Callable[[], Awaitable[dict]] | None = None
        self._subscribers: list[Callable[[dict], None]] = []
        self._housekeeping: asyncio.Task | None = None
        self.captures: list[Capture] = []
        # Per port name: the struct vs_monitor published in its struct vs_port and what it points to.
        self._monitors: dict[str, tuple] = {}

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()

    # Lifecycle.

    def start(self) -> None:
        for pmd in self.pmds:
            pmd.start()
        self._call_watchdog.start()
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())

    async def stop(self) -> None:
        if self._housekeeping:
            self._housekeeping.cancel()
        for name in list(self.ports):
            await self.del_port(name)
        self._call_watchdog.stop()
        for pmd in self.pmds:
            pmd.stop()
        self.reclaimer.flush()
        self.fib.close()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                aged = self.fib.age(AGE_PER_TICK)
                if aged:
                    log.debug("aged out %d MAC entries", aged)
                for port in self.ports.values():
                    port.housekeep()
                    for line in port.errors():
                        log.warning("%s", line)
            except Exception:  # housekeeping must never die
                log.exception("housekeeping failed")

    # Ports.

    def _free_port_no(self) -> int:
        used = {p.port_no for p in self.ports.values()}
        for n in range(lib.VS_MAX_PORTS):
            if n not in used:
                return n
        raise SwitchError(f"no room for another port (at most {lib.VS_MAX_PORTS})")

    def check_new_port(self, spec: dict) -> dict:
        """Validates a port spec against the schema and the running ports.

        Returns the spec with defaults filled in; refuses, before anything is
        created, a bad field, a name or a path that is already in use.
        """
        problems: list[str] = []
        port = validate_port(spec, None, problems)
        if problems:
            raise SwitchError(problems[0])
        name = port["name"]
        if name in self.ports:
            raise SwitchError(f"port '{name}' already exists")
        path = port.get("path")
        ifname = port.get("ifname")
        for other in self.ports.values():
            if path and other.spec.get("path") == path:
                raise SwitchError(f"port '{name}': path {path} is already used by port '{other.name}'")
            if ifname and (other.spec.get("ifname"), other.spec.get("netns")) == (ifname, port.get("netns")):
                raise SwitchError(f"port '{name}': interface {ifname} is already attached by port '{other.name}'")
        return port

    async def add_port(self, spec: dict) -> Port:
        from vswitch.ports import create_port

        spec = self.check_new_port(spec)
        port = create_port(spec, self._free_port_no(), emit=self._emit_port_event,
                           quiesce=self.quiesce, on_rarp=self._on_rarp, reclaim=self.reclaimer.defer,
                           port_defaults=self.config.port_defaults)
        try:
            port.start()
        except OSError as exc:
            await port.stop()  # nothing half-created
            raise SwitchError(f"port '{spec['name']}': {exc.strerror or exc}") from None
        self.ports[port.name] = port
        self.config.ports.append(spec)
        self._publish()
        self.emit({"event": "port-added", "port": port.name, "type": port.type})
        log.info("port '%s' added (%s)", port.name, port.type)
        self._changed()
        return port

    async def del_port(self, name: str) -> None:
        port = self.ports.get(name)
        if port is None:
            raise SwitchError(f"no port named '{name}'")
        del self.ports[name]
        self.config.ports = [p for p in self.config.ports if p["name"] != name]
        self.config.fdb_static = [e for e in self.config.fdb_static if e["port"] != name]
        self._forget_port_in_mirrors(name)
        for cap in self.captures:
            if cap.port == name:
                cap.ended = f"port '{name}' was removed"
        unused = self._publish()
        if unused or getattr(port, "reclaims_itself", False) or self.quiesce():
            await port.stop()
        else:
            # A PMD may still be receiving from it: close it once they have all moved on.
            port.set_link(False)
            loop = asyncio.get_running_loop()
            self.reclaimer.defer(f"port '{name}'", lambda: loop.create_task(port.stop()))
        self.fib.flush(port.port_no, include_static=True)
        self.emit({"event": "port-removed", "port": name})
        log.info("port '%s' removed", name)
        self._changed()

    def set_port_vlan(self, name: str, settings: dict | None) -> dict | None:
        """Gives a running port new VLAN settings (None: none).  The PMDs see
        them from their next burst; the port's learned MAC entries go, as they
        may belong to VLANs it no longer carries.  Returns the settings kept."""
        port, settings = self._set_port_settings(name, "vlan", settings)
        self.fib.flush(port.port_no)
        return settings

    def set_port_policing(self, name: str, settings: dict | None) -> dict | None:
        """Gives a running port new ingress policing settings (None: none),
        with full buckets; the PMDs see them from their next burst."""
        return self._set_port_settings(name, "policing", settings)[1]

    # The settings every port takes and can change at run time: their module and its complaint.
    _SETTINGS = {"vlan": (vlan_settings, vlan_settings.VlanProblem),
                 "policing": (policing_settings, policing_settings.PolicingProblem)}

    def _set_port_settings(self, name: str, key: str, settings: dict | None) -> tuple[Port, dict | None]:
        """Checks settings, swaps them into the port (Port.set_<key>), frees
        the old C settings once no PMD reads them, and keeps the new ones in
        the running config."""
        port = self._port(name)
        module, problem = self._SETTINGS[key]
        if settings is not None:
            try:
                settings = module.check(settings)
            except problem as exc:
                raise SwitchError(f"port '{name}': {key}: {exc}") from None
        old_c = getattr(port, f"set_{key}")(settings)
        # The table counts the ports with VLAN settings: 0 keeps the PMDs on the plain path.
        self._publish()
        keep = [old_c]
        self.reclaimer.defer(f"port '{name}' old {key} settings", keep.clear)
        for spec in self.config.ports:
            if spec["name"] == name:
                spec.pop(key, None)
                if settings is not None:
                    spec[key] = settings
        log.info("port '%s': %s %s", name, key, module.describe(settings))
        self._changed()
        return port, settings

    def _port(self, name: str) -> Port:
        port = self.ports.get(name)
        if port is None:
            raise SwitchError(f"no port named '{name}'")
        return port

    def fdb_add_static(self, mac: str, port_name: str, vlan: int = 0) -> None:
        port = self.ports.get(port_name)
        if port is None:
            raise SwitchError(f"no port named '{port_name}'")
        self.fib.add_static(mac, port.port_no, vlan)
        mac = mac.lower()
        self.config.fdb_static = [e for e in self.config.fdb_static
                                  if (e["mac"], e.get("vlan", 0)) != (mac, vlan)]
        self.config.fdb_static.append({"mac": mac, "port": port_name, **({"vlan": vlan} if vlan else {})})
        self._changed()

    def fdb_remove(self, mac: str, vlan: int = 0) -> bool:
        removed = self.fib.remove(mac, vlan)
        mac = mac.lower()
        before = len(self.config.fdb_static)
        self.config.fdb_static = [e for e in self.config.fdb_static if (e["mac"], e.get("vlan", 0)) != (mac, vlan)]
        if len(self.config.fdb_static) != before:
            self._changed()
        return removed

    def set_fdb_aging(self, seconds: int) -> None:
        self.fib.aging_seconds = seconds
        self.config.fdb_aging_seconds = seconds
        self._changed()

    def set_fdb_max(self, n: int) -> None:
        self.fib.max_entries = n
        self.config.fdb_max_entries = n
        self._changed()

    def _publish(self) -> bool:
        """Publishes the ports to the PMDs; True if the old tables are already unused (and freed)."""
        old = self._publish_monitors()
        ports = sorted(self.ports.values(), key=lambda p: p.port_no)
        polls = [(p, q) for p in ports for q in p.poll_queues()]
        # Round-robin the receive queues over the PMD threads: each is polled by one.
        old += [pmd.publish(ports, polls[i::len(self.pmds)]) for i, pmd in enumerate(self.pmds)]
        return self.reclaimer.defer("the previous port table", old.clear)

    # Capture and mirroring (vswitch/capture.py).

    def _publish_monitors(self) -> list:
        """Gives each port the struct vs_monitor its captures and mirrors need (one pointer store
        each); returns the old ones, which a PMD may still read.  A mirror's output port is
        marked so that the next port table leaves it out of flooding."""
        self.captures = [c for c in self.captures if c.ended is None]
        old = []
        for name, port in self.ports.items():
            monitor, refs = capture_mod.build_monitor(port, self.captures, self.config.mirrors, self.ports)
            was_output = getattr(port, "mirror_output", False)
            port.mirror_output = bool(monitor != ffi.NULL and monitor.mirror_output)
            if port.mirror_output and not was_output:
                self.fib.flush(port.port_no)   # nothing is sent to it as a destination any more
            previous = self._monitors.get(name)
            if previous is None and monitor == ffi.NULL:
                continue
            port.c.monitor = monitor
            old.append(previous)
            self._monitors[name] = (monitor, refs) if monitor != ffi.NULL else None
        for name in [n for n in self._monitors if n not in self.ports]:
            old.append(self._monitors.pop(name))
        return old

    def start_capture(self, port_name: str, direction: str = "both", snaplen: int = capture_mod.DEFAULT_SNAPLEN,
                      slots: int | None = None) -> Capture:
        """Starts copying the port's frames into a new capture ring; the PMDs see it from their next burst."""
        port = self._port(port_name)
        try:
            cap = Capture(port.name, direction, snaplen, slots)
        except CaptureProblem as exc:
            raise SwitchError(f"capture: {exc}") from None
        active = [c for c in self.captures if c.port == port.name and c.ended is None]
        if len(active) >= lib.VS_MONITOR_MAX:
            raise SwitchError(f"port '{port.name}' already has {len(active)} captures (at most {lib.VS_MONITOR_MAX})")
        self.captures.append(cap)
        port.capture_rings.append(cap)
        self._publish()
        log.info("port '%s': capture started (%s, snaplen %d)", port.name, direction, snaplen)
        return cap

    def stop_capture(self, cap: Capture) -> None:
        """Ends a capture; its ring is freed once no PMD can be writing it."""
        if cap.ended is None:
            cap.ended = "stopped"
        if cap in self.captures:
            self._publish()
        port = self.ports.get(cap.port)
        if port is not None and cap in port.capture_rings:
            port.capture_rings.remove(cap)
            port.capture_dropped_before += cap.dropped
        log.info("port '%s': capture ended: %d frames, %d dropped", cap.port, cap.captured, cap.dropped)

    def add_mirror(self, spec: dict) -> dict:
        """Adds a mirror (vswitch/capture.py check_mirror); the PMDs copy from their next burst."""
        try:
            mirror = capture_mod.check_mirror(spec, set(self.ports), "mirror")
            if any(m["name"] == mirror["name"] for m in self.config.mirrors):
                raise CaptureProblem(f"mirror '{mirror['name']}' already exists")
            capture_mod.check_mirrors(self.config.mirrors + [mirror], "mirrors")
        except CaptureProblem as exc:
            raise SwitchError(str(exc)) from None
        self.config.mirrors.append(mirror)
        self._publish()
        log.info("mirror '%s' added: %s (%s) to %s", mirror["name"], ", ".join(mirror["select"]),
                 mirror.get("select_direction", "both"), mirror["output"])
        self._changed()
        return mirror

    def del_mirror(self, name: str) -> None:
        if not any(m["name"] == name for m in self.config.mirrors):
            raise SwitchError(f"no mirror named '{name}'")
        self.config.mirrors = [m for m in self.config.mirrors if m["name"] != name]
        self._publish()
        log.info("mirror '%s' removed", name)
        self._changed()

    def set_mirrors(self, mirrors: list[dict]) -> None:
        """Replaces every mirror at once (a reload); `mirrors` were validated with the config."""
        self.config.mirrors = [dict(m) for m in mirrors]
        self._publish()
        self._changed()

    def _forget_port_in_mirrors(self, name: str) -> None:
        """A removed port leaves the mirrors: one that has no selected port or no output left goes."""
        kept = []
        for m in self.config.mirrors:
            select = [p for p in m["select"] if p != name]
            if m["output"] == name or not select:
                log.info("mirror '%s' removed with port '%s'", m["name"], name)
                continue
            kept.append({**m, "select": select})
        self.config.mirrors = kept

    def quiesce(self) -> bool:
        """Waits briefly for the PMDs to finish their current pass; False if one did not."""
        return self.reclaimer.quiesce()

    def _on_rarp(self, port: Port, mac: str) -> None:
        """A migrated guest's announcement (vhost-user SEND_RARP): a PMD sends a RARP
        frame from its MAC as if the port had received it (pmd.h vs_port_announce), so
        that this switch learns the MAC behind the port in the port's VLAN and every
        other port of that VLAN, and what lies behind them, sees the frame."""
        pending = lib.vs_port_announce(port.c, ffi.from_buffer("uint8_t[]", bytes.fromhex(mac.replace(":", ""))))
        if pending < 0:
            log.warning("port '%s': RARP for %s not sent: not a unicast MAC address", port.name, mac)
            return
        for pmd in self.pmds:
            pmd.wake()
        log.info("port '%s': RARP for %s (%d pending)", port.name, mac, pending)

    # Events.

    def subscribe(self, callback: Callable[[dict], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def emit(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        for callback in list(self._subscribers):
            callback(event)

    def _emit_port_event(self, kind: str, fields: dict) -> None:
        log.info("port '%s': %s %s", fields.get("port"), kind,
                 " ".join(f"{k}={v}" for k, v in fields.items() if k != "port"))
        self.emit({"event": kind, **fields})

    # Views.

    def fdb_entries(self, port: str | None = None) -> list[dict]:
        port_no = None
        if port is not None:
            if port not in self.ports:
                raise SwitchError(f"no port named '{port}'")
            port_no = self.ports[port].port_no
        by_no = {p.port_no: p for p in self.ports.values()}
        out = []
        for e in self.fib.entries():
            if port_no is not None and e.port_no != port_no:
                continue
            port_obj = by_no.get(e.port_no)
            entry = {"mac": e.mac, "vlan": e.vlan, "port": port_obj.name if port_obj else None, "age": e.age,
                     "static": e.static}
            remote = port_obj.sub_name(e.sub) if port_obj and e.sub else None
            if remote is not None:
                entry["remote"] = remote   # behind which remote endpoint of a tunnel port
            out.append(entry)
        return out
