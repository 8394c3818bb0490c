"""vswitchd: load the config, build the switch, serve the control socket.

One asyncio loop runs the whole control plane (vhost-user sockets, control
socket, housekeeping); the PMD threads run the packet loop in C.
SIGTERM and SIGINT shut down cleanly: ports are removed (guests see the
link go down), sockets are unlinked, the PMD threads are joined.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from vswitch import __version__
from vswitch.config import ConfigError, load, save
from vswitch.fib import FibError
from vswitch.control.server import ControlServer
from vswitch.switch import Switch, SwitchError

log = logging.getLogger("vswitchd")

DEFAULT_CONFIG = "configs/default.yaml"
# The runtime directory of the default config; created like OVS creates its own.
RUN_DIR = "/run/vswitch"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vswitchd", description="vswitch daemon")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config file (default {DEFAULT_CONFIG})")
    p.add_argument("--control-socket", help="control socket path (overrides the config and $VSWITCH_SOCKET)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--persist", action="store_true",
                   help="write every change made over the control socket back to the config file")
    p.add_argument("--version", action="version", version=f"vswitchd {__version__}")
    return p.parse_args(argv)


async def run(args) -> int:
    if os.geteuid() == 0:
        os.makedirs(RUN_DIR, mode=0o750, exist_ok=True)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"vswitchd: {problem}", file=sys.stderr)
        return 2
    control_path = args.control_socket or os.environ.get("VSWITCH_SOCKET") or cfg.control_socket

    switch = Switch(cfg)
    switch.start()
    control = ControlServer(switch, control_path, cfg.control_group)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        for spec in cfg.ports:
            await switch.add_port(spec)
        for entry in cfg.fdb_static:
            switch.fdb_add_static(entry["mac"], entry["port"], entry.get("vlan", 0))
        await control.start()
    except (SwitchError, FibError, OSError) as exc:
        print(f"vswitchd: {exc}", file=sys.stderr)
        await control.stop()
        await switch.stop()
        return 1
    if args.persist or cfg.persist:
        switch.config.persist = cfg.persist
        switch.on_change = lambda: save(args.config, switch.config)
        log.info("persisting changes to %s", args.config)
    log.info("vswitchd %s running: %d ports, config %s", __version__, len(switch.ports), args.config)
    await stopping.wait()
    log.info("shutting down")
    switch.on_change = None  # shutting down removes ports; that is not a user's change
    await control.stop()
    await switch.stop()
    log.info("stopped")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
