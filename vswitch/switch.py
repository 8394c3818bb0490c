"""Switch: the ports by name, the MAC table, the PMD threads, and events.

Every change to the set of ports goes the same way: build the new port
list, publish a fresh table to each PMD with one pointer swap, wait for the
PMD to pass a quiescent point, and only then close what it no longer reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from vswitch.fib import MacTable
from vswitch.native import lib
from vswitch.pmd import PmdThread
from vswitch.ports.base import Port

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0


class SwitchError(ValueError):
    """A request refused with a one-line reason."""


class Switch:
    def __init__(self, fdb_max_entries: int, fdb_aging_seconds: int, pmd_cpus: list[int] | None = None):
        self.fib = MacTable(fdb_max_entries, fdb_aging_seconds)
        cpus = pmd_cpus or [None]
        self.pmds = [PmdThread(i, self.fib, cpu) for i, cpu in enumerate(cpus)]
        self.ports: dict[str, Port] = {}
        self._subscribers: list[Callable[[dict], None]] = []
        self._housekeeping: asyncio.Task | None = None

    # Lifecycle.

    def start(self) -> None:
        for pmd in self.pmds:
            pmd.start()
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())

    async def stop(self) -> None:
        if self._housekeeping:
            self._housekeeping.cancel()
        for name in list(self.ports):
            await self.del_port(name)
        for pmd in self.pmds:
            pmd.stop()
        self.fib.close()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                aged = self.fib.age()
                if aged:
                    log.debug("aged out %d MAC entries", aged)
                for port in self.ports.values():
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

    def check_new_port(self, spec: dict) -> None:
        """Refuses a port that clashes with a running one, before anything is created."""
        name = spec["name"]
        if name in self.ports:
            raise SwitchError(f"port '{name}' already exists")
        path = spec.get("path")
        for other in self.ports.values():
            if path and other.spec.get("path") == path:
                raise SwitchError(f"port '{name}': path {path} is already used by port '{other.name}'")

    def add_port(self, spec: dict) -> Port:
        from vswitch.ports import create_port

        self.check_new_port(spec)
        port = create_port(spec, self._free_port_no(), emit=self._emit_port_event,
                           quiesce=self.quiesce, on_rarp=self._on_rarp)
        try:
            port.start()
        except OSError as exc:
            raise SwitchError(f"port '{spec['name']}': {exc.strerror or exc}") from None
        self.ports[port.name] = port
        self._publish()
        self.emit({"event": "port-added", "port": port.name, "type": port.type})
        log.info("port '%s' added (%s)", port.name, port.type)
        return port

    async def del_port(self, name: str) -> None:
        port = self.ports.get(name)
        if port is None:
            raise SwitchError(f"no port named '{name}'")
        del self.ports[name]
        self._publish()
        await port.stop()
        self.fib.flush(port.port_no, include_static=True)
        self.emit({"event": "port-removed", "port": name})
        log.info("port '%s' removed", name)

    def _publish(self) -> None:
        ports = sorted(self.ports.values(), key=lambda p: p.port_no)
        polls = [(p, q) for p in ports for q in p.poll_queues()]
        # Round-robin the receive queues over the PMD threads: each is polled by one.
        for i, pmd in enumerate(self.pmds):
            pmd.publish(ports, polls[i::len(self.pmds)])

    def quiesce(self) -> None:
        for pmd in self.pmds:
            pmd.quiesce()

    def _on_rarp(self, port: Port, mac: str) -> None:
        # A migrated guest announces itself: point its MAC at its new port.
        self.fib.remove(mac)
        log.info("port '%s': RARP for %s", port.name, mac)

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

    def port_name(self, port_no: int) -> str | None:
        for port in self.ports.values():
            if port.port_no == port_no:
                return port.name
        return None

    def fdb_entries(self, port: str | None = None) -> list[dict]:
        port_no = None
        if port is not None:
            if port not in self.ports:
                raise SwitchError(f"no port named '{port}'")
            port_no = self.ports[port].port_no
        return [{"mac": e.mac, "vlan": e.vlan, "port": self.port_name(e.port_no), "age": e.age,
                 "static": e.static}
                for e in self.fib.entries() if port_no is None or e.port_no == port_no]
